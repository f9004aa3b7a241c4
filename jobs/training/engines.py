"""Process-group setup and the two training engines (DeepSpeed, or a plain-PyTorch stand-in with the same methods).

Launchers only differ in how ranks start: torchrun / the deepspeed launcher / Ray Train set RANK, WORLD_SIZE,
MASTER_ADDR, ...; a plain ``gq train`` gets single-process defaults here (MASTER_ADDR=127.0.0.1 and a free port) so
DeepSpeed never falls back to MPI discovery. Ray Train initializes the process group itself; it is reused.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gq_model.storage import write_atomic

__all__ = ["DistInfo", "setup_distributed", "ds_config", "make_engine", "PlainEngine", "broadcast_module",
           "free_port"]

log = logging.getLogger(__name__)


class DistInfo:
    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed and self.world_size > 1:
            dist.barrier()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _backend(name: str) -> str:
    if name and name != "auto":
        return name
    return "nccl" if torch.cuda.is_available() else "gloo"


def setup_distributed(use_deepspeed: bool, backend: str = "auto") -> DistInfo:
    """Initialize (or reuse) the process group; single-process runs get loopback defaults."""
    if not (dist.is_available() and dist.is_initialized()):
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("LOCAL_RANK", "0")
        if use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=_backend(backend), auto_mpi_discovery=False)
        elif int(os.environ["WORLD_SIZE"]) > 1:
            dist.init_process_group(backend=_backend(backend))
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device)


def ds_config(cfg: Any, stage: int, batch_size: int) -> dict[str, Any]:
    """The DeepSpeed config of one engine from the training config (deepspeed.config is merged on top)."""
    d = cfg.deepspeed
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(batch_size),
        "gradient_accumulation_steps": int(d.grad_accum),
        "zero_optimization": {"stage": int(stage)},
        "bf16": {"enabled": d.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if float(d.grad_clip) > 0:
        out["gradient_clipping"] = float(d.grad_clip)
    # A plain container: OmegaConf's nested nodes are no dicts, and a shallow dict() of them made every
    # deepspeed.config.zero_optimization.* override replace the whole block, dropping its stage.
    extra = d.config or {}
    if not isinstance(extra, dict):
        from omegaconf import OmegaConf

        extra = OmegaConf.to_container(extra, resolve=True)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers identical to rank ``src``'s (before any engine wraps them)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


def make_engine(module: nn.Module, params: list[nn.Parameter], cfg: Any, stage: int, batch_size: int,
                lr: float, betas, scheduler_fn=None):
    """(engine, optimizer) for ``module``: a DeepSpeed engine, or :class:`PlainEngine` when deepspeed is disabled.

    The optimizer is always a client ``torch.optim.Adam`` (no FusedAdam/CPUAdam op builds).
    """
    o = cfg.optim
    opt = torch.optim.Adam(params, lr=float(lr), betas=tuple(float(b) for b in betas), eps=float(o.eps),
                           weight_decay=float(o.weight_decay))
    sched = scheduler_fn(opt) if scheduler_fn is not None else None
    if not cfg.deepspeed.enabled:
        eng = PlainEngine(module, opt, sched, grad_accum=int(cfg.deepspeed.grad_accum),
                          grad_clip=float(cfg.deepspeed.grad_clip), bf16=cfg.deepspeed.precision == "bf16")
        return eng, opt
    import deepspeed

    engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched,
                                                   config=ds_config(cfg, stage, batch_size))
    return engine, optimizer


class PlainEngine(nn.Module):
    """A plain-PyTorch engine with DeepSpeed's training surface: forward, backward, step (with gradient accumulation,
    clipping and an all-reduce of gradients when distributed), is_gradient_accumulation_boundary, global_steps,
    save_checkpoint/load_checkpoint (writing ``mp_rank_00_model_states.pt`` with a ``module`` state dict, the layout of
    a ZeRO-0 DeepSpeed checkpoint, so ``gq export`` reads both)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler=None, grad_accum: int = 1,
                 grad_clip: float = 0.0, bf16: bool = False):
        super().__init__()
        self.module = module.to(torch.bfloat16) if bf16 else module
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.grad_accum, self.grad_clip = int(grad_accum), float(grad_clip)
        self.micro_steps = 0
        self.global_steps = 0
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        broadcast_module(self.module)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                for p in self._params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                grads = [p.grad for p in self._params]
                flat = torch._utils._flatten_dense_tensors(grads)  # one collective, like DDP's buckets
                dist.all_reduce(flat)
                flat.div_(dist.get_world_size())
                for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    g.copy_(synced)
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            self.global_steps += 1
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict | None = None,
                        save_latest: bool = False) -> None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank == 0:
            path = os.path.join(save_dir, tag)
            os.makedirs(path, exist_ok=True)
            state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                     "global_steps": self.global_steps, "micro_steps": self.micro_steps, "plain_engine": True,
                     **(client_state or {})}
            write_atomic(os.path.join(path, "mp_rank_00_model_states.pt"), lambda f: torch.save(state, f))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any):
        path = os.path.join(load_dir, tag, "mp_rank_00_model_states.pt")
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file
        self.module.load_state_dict(state.pop("module"), strict=True)
        self.optimizer.load_state_dict(state.pop("optimizer"))
        sched = state.pop("lr_scheduler")
        if self.lr_scheduler is not None and sched is not None:
            self.lr_scheduler.load_state_dict(sched)
        self.global_steps, self.micro_steps = int(state.pop("global_steps")), int(state.pop("micro_steps"))
        return path, state
