"""Independent, slow re-statements of the reference's rules, used as test oracles (never imported by the library)."""
from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)


def score_float64(mu: torch.Tensor, logvar: torch.Tensor, codebook: torch.Tensor, beta: float) -> torch.Tensor:
    """[rows, K] float64 scores sum_a log N(c_ka; mu_a, var_a) - beta * log N(c_ka; 0, 1), the direct form
    (computed 16 rows at a time so the [rows, K, m] broadcast stays small)."""
    c = codebook.double()[None, :, :]
    log_p = -0.5 * c ** 2 - 0.5 * LOG_2PI
    out = []
    for i in range(0, mu.shape[0], 16):
        m, lv = mu[i:i + 16].double()[:, None, :], logvar[i:i + 16].double()[:, None, :]
        log_q = -0.5 * (c - m) ** 2 * torch.exp(-lv) - 0.5 * lv - 0.5 * LOG_2PI
        out.append((log_q - beta * log_p).sum(-1))
    return torch.cat(out) if out else torch.zeros(0, codebook.shape[0], dtype=torch.float64)


def tie_tolerance(mu: torch.Tensor, logvar: torch.Tensor, codebook: torch.Tensor, best: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """Per-row bound on the float32 rounding error of any float32 evaluation of the score (GEMM or direct).

    Each of the score's terms is at most inv_a (|mu_a| + |c_a|)^2 + beta c_a^2 in magnitude; float32 sums of 2m such
    terms carry a relative error of a few 1e-7 each, so a float64 gap below 1e-5 x that magnitude is a genuine tie.
    """
    c = codebook.double()[best]
    inv = torch.exp(-logvar.double())
    mag = (inv * (mu.double().abs() + c.abs()) ** 2 + abs(beta) * c ** 2 + 1.0).sum(-1)
    return 1e-5 * mag


def oracle_indices(mu, logvar, codebook, beta):
    """(argmax indices, is_clear) from the float64 oracle; is_clear is False for genuine float32 ties."""
    s = score_float64(mu, logvar, codebook, beta)
    top2 = s.topk(min(2, s.shape[1]), dim=1)
    best = s.argmax(dim=1)
    gap = (top2.values[:, 0] - top2.values[:, -1]) if s.shape[1] > 1 else torch.full_like(top2.values[:, 0], 1e30)
    return best, gap > tie_tolerance(mu, logvar, codebook, best, beta)


def reference_quantize_float32(mu_rows, logvar_rows, codebook, beta):
    """The reference's torch backend as described in gq-reference.md §1.4: float32 Normal log-probs over
    [rows/8, K, m] chunks, sum over m, argmax. Only for small K (it materializes the broadcast)."""
    std = torch.exp(0.5 * logvar_rows.float())
    normal_log_prob = torch.distributions.Normal(0.0, 1.0).log_prob(codebook.float())
    n = mu_rows.shape[0]
    bs = max(n // 8, 1)
    out = torch.empty(n, dtype=torch.long)
    for i in range(0, n, bs):
        q = torch.distributions.Normal(mu_rows[i:i + bs, None, :].float(), std[i:i + bs, None, :])
        s = (q.log_prob(codebook[None].float()) - beta * normal_log_prob[None]).sum(-1)
        out[i:i + bs] = s.argmax(dim=1)
    return out


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
