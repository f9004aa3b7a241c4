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

Reading weights back (``read_generator_state_dict``, ``load_model_from_zero_checkpoint``, ``resolve_checkpoint``)
lives in :mod:`gq_model.zero_checkpoint`, re-exported here: it rebuilds the fp32 weights of any ZeRO stage itself,
reading every file ``weights_only`` (DeepSpeed's own consolidation unpickles with ``weights_only=False``), so
``--model RUN_DIR`` never runs code from the checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

from gq_model.storage import write_atomic
from gq_model.zero_checkpoint import (CKPT_SUBDIR, GQ_CONFIG_NAME, load_model_from_zero_checkpoint, read_gq_config,
                                      read_generator_state_dict, read_latest, resolve_checkpoint)

__all__ = ["CKPT_SUBDIR", "tag_for_step", "resolve_checkpoint", "read_latest", "write_latest", "capture_rng",
           "restore_rng", "save_rank_state", "load_rank_state", "write_json", "read_generator_state_dict",
           "load_model_from_zero_checkpoint", "read_gq_config", "prune_checkpoints", "GQ_CONFIG_NAME"]

log = logging.getLogger(__name__)

DATA_INDEX_NAME = "data_index.pt"
TRAINER_STATE_NAME = "trainer_state.json"


def tag_for_step(step: int) -> str:
    return f"step_{int(step):08d}"


def write_json(path: str, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True).encode("utf-8"))


def write_latest(ckpt_root: str, tag: str) -> None:
    """``latest`` names the newest complete checkpoint: written last, atomically and durably (gq_model.storage)."""
    write_atomic(os.path.join(ckpt_root, "latest"), tag.encode("utf-8"))


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
    write_atomic(path, lambda f: torch.save(state, f))


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
