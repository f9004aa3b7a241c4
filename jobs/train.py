"""``gq train CONFIG [key=value ...]``: train a GQ autoencoder (Gaussian VAE + TDC) with DeepSpeed.

One loop, several ways to start ranks (see docs/training.md):

* single process:    ``gq train configs/train_tiny.yaml``
* torchrun:          ``torchrun --nproc_per_node=8 -m jobs.train CONFIG ...`` (multi-node: --nnodes/--rdzv-*)
* deepspeed:         ``deepspeed --num_gpus 8 [--hostfile hosts] --module jobs.train CONFIG ...``
* Ray Train:         ``ray job submit --working-dir . -- python -m jobs.train CONFIG --ray-workers 8``
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # run as a script (jobs/train.py): jobs/tokenize.py must not shadow the stdlib tokenize

import argparse  # noqa: E402
from typing import Any  # noqa: E402

__all__ = ["add_parser", "run", "main"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training YAML (local path or fsspec URL)")
    p.add_argument("overrides", nargs="*", help="config overrides as section.key=value (e.g. run.max_steps=100)")
    p.add_argument("--ray-workers", type=int, default=0,
                   help="run the same loop under Ray Train's TorchTrainer with this many workers")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--ray-cpus-per-worker", type=float, default=1.0)
    p.add_argument("--ray-gpus", action="store_true", help="one GPU per Ray worker (NCCL)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a GQ autoencoder with DeepSpeed (ZeRO 0-3)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    local_ext = os.path.join(os.getcwd(), ".cache", "torch_extensions")
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.path.isdir(local_ext):
        os.environ["TORCH_EXTENSIONS_DIR"] = local_ext  # reuse the repository's DeepSpeed op cache (Makefile's)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if args.ray_workers and args.ray_workers > 0:
        from jobs.training.launch import run_with_ray

        run_with_ray(args.config, list(args.overrides), args.ray_workers, address=args.ray_address,
                     cpus_per_worker=args.ray_cpus_per_worker, use_gpu=args.ray_gpus)
        return 0
    from jobs.training.loop import train

    summary: dict[str, Any] = train(args.config, list(args.overrides))
    if summary.get("bundle") and int(os.environ.get("RANK", "0")) == 0:
        print(f"gq train: done at step {summary['step']}; bundle {summary['bundle']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
