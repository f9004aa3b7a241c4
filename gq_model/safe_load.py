"""The one place gq unpickles a torch file: reference ``.ckpt`` files and DeepSpeed checkpoint shards alike.

A torch pickle can run any code while it loads (an object's ``__reduce__`` names a function and its arguments), so a
model file downloaded from the internet, or a training folder someone hands over, must never be loaded with
``weights_only=False`` by default. Every checkpoint read goes through :func:`load_torch_file`, which uses torch's
``weights_only`` unpickler (tensors, containers and primitive types only) unless the caller says the file is trusted
(``trust_checkpoint=True``, ``--trust-checkpoint`` on the command line).

What else a legitimate checkpoint pickles was read off the files DeepSpeed 0.19.8 writes for this project's trainer
(ZeRO 0-3, fp32 and bf16, ``torch.serialization.get_unsafe_globals_in_checkpoint``):

* the ZeRO optimizer shards: DeepSpeed's ``ZeroStageEnum`` (the stage number), ``LossScaler`` and the
  ``fragment_address`` records of ``param_slice_mappings``;
* the model states, whenever the run set ``deepspeed.config``: the trainer hands DeepSpeed that part of its config
  as OmegaConf nodes, which DeepSpeed pickles into ``ds_config`` (``DictConfig``, ``ListConfig``, ``AnyNode``,
  their ``Metadata``, a ``defaultdict`` cache, ``typing.Any`` and the ``dict``/``list``/``int`` type objects).

They are allow-listed under their pickled names but mapped to inert stand-ins defined below (the three builtin types
map to themselves: calling them builds plain data), so reading a shard imports neither deepspeed nor omegaconf and no
file chooses which class is instantiated or which function is called. gq never reads those entries; it only needs
them not to stop the load. Nothing else is allowed.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Any, Mapping

from gq_model.storage import is_local_url

__all__ = ["load_torch_file", "TRUST_HINT"]

TRUST_HINT = ("If you trust the file, pass trust_checkpoint=True (CLI: --trust-checkpoint): it is then unpickled "
              "with weights_only=False, which runs whatever code the file names.")


class DeepSpeedZeroStage(int):
    """Stand-in for ``deepspeed.runtime.zero.config.ZeroStageEnum``: pickled as ``ZeroStageEnum(stage)``."""


class DeepSpeedRecord:
    """Stand-in for DeepSpeed's plain records (``LossScaler``, ``fragment_address``): only attributes, no code."""

    def __repr__(self) -> str:
        return f"DeepSpeedRecord({vars(self)})"


class ConfigRecord:
    """Stand-in for an OmegaConf node (``DictConfig``, ``ListConfig``, ``AnyNode``, ``Metadata``): attributes only."""


class InertMapping(dict):
    """Stand-in for ``collections.defaultdict``: a plain dict that ignores the default factory it is given."""

    def __init__(self, *factory_and_items):
        super().__init__()


class TypeMarker:
    """Stand-in for ``typing.Any``, which OmegaConf records as a node's type."""


_SAFE_STAND_INS = [
    (DeepSpeedZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (DeepSpeedRecord, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (DeepSpeedRecord, "deepspeed.utils.tensor_fragment.fragment_address"),
    *((ConfigRecord, f"omegaconf.{name}") for name in ("dictconfig.DictConfig", "listconfig.ListConfig",
                                                        "nodes.AnyNode", "base.Metadata", "base.ContainerMetadata")),
    (InertMapping, "collections.defaultdict"),
    (TypeMarker, "typing.Any"),
    (dict, "builtins.dict"),
    (list, "builtins.list"),
    (int, "builtins.int"),
]


def _refusal_reason(error: Exception) -> str:
    """The line of torch's long weights_only message that says what was refused (e.g. the unsupported global)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "Trying to" in line or "Can only" in line:
            return line
    return lines[0] if lines else type(error).__name__


def load_torch_file(source: str | os.PathLike | bytes, *, trust_checkpoint: bool = False, what: str | None = None,
                    storage_options: Mapping[str, Any] | None = None, mmap: bool = False) -> Any:
    """Unpickle a torch file (local path, fsspec URL or bytes) on CPU, ``weights_only`` unless trusted.

    ``what`` names the file in error messages (defaults to its path). ``mmap`` maps local files instead of reading
    them (DeepSpeed shards: only the fp32 weights are used, the optimizer moments are never paged in).
    """
    import torch

    name = what or (f"<{len(source)} bytes>" if isinstance(source, bytes) else os.fspath(source))
    if isinstance(source, bytes):
        target: Any = io.BytesIO(source)
        size = len(source)
    else:
        source = os.fspath(source)
        if is_local_url(source):
            path = source[len("file://"):] if source.startswith("file://") else source
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoint not found: {name}")
            target, size = path, os.path.getsize(path)
        else:
            from gq_model.storage import url_to_fs

            fs, path = url_to_fs(source, storage_options)
            try:
                with fs.open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise FileNotFoundError(f"checkpoint not found: {name}") from None
            target, size, mmap = io.BytesIO(data), len(data), False
    if size == 0:
        raise ValueError(f"checkpoint {name} is empty")
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": not trust_checkpoint}
    if mmap and isinstance(target, str):
        kwargs["mmap"] = True
    try:
        if trust_checkpoint:
            return torch.load(target, **kwargs)
        with torch.serialization.safe_globals(_SAFE_STAND_INS):
            return torch.load(target, **kwargs)
    except pickle.UnpicklingError as e:
        if not trust_checkpoint:
            raise ValueError(f"{name} holds objects other than tensors, which weights_only loading refuses "
                             f"({_refusal_reason(e)}). {TRUST_HINT}") from e
        raise ValueError(f"{name} could not be unpickled: {e}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{name} is not a readable torch checkpoint (truncated or corrupt?): {e}") from e
