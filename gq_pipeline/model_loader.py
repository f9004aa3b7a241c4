"""``--model`` resolution: one argument that accepts every form a GQ model comes in.

* a ``GQModel`` instance (Python API);
* ``*.ckpt``: the reference's Lightning checkpoint, with ``--config`` (its YAML) or ``--preset``;
* a directory (or URL) with ``config.json``: a GQ bundle (``save_pretrained``);
* a directory with a DeepSpeed ``latest`` file: a training checkpoint, consolidated by ``jobs.export``;
* a built-in model name such as ``demo``.

The driver loads the model once; actors get its weights through the object store (see ``stages.model_payload``).
"""
from __future__ import annotations

from typing import Any

__all__ = ["load_model"]


def load_model(spec: Any, *, config: str | None = None, preset: str | None = None, trust_checkpoint: bool = False,
               storage_options: dict | None = None):
    from gq_model import GQModel

    if isinstance(spec, GQModel):
        return spec.eval()
    spec = str(spec)
    if spec.startswith("memory:"):
        raise ValueError("--model: memory:// is not supported (Ray workers cannot see it)")
    if spec.endswith(".ckpt"):
        if not config and not preset:
            raise ValueError(f"{spec} is a reference .ckpt: pass its YAML with --config or a built-in --preset "
                             f"(e.g. --preset sd3unet_gq_0.25)")
        return GQModel.from_reference_checkpoint(spec, config, preset=preset, trust_checkpoint=trust_checkpoint)
    if "://" not in spec and "/" not in spec:
        import os

        if not os.path.exists(spec):
            return GQModel.from_pretrained(spec)  # built-in name; raises a clear FileNotFoundError otherwise
    from gq_model.storage import url_to_fs

    fs, path = url_to_fs(spec, storage_options)
    path = path.rstrip("/")
    if fs.isdir(path):
        if fs.exists(f"{path}/config.json"):
            return GQModel.from_pretrained(spec, storage_options=storage_options).eval()
        if fs.exists(f"{path}/latest"):
            try:
                from jobs.export import load_model_from_zero_checkpoint
            except ImportError as e:
                raise ValueError(f"{spec} is a DeepSpeed checkpoint, but jobs.export (which consolidates it) is not "
                                 f"available in this installation: {e}") from e
            return load_model_from_zero_checkpoint(spec).eval()
        raise ValueError(f"{spec} is a directory but neither a GQ bundle (no config.json) nor a DeepSpeed checkpoint "
                         f"(no 'latest' file)")
    if not fs.exists(path):
        raise FileNotFoundError(f"--model {spec}: no such file, directory or built-in model")
    raise ValueError(f"--model {spec}: unrecognised file; expected a .ckpt, a bundle directory or a DeepSpeed "
                     f"checkpoint directory")
