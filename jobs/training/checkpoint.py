"""Checkpoints: DeepSpeed-sharded engine states plus everything needed to resume exactly, and reading weights back.

Layout under ``<out_dir>/checkpoints``::

    latest                       tag of the newest *complete* checkpoint (written last, atomically)
    gq_config.json               the GQConfig (also inside each tag), so export needs nothing else
    step_00001000/
      mp_rank_00_model_states.pt, *_optim_states.pt     generator engine (DeepSpeed layout, any ZeRO stage)
      disc/...                                          discriminator engine
      rank_states/rank_00000.pt                         per-rank torch/numpy/python RNG states and data position
      trainer_state.json                                step, data position, TDC lambdas, counters
      gq_config.json, train_config.yaml

``read_generator_state_dict`` turns the generator part of any stage into a full fp32 state dict: stage 0 (and the
plain-PyTorch engine) keep full weights in ``mp_rank_00_model_states.pt``; stages 1-3 go through DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint``.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

from gq_model import GQConfig, GQModel

__all__ = ["CKPT_SUBDIR", "tag_for_step", "resolve_checkpoint", "read_latest", "write_latest", "capture_rng",
           "restore_rng", "save_rank_state", "load_rank_state", "write_json", "read_generator_state_dict",
           "load_model_from_zero_checkpoint", "prune_checkpoints", "GQ_CONFIG_NAME"]

log = logging.getLogger(__name__)

CKPT_SUBDIR = "checkpoints"
GQ_CONFIG_NAME = "gq_config.json"
DATA_INDEX_NAME = "data_index.pt"
TRAINER_STATE_NAME = "trainer_state.json"
MODEL_PREFIX = "model."


def tag_for_step(step: int) -> str:
    return f"step_{int(step):08d}"


def write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_latest(ckpt_root: str) -> str | None:
    path = os.path.join(ckpt_root, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        tag = f.read().strip()
    return tag or None


def write_latest(ckpt_root: str, tag: str) -> None:
    tmp = os.path.join(ckpt_root, f"latest.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(tag)
    os.replace(tmp, os.path.join(ckpt_root, "latest"))


def resolve_checkpoint(path: str, tag: str | None = None) -> tuple[str, str]:
    """(checkpoint root, tag) from a run dir, a checkpoints dir (with ``latest``) or a tag dir."""
    path = os.path.abspath(os.fspath(path))
    if tag is None and os.path.isfile(os.path.join(path, "mp_rank_00_model_states.pt")):
        return os.path.dirname(path), os.path.basename(path)
    for root in (path, os.path.join(path, CKPT_SUBDIR)):
        if tag is not None and os.path.isdir(os.path.join(root, tag)):
            return root, tag
        if tag is None:
            latest = read_latest(root)
            if latest is not None:
                return root, latest
    raise FileNotFoundError(f"no checkpoint in {path}" + (f" with tag {tag!r}" if tag else
                                                        " (no 'latest' file; pass a tag or a tag directory)"))


# ---------------------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rank_state_path(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, "rank_states", f"rank_{rank:05d}.pt")


def save_rank_state(tag_dir: str, rank: int, state: dict[str, Any]) -> None:
    path = _rank_state_path(tag_dir, rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_rank_state(tag_dir: str, rank: int) -> dict[str, Any] | None:
    path = _rank_state_path(tag_dir, rank)
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)  # written by this trainer


def prune_checkpoints(ckpt_root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    tags = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step_") and os.path.isdir(os.path.join(ckpt_root, d)))
    latest = read_latest(ckpt_root)
    for tag in tags[:-keep_last]:
        if tag != latest:
            shutil.rmtree(os.path.join(ckpt_root, tag), ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------- export side
def _is_zero_checkpoint(tag_dir: str) -> bool:
    files = glob.glob(os.path.join(tag_dir, "*_optim_states.pt"))
    return any("zero_pp_rank" in os.path.basename(f) for f in files)


def read_generator_state_dict(ckpt_root: str, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the generator module (keys ``model.encoder.*``, ``model.decoder.*``, ``logvar``...)."""
    tag_dir = os.path.join(ckpt_root, tag)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"checkpoint {tag_dir} does not exist")
    if _is_zero_checkpoint(tag_dir):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_root, tag=tag)
    else:
        path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{tag_dir} has neither ZeRO optimizer shards nor mp_rank_00_model_states.pt")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed's own pickle
        sd = dict(ckpt["module"])
        sd.update(_fp32_master_weights(ckpt, tag_dir))
    return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in sd.items()}


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


def read_gq_config(ckpt_root: str, tag: str) -> GQConfig:
    for path in (os.path.join(ckpt_root, tag, GQ_CONFIG_NAME), os.path.join(ckpt_root, GQ_CONFIG_NAME)):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return GQConfig.from_dict(json.load(f))
    raise FileNotFoundError(f"{GQ_CONFIG_NAME} not found in {os.path.join(ckpt_root, tag)} or {ckpt_root}")


def load_model_from_zero_checkpoint(ckpt_dir: str, tag: str | None = None) -> GQModel:
    """A :class:`GQModel` (eval mode, fp32, CPU) from a training checkpoint of any ZeRO stage.

    ``ckpt_dir`` is a run dir, its ``checkpoints`` dir (``tag`` defaults to ``latest``) or one tag dir.
    """
    root, tag = resolve_checkpoint(ckpt_dir, tag)
    config = read_gq_config(root, tag)
    sd = read_generator_state_dict(root, tag)
    weights = {k[len(MODEL_PREFIX):]: v for k, v in sd.items()
               if k.startswith(MODEL_PREFIX + "encoder.") or k.startswith(MODEL_PREFIX + "decoder.")}
    model = GQModel(config)
    missing = sorted(set(model.state_dict()) - set(weights))
    unexpected = sorted(set(weights) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"checkpoint {root}/{tag} does not match its {GQ_CONFIG_NAME}: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    model.load_state_dict(weights, strict=True)
    return model.eval()
