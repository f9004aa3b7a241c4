"""Test oracles. The search oracles live in ``kernels.reference`` (shared with the kernel tests and benchmarks); this
module adapts them to the quantizer tests and adds a plain-Python restatement of the reference's TDC step."""
from __future__ import annotations

import torch

from kernels.reference import oracle_search


def oracle_indices(mu, logvar, codebook, beta):
    """(float64 argmax indices, is_clear): is_clear is False for rows that are genuine float32 ties."""
    res = oracle_search(mu, logvar, codebook, beta)
    return res.index, ~(res.ambiguous | res.copies_open)


def tdc_reference_step(bits: torch.Tensor, lam: float, lam_min: float, lam_max: float, target: float,
                       tol: float = 0.5, f: float = 1.01):
    """One TDC step written as plain Python loops: (loss_value, new lam, new lam_min, new lam_max)."""
    flat = bits.double().flatten().tolist()
    b = bits.shape[0]
    total = 0.0
    for r in flat:
        w = lam_max if r > target + tol else (lam_min if r < target - tol else 1.0)
        total += w * r
    loss = lam * total / b
    mean, lo, hi = sum(flat) / len(flat), min(flat), max(flat)
    lam = lam * f if mean > target else lam / f
    lam = min(max(lam, 1e-7), 1e7)
    lam_max = lam_max * f if hi > target + tol else lam_max / f
    lam_max = min(max(lam_max, 1.0), 1000.0)
    lam_min = lam_min / f if lo < target - tol else lam_min * f
    lam_min = min(max(lam_min, 0.001), 1.0)
    return loss, lam, lam_min, lam_max
