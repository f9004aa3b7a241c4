"""Loading the reference's own files: a Lightning ``.ckpt`` (e.g. ``sd3unet_gq_0.25.ckpt``) plus its YAML config.

The reference README loads with ``strict=False``, which hides mismatches. We load the ``encoder.``/``decoder.`` subsets
strictly, ignore what the trainer adds (``loss.*``: LPIPS, discriminator, logvar), and report anything else.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from gq_model.config import GQConfig

__all__ = ["read_reference_checkpoint", "ReferenceParts", "read_reference_state_dict", "split_reference_state_dict",
           "LoadReport"]

log = logging.getLogger(__name__)

# Prefixes the reference's LightningModule may hold besides the autoencoder; none of them matter for tokenization.
IGNORED_PREFIXES = ("loss.", "regularization.", "foundation_model.", "linear_proj.", "model_ema.")


@dataclass
class LoadReport:
    loaded: int = 0
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def read_reference_state_dict(checkpoint: str, *, trust_checkpoint: bool = False,
                              storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """The weights of a reference checkpoint (``ckpt["state_dict"]`` for Lightning files, else the dict itself).

    Read through :func:`gq_model.safe_load.load_torch_file` (``weights_only``): no code in the file runs. Some
    Lightning files pickle extra objects (hyper-parameters) that this refuses; pass ``trust_checkpoint=True`` only for
    files you trust.
    """
    from gq_model.safe_load import load_torch_file

    obj = load_torch_file(checkpoint, trust_checkpoint=trust_checkpoint, storage_options=storage_options)
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


class ReferenceParts(NamedTuple):
    """A reference checkpoint read for a ``GQModel``: architecture, autoencoder weights (float32) and what was left."""

    config: GQConfig
    state_dict: dict[str, torch.Tensor]
    report: LoadReport
    source: str  # the reference YAML or preset the architecture came from (named in errors)


def read_reference_checkpoint(checkpoint: str, config: str | None = None, *, preset: str | None = None,
                              trust_checkpoint: bool = False, storage_options: dict | None = None) -> ReferenceParts:
    """The architecture from the reference YAML (or a preset) and the checkpoint's ``encoder.*``/``decoder.*``.

    :func:`gq_model.loading.load_reference_checkpoint` assembles the model from these, strictly.
    """
    from gq_model.reference_config import load_reference_config, preset_config

    if (config is None) == (preset is None):
        raise ValueError("give exactly one of config (the reference YAML) or preset (e.g. 'sd3unet_gq_0.25')")
    ref = load_reference_config(config) if config is not None else preset_config(preset)
    gq_config = GQConfig.from_reference(ref)
    weights, report = split_reference_state_dict(read_reference_state_dict(
        checkpoint, trust_checkpoint=trust_checkpoint, storage_options=storage_options))
    report.loaded = len(weights)
    if report.unexpected:
        log.warning("%s: %d unexpected keys were not loaded, e.g. %s", checkpoint, len(report.unexpected),
                    report.unexpected[:5])
    return ReferenceParts(gq_config, {k: v.to(torch.float32) for k, v in weights.items()}, report,
                          str(ref.get("source", config or preset)))


def __getattr__(name: str):
    """``load_reference_checkpoint`` moved to :mod:`gq_model.loading` (it assembles a model); the old path works."""
    if name == "load_reference_checkpoint":
        from gq_model.loading import load_reference_checkpoint

        return load_reference_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
