"""Observability on rank 0: progress bar (steps/s, ETA, loss terms, KL bits, lambdas, lr), TensorBoard scalars,
``metrics.jsonl`` (one line per step), PNG grids (originals / quantized / Gaussian-mean reconstructions) and codebook
usage/perplexity of the held-out batch."""
from __future__ import annotations

import json
import logging
import math
import os
import time

import numpy as np
import torch

from gq_model.metrics.codebook_usage import usage_stats
from gq_model.metrics.image import psnr as image_psnr

__all__ = ["Monitor", "codebook_stats", "image_grid", "psnr"]

log = logging.getLogger(__name__)

_BAR_KEYS = (("loss_g", "L"), ("nll", "nll"), ("bits_mean", "bits"), ("bits_min", "min"), ("bits_max", "max"),
             ("lam", "lam"), ("lam_min", "lmin"), ("lam_max", "lmax"), ("d_weight", "dw"), ("loss_d", "D"),
             ("lr", "lr"))


def codebook_stats(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage (fraction of the K codes used), perplexity (exp entropy of the code histogram) over all groups:
    ``gq_model.metrics.usage_stats`` under the training log's names."""
    s = usage_stats(torch.bincount(indices.reshape(-1).long().cpu(), minlength=codebook_size))
    return {"codebook_used": float(s["used"]), "codebook_usage": s["usage"], "codebook_perplexity": s["perplexity"],
            "codebook_entropy_bits": s["entropy_bits"]}


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of images in [-1, 1] (clamped): ``gq eval``'s definition."""
    return float(image_psnr(x.float(), y.float()).mean())


def image_grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of ``[N,3,H,W]`` images in [-1,1] -> an HxWx3 uint8 grid with 2-px gutters."""
    n, _, h, w = rows[0].shape
    pad = 2
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, batch in enumerate(rows):
        imgs = ((batch.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        for c in range(n):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y:y + h, x:x + w] = imgs[c].permute(1, 2, 0).numpy()
    return grid


class Monitor:
    """Rank-0 sink for metrics and images; a no-op object on other ranks."""

    def __init__(self, out_dir: str, enabled: bool, max_steps: int, start_step: int, progress: bool = True,
                 tensorboard: bool = True, log_every: int = 10):
        self.enabled, self.out_dir, self.log_every = enabled, out_dir, max(1, int(log_every))
        self.writer = None
        self.bar = None
        self._t0, self._s0 = time.time(), start_step
        self.metrics_file = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.metrics_file = open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except Exception as e:  # tensorboard missing: keep training, say so
                log.warning("TensorBoard disabled: %s", e)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="gq train", unit="step", dynamic_ncols=True,
                            smoothing=0.1)

    def step(self, step: int, logs: dict[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time(), 3), **{k: v for k, v in logs.items()}}
        self.metrics_file.write(json.dumps(rec) + "\n")
        self.metrics_file.flush()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({short: f"{logs[k]:.4g}" for k, short in _BAR_KEYS if k in logs}, refresh=False)
        if self.writer is not None and step % self.log_every == 0:
            for k, v in logs.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, step)
            elapsed = time.time() - self._t0
            if elapsed > 0 and step > self._s0:
                self.writer.add_scalar("perf/steps_per_s", (step - self._s0) / elapsed, step)
        if self.bar is None and step % self.log_every == 0:
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in logs.items()
                                                   if isinstance(v, (int, float))))

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps({"step": step, "kind": prefix, **values}) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def images(self, step: int, rows: list[torch.Tensor]) -> str | None:
        if not self.enabled:
            return None
        from PIL import Image

        grid = image_grid(rows)
        folder = os.path.join(self.out_dir, "images")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step_{step:08d}.png")
        Image.fromarray(grid).save(path)
        if self.writer is not None:
            self.writer.add_image("heldout/original_quantized_gaussian", grid, step, dataformats="HWC")
        return path

    def write(self, msg: str) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.write(msg)
            else:
                log.info(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
