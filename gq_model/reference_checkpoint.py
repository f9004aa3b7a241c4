"""Loading the reference's own files: a Lightning ``.ckpt`` (e.g. ``sd3unet_gq_0.25.ckpt``) plus its YAML config.

The reference README loads with ``strict=False``, which hides mismatches. We load the ``encoder.``/``decoder.`` subsets
strictly, ignore what the trainer adds (``loss.*``: LPIPS, discriminator, logvar), and report anything else.
"""
from __future__ import annotations

import io
import logging
import pickle
from dataclasses import dataclass, field

import fsspec
import torch

from gq_model.config import GQConfig

__all__ = ["load_reference_checkpoint", "read_reference_state_dict", "split_reference_state_dict", "LoadReport"]

log = logging.getLogger(__name__)

# Prefixes the reference's LightningModule may hold besides the autoencoder; none of them matter for tokenization.
IGNORED_PREFIXES = ("loss.", "regularization.", "foundation_model.", "linear_proj.", "model_ema.")


@dataclass
class LoadReport:
    loaded: int = 0
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def read_reference_state_dict(checkpoint: str, *, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a reference checkpoint (``ckpt["state_dict"]`` for Lightning files, else the dict itself).

    Read with ``torch.load(weights_only=True)``: no code in the file runs. Some Lightning files pickle extra objects
    (hyper-parameters) that this refuses; pass ``trust_checkpoint=True`` only for files you trust.
    """
    try:
        with fsspec.open(str(checkpoint), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}") from None
    if not data:
        raise ValueError(f"checkpoint {checkpoint} is empty")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as e:
        if not trust_checkpoint:
            raise ValueError(f"{checkpoint} holds objects other than tensors, which weights_only loading refuses "
                             f"({str(e).splitlines()[0]}). If you trust the file, pass trust_checkpoint=True "
                             f"(CLI: --trust-checkpoint).") from e
        raise ValueError(f"{checkpoint} could not be unpickled: {e}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{checkpoint} is not a readable torch checkpoint (truncated or corrupt?): {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{checkpoint} does not contain a state dict of tensors")
    return obj


def split_reference_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Keep ``encoder.*``/``decoder.*``; list ignored trainer keys and unexpected ones."""
    report = LoadReport()
    weights: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key[len("model."):] if key.startswith("model.") and not key.startswith("model.encoder") else key
        if k.startswith(("encoder.", "decoder.")):
            weights[k] = value
        elif k.startswith(IGNORED_PREFIXES):
            report.ignored.append(key)
        else:
            report.unexpected.append(key)
    return weights, report


def load_reference_checkpoint(checkpoint: str, config: str | None = None, *, preset: str | None = None,
                              trust_checkpoint: bool = False):
    """Build a GQModel from the reference YAML (or a preset) and load the checkpoint's autoencoder strictly."""
    from gq_model.model import GQModel
    from gq_model.reference_config import load_reference_config, preset_config

    if (config is None) == (preset is None):
        raise ValueError("give exactly one of config (the reference YAML) or preset (e.g. 'sd3unet_gq_0.25')")
    ref = load_reference_config(config) if config is not None else preset_config(preset)
    model = GQModel(GQConfig.from_reference(ref))
    weights, report = split_reference_state_dict(read_reference_state_dict(checkpoint,
                                                                            trust_checkpoint=trust_checkpoint))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs config {tuple(v.shape)}"
              for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if missing or extra or shapes:
        problems = []
        if shapes:
            problems.append(f"{len(shapes)} shape mismatches, e.g. {shapes[:3]}")
        if missing:
            problems.append(f"{len(missing)} keys missing from the checkpoint, e.g. {missing[:3]}")
        if extra:
            problems.append(f"{len(extra)} autoencoder keys the config does not have, e.g. {extra[:3]}")
        raise ValueError(f"{checkpoint} does not fit the {model.config.arch} config "
                         f"{ref.get('source', config or preset)}: " + "; ".join(problems)
                         + ". Is this a checkpoint for another architecture or bit rate?")
    model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=True)
    report.loaded = len(weights)
    if report.unexpected:
        log.warning("%s: %d unexpected keys were not loaded, e.g. %s", checkpoint, len(report.unexpected),
                    report.unexpected[:5])
    model.load_report = report
    return model.eval()
