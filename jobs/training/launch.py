"""Ray Train launcher: the same loop, with ranks started by Ray Train's ``TorchTrainer``.

Ray Train creates the torch process group (gloo on CPU, NCCL with ``--ray-gpus``) and sets RANK/LOCAL_RANK/
WORLD_SIZE; the loop reuses that group for DeepSpeed. The config is read on the driver and shipped to the workers
as data, so workers need neither the driver's working directory nor its files; ``run.out_dir`` must be a path every
worker can write (a shared filesystem on multi-node clusters), since DeepSpeed writes checkpoints per rank.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

__all__ = ["run_with_ray"]


def _worker_loop(config: dict[str, Any]) -> None:
    if config.get("torch_extensions_dir"):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", config["torch_extensions_dir"])
    from jobs.training.loop import train

    summary = train(config["train_config"])
    try:
        import ray.train

        ray.train.report({"step": summary["step"]})
    except Exception:  # reporting is best effort: the run's own outputs are the checkpoints and metrics.jsonl
        pass


def run_with_ray(config: str, overrides: Sequence[str], num_workers: int, address: str | None = None,
                 cpus_per_worker: float = 1.0, use_gpu: bool = False) -> Any:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.training.config import load_config, to_container

    cfg = load_config(config, overrides)
    cfg.run.out_dir = os.path.abspath(cfg.run.out_dir)
    from gq_pipeline.ray_init import init_ray

    started = init_ray(address)
    ext = os.environ.get("TORCH_EXTENSIONS_DIR")
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"train_config": to_container(cfg),
                           "torch_extensions_dir": os.path.abspath(ext) if ext else None},
        scaling_config=ScalingConfig(num_workers=int(num_workers), use_gpu=bool(use_gpu),
                                     resources_per_worker={"CPU": float(cpus_per_worker),
                                                           **({"GPU": 1} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name="gq-train", storage_path=os.path.join(cfg.run.out_dir, "ray")),
    )
    try:
        return trainer.fit()
    finally:
        if started:
            ray.shutdown()
