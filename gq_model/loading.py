"""Model specs: the one function every entry point resolves ``--model`` with.

``gq tokenize``, ``gq eval``, ``gq decode``, the Python pipeline API and ``GQModel.from_pretrained`` all accept the same
forms, resolved here and nowhere else:

* a ``GQModel`` instance (Python API);
* ``official:NAME`` or ``hf://owner/repo[@revision]/file.ckpt``: a reference checkpoint on the Hugging Face Hub
  (:mod:`gq_model.hub`; preset inferred from the file name unless ``preset``/``config`` say otherwise);
* ``*.ckpt`` (local path or fsspec URL): the reference's Lightning checkpoint, with ``config`` (its YAML) or ``preset``;
* a directory or URL with ``config.json``: a GQ bundle (``save_pretrained``), its ``weights_sha256`` required;
* a local directory with a DeepSpeed ``latest`` file (run dir, ``checkpoints`` dir) or a tag dir: a training
  checkpoint of any ZeRO stage (:mod:`gq_model.zero_checkpoint`);
* a built-in model name such as ``demo``.

Every torch pickle among these is read by :func:`gq_model.safe_load.load_torch_file`, ``weights_only`` unless
``trust_checkpoint`` is set; Hub files are never trusted. Bundles are safetensors, no pickle at all.
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["load_model", "describe_spec"]


def describe_spec(spec: Any) -> str:
    """Which form ``spec`` is: ``model``, ``hub``, ``reference``, ``bundle``, ``deepspeed`` or ``builtin``."""
    from gq_model.hub import is_hub_spec

    if not isinstance(spec, (str, os.PathLike)):
        return "model"
    spec = os.fspath(spec)
    if is_hub_spec(spec):
        return "hub"
    if spec.endswith(".ckpt"):
        return "reference"
    if "://" not in spec and "/" not in spec and not os.path.exists(spec):
        return "builtin"
    if "://" not in spec or spec.startswith("file://"):
        from gq_model.zero_checkpoint import is_deepspeed_checkpoint

        local = spec[len("file://"):] if spec.startswith("file://") else spec
        if os.path.isdir(local) and not os.path.isfile(os.path.join(local, "config.json")) \
                and is_deepspeed_checkpoint(local):
            return "deepspeed"
    return "bundle"


def load_model(spec: Any, *, config: str | None = None, preset: str | None = None, trust_checkpoint: bool = False,
               storage_options: dict | None = None, map_location: Any = "cpu"):
    """A GQModel in eval mode from any model spec (see the module docstring).

    ``config``/``preset`` pick the architecture of a reference checkpoint (required for a local ``.ckpt``, an
    override for Hub files); they are refused for forms that carry their own architecture. ``trust_checkpoint``
    allows full unpickling of local ``.ckpt`` and DeepSpeed files (never of Hub downloads). ``storage_options`` go to
    fsspec for remote bundles and ``.ckpt`` URLs.
    """
    from gq_model.model import GQModel

    if isinstance(spec, GQModel):
        return spec.eval()
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"--model must be a path, URL, model name or GQModel, not {type(spec).__name__}")
    spec = os.fspath(spec)
    if spec.startswith("memory:"):
        raise ValueError("--model: memory:// is not supported (Ray workers cannot see it)")
    kind = describe_spec(spec)
    if config is not None and preset is not None:
        raise ValueError("give either a reference YAML (--config) or a preset (--preset), not both")
    if kind not in ("hub", "reference") and (config is not None or preset is not None):
        raise ValueError(f"--model {spec} is a {kind} model, which records its own architecture: --config/--preset "
                         f"only apply to reference .ckpt files and hf:// / official: models")
    if kind == "hub":
        from gq_model.hub import load_hub_model

        if trust_checkpoint:
            raise ValueError(f"--trust-checkpoint does not apply to {spec}: files from the Hub are always read "
                             f"weights_only")
        model = load_hub_model(spec, config=config, preset=preset)
    elif kind == "reference":
        if config is None and preset is None:
            from gq_model.hub import infer_preset

            hint = infer_preset(spec)
            raise ValueError(f"{spec} is a reference .ckpt: pass its YAML with --config or a built-in --preset "
                             f"(e.g. --preset {hint or 'sd3unet_gq_0.25'})")
        from gq_model.reference_checkpoint import load_reference_checkpoint

        model = load_reference_checkpoint(spec, config, preset=preset, trust_checkpoint=trust_checkpoint,
                                          storage_options=storage_options)
    elif kind == "deepspeed":
        from gq_model.zero_checkpoint import load_model_from_zero_checkpoint

        local = spec[len("file://"):] if spec.startswith("file://") else spec
        model = load_model_from_zero_checkpoint(local, trust_checkpoint=trust_checkpoint)
    else:  # bundle or built-in name
        from gq_model.bundle import load_bundle

        if kind == "bundle":
            _check_bundle_dir(spec, storage_options)
        model = load_bundle(spec, storage_options=storage_options)
    return model.to(map_location).eval()


def _check_bundle_dir(spec: str, storage_options: dict | None) -> None:
    """Name what a directory is missing when it is neither a bundle nor a training checkpoint."""
    from gq_model.storage import url_to_fs

    fs, path = url_to_fs(spec, storage_options)
    path = path.rstrip("/")
    if fs.isdir(path):
        if not fs.exists(f"{path}/config.json"):
            remote = "://" in spec and not spec.startswith("file://")
            raise ValueError(f"{spec} is a directory but neither a GQ bundle (no config.json) nor a DeepSpeed "
                             f"checkpoint (no 'latest' file)" + (" (DeepSpeed checkpoints are read from local "
                                                                  "paths only; export it with gq export)"
                                                                  if remote and fs.exists(f"{path}/latest") else ""))
        return
    if not fs.exists(path):
        raise FileNotFoundError(f"--model {spec}: no such file, directory or built-in model")
    raise ValueError(f"--model {spec}: unrecognised file; expected a .ckpt, a bundle directory, a DeepSpeed checkpoint "
                     f"directory, hf://owner/repo/file.ckpt or official:NAME")
