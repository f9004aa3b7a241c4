"""Reading a DeepSpeed training checkpoint (ZeRO stage 0, 1, 2 or 3, any number of ranks) back into a GQModel.

DeepSpeed's own consolidation (``deepspeed.utils.zero_to_fp32``) unpickles every shard with ``weights_only=False``,
so a checkpoint folder from elsewhere could run code just by being passed as ``--model``. This reader opens every
file through :func:`gq_model.safe_load.load_torch_file` instead, and rebuilds the fp32 weights itself from the layout
DeepSpeed writes:

* stage 0 (and the trainer's plain-PyTorch engine): ``mp_rank_00_model_states.pt`` holds the whole ``module``; with
  bf16 the fp32 master copies sit in ``optimizer["fp32_groups"]`` in parameter order, and those are the weights;
* stages 1 and 2: each rank's ``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` holds one flat slice of every
  parameter group (``single_partition_of_fp32_groups``); the slices of one group, concatenated in rank order, are
  the group's parameters back to back (``param_shapes`` in the model-states file, each followed by its
  ``param_alignment_paddings`` entry), padded at the end to a multiple of 2 x world size;
* stage 3: every parameter is split into ``ceil(numel / world_size)`` pieces, piece r living in rank r's
  ``fp32_flat_groups``; a parameter is its pieces in rank order, cut to ``numel``.

Layout of a checkpoint root (see ``jobs/training/checkpoint.py``, which writes it): ``latest`` names the newest tag,
``gq_config.json`` the architecture, ``<tag>/`` the engine files.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any

import torch

from gq_model.safe_load import load_torch_file

__all__ = ["CKPT_SUBDIR", "GQ_CONFIG_NAME", "read_latest", "resolve_checkpoint", "is_deepspeed_checkpoint",
           "read_gq_config", "read_generator_state_dict", "read_zero_checkpoint", "load_model_from_zero_checkpoint"]

log = logging.getLogger(__name__)

CKPT_SUBDIR = "checkpoints"
GQ_CONFIG_NAME = "gq_config.json"
MODEL_PREFIX = "model."
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_MODEL_FILE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_00_model_states\.pt$")


def _check_tag(tag: str, where: str) -> str:
    """A tag names one folder inside the checkpoint root: never a path that leaves it."""
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag or "\0" in tag:
        raise ValueError(f"{where}: checkpoint tag {tag!r} is not a folder name inside the checkpoint")
    return tag


def read_latest(ckpt_root: str) -> str | None:
    """The tag in ``<ckpt_root>/latest`` (None when there is no such file or it is empty)."""
    path = os.path.join(ckpt_root, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        tag = f.read().strip()
    return _check_tag(tag, path) if tag else None


def _has_model_states(tag_dir: str) -> bool:
    return os.path.isdir(tag_dir) and any(_MODEL_FILE.match(n) for n in os.listdir(tag_dir))


def resolve_checkpoint(path: str, tag: str | None = None) -> tuple[str, str]:
    """(checkpoint root, tag) from a run dir, a checkpoints dir (with ``latest``) or a tag dir."""
    path = os.path.abspath(os.fspath(path))
    if tag is None and _has_model_states(path):
        return os.path.dirname(path), os.path.basename(path)
    for root in (path, os.path.join(path, CKPT_SUBDIR)):
        if tag is not None and os.path.isdir(os.path.join(root, _check_tag(tag, path))):
            return root, tag
        if tag is None:
            latest = read_latest(root)
            if latest is not None:
                return root, latest
    raise FileNotFoundError(f"no checkpoint in {path}" + (f" with tag {tag!r}" if tag else
                                                        " (no 'latest' file; pass a tag or a tag directory)"))


def is_deepspeed_checkpoint(path: str) -> bool:
    """Whether a local directory is a run dir, checkpoints dir or tag dir of a training checkpoint."""
    path = os.fspath(path)
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "latest"))
                                    or os.path.isfile(os.path.join(path, CKPT_SUBDIR, "latest"))
                                    or _has_model_states(path))


def read_gq_config(ckpt_root: str, tag: str):
    from gq_model.config import GQConfig

    for path in (os.path.join(ckpt_root, tag, GQ_CONFIG_NAME), os.path.join(ckpt_root, GQ_CONFIG_NAME)):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return GQConfig.from_dict(json.load(f))
    raise FileNotFoundError(f"{GQ_CONFIG_NAME} not found in {os.path.join(ckpt_root, tag)} or {ckpt_root}")


# ------------------------------------------------------------------------------------------------------ file reading
def _ranked_files(tag_dir: str, pattern: re.Pattern) -> list[tuple[int, str]]:
    found = []
    for name in os.listdir(tag_dir):
        m = pattern.match(name)
        if m:
            found.append((int(m.group(1) or 0), os.path.join(tag_dir, name)))
    return sorted(found)


def _load(path: str, trust_checkpoint: bool) -> dict[str, Any]:
    obj = load_torch_file(path, trust_checkpoint=trust_checkpoint, mmap=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a DeepSpeed checkpoint file (a {type(obj).__name__}, not a dict)")
    return obj


def _fp32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in sd.items()}


def read_generator_state_dict(ckpt_root: str, tag: str, *, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the generator module (keys ``model.encoder.*``, ``model.decoder.*``, ``logvar``...).

    Every file is read ``weights_only`` unless ``trust_checkpoint`` (see :mod:`gq_model.safe_load`).
    """
    tag_dir = os.path.join(ckpt_root, _check_tag(tag, ckpt_root))
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"checkpoint {tag_dir} does not exist")
    optim_files = _ranked_files(tag_dir, _OPTIM_FILE)
    model_files = _ranked_files(tag_dir, _MODEL_FILE)
    if not model_files:
        raise FileNotFoundError(f"{tag_dir} has no DeepSpeed model states file (mp_rank_00_model_states.pt)")
    model_states = _load(model_files[0][1], trust_checkpoint)
    if not isinstance(model_states.get("module"), dict):
        raise ValueError(f"{model_files[0][1]} has no 'module' state dict")
    if not optim_files:
        sd = dict(model_states["module"])
        sd.update(_fp32_master_weights(model_states, tag_dir))
        return _fp32(sd)
    return _fp32(_zero_state_dict(tag_dir, model_states, [p for _, p in optim_files], trust_checkpoint))


def _zero_state_dict(tag_dir: str, model_states: dict, optim_paths: list[str], trust: bool) -> dict[str, torch.Tensor]:
    shapes = model_states.get("param_shapes")
    if not shapes:
        raise ValueError(f"{tag_dir}: the model states have no param_shapes, so the ZeRO shards cannot be unflattened")
    if model_states.get("frozen_param_shapes"):
        raise ValueError(f"{tag_dir}: the checkpoint has frozen (non-trainable) parameters, which gq's trainer never "
                         f"writes; it was not made by gq train")
    optim = []
    for path in optim_paths:
        state = _load(path, trust).get("optimizer_state_dict")
        if not isinstance(state, dict) or "zero_stage" not in state:
            raise ValueError(f"{path} is not a ZeRO optimizer shard (no optimizer_state_dict.zero_stage)")
        optim.append(state)
    stage = int(optim[0]["zero_stage"])
    counts = optim[0].get("partition_count")
    world = max(counts) if isinstance(counts, (list, tuple)) else int(counts)
    if world != len(optim):
        raise ValueError(f"{tag_dir}: the shards say the run had {world} ranks but {len(optim)} optimizer shards are "
                         f"present (a rank's files are missing, or an older checkpoint was partly overwritten)")
    buffers = set(model_states.get("buffer_names") or ())
    sd = {k: v for k, v in model_states["module"].items() if k in buffers}
    if stage in (1, 2):
        sd.update(_unflatten_zero12(tag_dir, shapes, [s["single_partition_of_fp32_groups"] for s in optim],
                                    optim[0].get("param_alignment_paddings"), world))
    elif stage == 3:
        sd.update(_unflatten_zero3(tag_dir, shapes, [s["fp32_flat_groups"] for s in optim], world))
    else:
        raise ValueError(f"{tag_dir}: unknown ZeRO stage {stage}")
    for alias, target in (model_states.get("shared_params") or {}).items():
        if target in sd:
            sd[alias] = sd[target]
    return sd


def _numel(shape) -> int:
    return int(math.prod(tuple(shape)))


def _unflatten_zero12(where: str, shapes: list[dict], rank_groups: list[list[torch.Tensor]], paddings,
                      world: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    align = 2 * world
    for g, group_shapes in enumerate(shapes):
        flat = torch.cat([groups[g].reshape(-1) for groups in rank_groups])
        pads = paddings[g] if paddings is not None else [0] * len(group_shapes)
        if len(pads) != len(group_shapes):
            raise ValueError(f"{where}: group {g} has {len(group_shapes)} parameters but {len(pads)} paddings")
        offset = 0
        for (name, shape), pad in zip(group_shapes.items(), pads):
            n = _numel(shape)
            if offset + n > flat.numel():
                raise ValueError(f"{where}: the ZeRO shards of group {g} end before parameter {name}")
            out[name] = flat[offset:offset + n].view(tuple(shape)).clone()
            offset += n + int(pad)
        if math.ceil(offset / align) != math.ceil(flat.numel() / align):
            raise ValueError(f"{where}: group {g} holds {flat.numel()} values but its parameters take {offset}: "
                             f"the shards do not match the model states")
    return out


def _unflatten_zero3(where: str, shapes: list[dict], rank_groups: list[list[torch.Tensor]],
                     world: int) -> dict[str, torch.Tensor]:
    flats = [torch.cat([t.reshape(-1) for t in groups]) for groups in rank_groups]
    if len({f.numel() for f in flats}) != 1:
        raise ValueError(f"{where}: the ZeRO-3 shards of the ranks differ in size")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for group_shapes in shapes:
        for name, shape in group_shapes.items():
            n = _numel(shape)
            piece = math.ceil(n / world)
            if offset + piece > flats[0].numel():
                raise ValueError(f"{where}: the ZeRO-3 shards end before parameter {name}")
            out[name] = torch.cat([f[offset:offset + piece] for f in flats])[:n].view(tuple(shape)).clone()
            offset += piece
    if offset != flats[0].numel():
        raise ValueError(f"{where}: the ZeRO-3 shards hold {flats[0].numel()} values per rank but the parameters take "
                         f"{offset}: the shards do not match the model states")
    return out


def _fp32_master_weights(ckpt: dict, where: str) -> dict[str, torch.Tensor]:
    """ZeRO-0 with bf16 keeps bf16 weights in ``module`` and the fp32 master copies in the optimizer's
    ``fp32_groups`` (one tensor per trainable parameter, in parameter order); export those, not bf16 casts."""
    module = ckpt.get("module") or {}
    if not any(v.is_floating_point() and v.dtype != torch.float32 for v in module.values()):
        return {}
    groups = (ckpt.get("optimizer") or {}).get("fp32_groups")
    buffers = set(ckpt.get("buffer_names") or ())
    names = [k for k in module if k not in buffers]
    flat = [t for g in groups or () for t in g]
    if not flat or len(flat) != len(names) or any(module[n].shape != t.shape for n, t in zip(names, flat)):
        log.warning("%s: no fp32 master weights matching the module's parameters were found; exporting its "
                    "low-precision weights cast to fp32", where)
        return {}
    return {n: t.float() for n, t in zip(names, flat)}


def read_zero_checkpoint(ckpt_dir: str, tag: str | None = None, *, trust_checkpoint: bool = False
                         ) -> tuple[Any, dict[str, torch.Tensor], str]:
    """``(GQConfig, encoder/decoder state dict in fp32, "root/tag")`` of a training checkpoint of any ZeRO stage.

    ``ckpt_dir`` is a run dir, its ``checkpoints`` dir (``tag`` defaults to ``latest``) or one tag dir. The model is
    assembled by :func:`gq_model.loading.load_model_from_zero_checkpoint`.
    """
    root, tag = resolve_checkpoint(ckpt_dir, tag)
    config = read_gq_config(root, tag)
    sd = read_generator_state_dict(root, tag, trust_checkpoint=trust_checkpoint)
    weights = {k[len(MODEL_PREFIX):]: v for k, v in sd.items()
               if k.startswith(MODEL_PREFIX + "encoder.") or k.startswith(MODEL_PREFIX + "decoder.")}
    return config, weights, f"{root}/{tag}"


def __getattr__(name: str):
    """``load_model_from_zero_checkpoint`` moved to :mod:`gq_model.loading` (it assembles a model); the old path
    still works."""
    if name == "load_model_from_zero_checkpoint":
        from gq_model.loading import load_model_from_zero_checkpoint

        return load_model_from_zero_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
