"""Target divergence constraint (TDC): the KL regularizer that makes a Gaussian VAE quantizable by GQ.

Per latent group (m channels, the same strided grouping as the quantizer) the KL to N(0, I) is measured in bits and
pushed toward T = floor(log2 K): by the paper's theorem a codebook of K = 2^T Gaussian codewords then contains a
codeword within about one sigma of the posterior mean with overwhelming probability. The rule is the reference's:

* R[b, l, j] = 1.4426 * 1/2 * sum_{a in group j} (mu^2 + sigma^2 - 1 - log sigma^2)           (bits)
* weight w = lam_max if R > T + tol, lam_min if R < T - tol, else 1
* loss = lam * sum(w * R) / B                                  (with the lambdas from *before* this step's update)
* then lam *= f if mean(R) > T else /= f;  lam_max *= f if max(R) > T + tol else /= f, clipped to [1, 1e3];
  lam_min /= f if min(R) < T - tol else *= f, clipped to [1e-3, 1]

Two variants of that rule exist in the reference, selected here by name (:data:`TDC_VARIANTS`):

* ``gq`` (``GaussianQuantRegularizer``, every released config): the rule above, strided groups.
* ``gq2`` (``GaussianQuantRegularizer2``, the straight-through variant): *contiguous* groups (channels j*m .. j*m+m-1),
  ``loss = lam * mean(w * R)`` over every group of the batch (not a per-image sum), and lam_max / lam_min clipped to
  [1, 1e7] / [1e-7, 1]. The controllers see the same statistics (mean/min/max of R over the batch's groups).

``lam_max_only_grows`` reproduces a reference bug on purpose: in the release-era code (the one that trained the public
checkpoint) and in ``GaussianQuantRegularizer2`` the "else divide lam_max by f" statement has no effect, so lam_max
only ever grows (up to its cap). Off by default.

Unlike the reference the three lambdas are float64 buffers (saved with the model, restored on resume), lam is clamped
to [1e-7, 1e7], the statistics are all-reduced across ranks when torch.distributed is initialized (so every rank takes
the same step), and evaluation mode never mutates them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from gq_model.codebook import bits_per_index
from gq_model.quantizer import check_moments, to_groups

__all__ = ["TDCRegularizer", "kl_bits_per_group", "TDC_VARIANTS", "REDUCTIONS"]

# The reference's rounded 1/ln(2); keeping it makes losses match the reference to float precision.
KL_BITS_CONSTANT = 1.4426

# How the weighted per-group bits become one loss value: the v1 regularizer sums them per image and averages over the
# batch; the STE variant averages over every group of the batch (a factor groups-per-image smaller).
REDUCTIONS = ("sum_per_image", "mean")

# The reference's two regularizers, as TDCRegularizer keyword arguments (tolerance and lam_factor are shared: 0.5, 1.01).
TDC_VARIANTS: dict[str, dict] = {
    "gq": {"layout": "strided", "reduction": "sum_per_image", "lam_min_range": (1e-3, 1.0),
           "lam_max_range": (1.0, 1e3)},
    "gq2": {"layout": "contiguous", "reduction": "mean", "lam_min_range": (1e-7, 1.0), "lam_max_range": (1.0, 1e7)},
}


def kl_bits_per_group(mu: torch.Tensor, logvar: torch.Tensor, group: int, layout: str = "strided") -> torch.Tensor:
    """KL(q || N(0, I)) in bits for each group: ``[B,H,W,G]`` for 4-D latents, ``[B,L,G]`` for 3-D ones.

    ``logvar`` must already be clamped. Computed in float32 like the reference.
    """
    mu, logvar = mu.float(), logvar.float()
    per_channel = KL_BITS_CONSTANT * 0.5 * (mu * mu + torch.exp(logvar) - 1.0 - logvar)
    return to_groups(per_channel, group, layout).sum(dim=-1)


class TDCRegularizer(nn.Module):
    """The TDC KL loss with its three multiplicative controllers (see module docstring)."""

    def __init__(self, codebook_size: int = 65536, group: int = 16, tolerance: float = 0.5, lam_factor: float = 1.01,
                 logvar_range: tuple[float, float] = (-30.0, 20.0), layout: str = "strided",
                 lam_range: tuple[float, float] = (1e-7, 1e7), lam_min_range: tuple[float, float] = (1e-3, 1.0),
                 lam_max_range: tuple[float, float] = (1.0, 1e3), reduction: str = "sum_per_image",
                 lam_max_only_grows: bool = False):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if layout not in ("strided", "contiguous"):
            raise ValueError(f"layout must be strided or contiguous, got {layout!r}")
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        if lam_factor <= 1.0:
            raise ValueError(f"lam_factor must be > 1, got {lam_factor}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.codebook_size, self.group, self.layout = int(codebook_size), int(group), layout
        self.target_bits = float(bits_per_index(self.codebook_size))
        self.tolerance, self.lam_factor = float(tolerance), float(lam_factor)
        self.logvar_range = tuple(float(v) for v in logvar_range)
        self.lam_range, self.lam_min_range, self.lam_max_range = lam_range, lam_min_range, lam_max_range
        self.reduction, self.lam_max_only_grows = reduction, bool(lam_max_only_grows)
        for name in ("lam", "lam_min", "lam_max"):
            self.register_buffer(name, torch.ones((), dtype=torch.float64))
        # (sum of bits, groups counted, min, max) over the micro-batches accumulated since the last update. Empty at
        # every optimizer-step boundary, which is where checkpoints are taken, so it is never saved.
        self._pending: tuple[float, float, float, float] | None = None

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, group={self.group}, target_bits={self.target_bits}, "
                f"tolerance={self.tolerance}, lam_factor={self.lam_factor}, layout={self.layout!r}, "
                f"reduction={self.reduction!r}, lam_max_only_grows={self.lam_max_only_grows}")

    @torch.no_grad()
    def _global_stats(self, bits: torch.Tensor) -> tuple[float, float, float, float]:
        """(sum, count, min, max) of the per-group bits over this batch, across all ranks when distributed."""
        stats = torch.stack([bits.sum(), torch.tensor(float(bits.numel()), device=bits.device),
                             bits.max(), -bits.min()]).double()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            total = stats[:2].clone()
            extremes = stats[2:].clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
            stats = torch.cat([total, extremes])
        return float(stats[0]), float(stats[1]), float(-stats[3]), float(stats[2])

    @torch.no_grad()
    def _update(self, mean_bits: float, min_bits: float, max_bits: float) -> None:
        f, t, tol = self.lam_factor, self.target_bits, self.tolerance
        lam = float(self.lam) * (f if mean_bits > t else 1.0 / f)
        if max_bits > t + tol:
            lam_max = float(self.lam_max) * f
        else:  # the reference's bug (release era, gq2) left lam_max unchanged here instead of dividing it
            lam_max = float(self.lam_max) * (1.0 if self.lam_max_only_grows else 1.0 / f)
        lam_min = float(self.lam_min) / f if min_bits < t - tol else float(self.lam_min) * f
        self.lam.fill_(min(max(lam, self.lam_range[0]), self.lam_range[1]))
        self.lam_max.fill_(min(max(lam_max, self.lam_max_range[0]), self.lam_max_range[1]))
        self.lam_min.fill_(min(max(lam_min, self.lam_min_range[0]), self.lam_min_range[1]))

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor, update: bool | None = None, accumulate: bool = False
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """TDC loss for posterior (mu, logvar) in the quantizer's layouts, and statistics.

        Args:
            update: step the controllers after computing the loss. Defaults to ``self.training``; a training loop
                calls it with ``update=True`` once per generator step and ``update=False`` elsewhere.
            accumulate: this batch is one micro-batch of a generator step (gradient accumulation): its statistics
                are pooled with the step's other micro-batches, and the update at the step's last micro-batch uses
                the pooled mean/min/max, i.e. the same decision a single large batch would give.
        Returns: (scalar loss, {"bits_mean", "bits_min", "bits_max", "lam", "lam_min", "lam_max"}); the lambdas
            reported are the ones used in this loss (before the update).
        """
        check_moments(mu, logvar, self.group)
        logvar = logvar.float().clamp(*self.logvar_range)
        bits = kl_bits_per_group(mu, logvar, self.group, self.layout)
        lam, lam_min, lam_max = float(self.lam), float(self.lam_min), float(self.lam_max)
        with torch.no_grad():
            hi, lo = bits > self.target_bits + self.tolerance, bits < self.target_bits - self.tolerance
            weights = torch.where(hi, torch.full_like(bits, lam_max),
                                  torch.where(lo, torch.full_like(bits, lam_min), torch.ones_like(bits)))
        weighted = weights * bits
        loss = lam * (weighted.sum() / mu.shape[0] if self.reduction == "sum_per_image" else weighted.mean())
        total, count, min_bits, max_bits = self._global_stats(bits.detach())
        mean_bits = total / count
        pooled = (total, count, min_bits, max_bits)
        if accumulate and self._pending is not None:
            p = self._pending
            pooled = (total + p[0], count + p[1], min(min_bits, p[2]), max(max_bits, p[3]))
        if self.training if update is None else update:
            self._update(pooled[0] / pooled[1], pooled[2], pooled[3])
            self._pending = None
        elif accumulate:
            self._pending = pooled
        stats = {"bits_mean": mean_bits, "bits_min": min_bits, "bits_max": max_bits,
                 "lam": lam, "lam_min": lam_min, "lam_max": lam_max}
        return loss, stats
