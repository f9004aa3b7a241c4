"""Codebook-size advisor: is this model's K large enough for the rate its posterior actually spends on this data?

GQ quantizes each group of m latent channels to one of K Gaussian codewords. The paper's theorem (per dimension, R the
KL(q || N(0,1)) in nats, |mu*sigma| <= c1): if log K = R + t then

    P(|z_hat - mu| >= sigma) <= exp(-e^t * sqrt(2/pi) * e^(-c1 - 1/2)),

a bound that decays doubly exponentially in the surplus t; below the rate (log K = R - t) quantization fails with
probability approaching 1. The reference applies it per *group* (TDC pushes each group's KL toward log2 K bits), and
so does this advisor: the per-group KL in bits is the bits-back rate of a token.

Rule (documented in docs/eval.md):

1. R_p = the ``percentile``-th percentile (default 99) of the measured per-group KL bits: most tokens, not the mean
   token, must be representable;
2. c1 = the same percentile of |mu| * sigma over latent dimensions (the theorem's assumption, measured);
3. margin t (nats) = the smallest surplus for which the bound is <= ``delta``:
   t = ln ln(1/delta) - ln sqrt(2/pi) + c1 + 1/2. The default delta = P(|z - mu| >= sigma) for an exact posterior
   sample z ~ N(mu, sigma^2) = 1 - erf(1/sqrt 2) ~ 0.317: the quantized latent is guaranteed to be no worse than a
   posterior sample, which is what bits-back coding assumes. (t ~ 0.86 + c1 nats ~ 1.25 + 1.44 c1 bits.)
4. required bits = R_p + t / ln 2; recommended K = the smallest power of two with log2 K >= required bits.

Verdict: ``sufficient`` (log2 K >= required), ``marginal`` (log2 K >= R_p, the paper's guideline, but without the
theorem's margin), ``insufficient`` (log2 K < R_p: the theorem's lower bound says those groups are mis-quantized).
"""
from __future__ import annotations

import math

import torch

__all__ = ["Histogram", "theorem_margin_nats", "theorem_bound", "advise", "POSTERIOR_SAMPLE_MISS"]

POSTERIOR_SAMPLE_MISS = 1.0 - math.erf(1.0 / math.sqrt(2.0))  # P(|N(0,1)| >= 1) = 0.3173
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class Histogram:
    """Fixed-bin histogram with under/overflow bins and exact n/sum/sumsq/min/max; merges by addition.

    Percentiles interpolate linearly inside a bin (error <= one bin width); a percentile that falls in the overflow
    bin returns the exact maximum, so it never under-states the tail.
    """

    def __init__(self, lo: float, hi: float, bins: int):
        self.lo, self.hi, self.bins = float(lo), float(hi), int(bins)
        self.counts = torch.zeros(self.bins + 2, dtype=torch.int64)
        self.moments = torch.zeros(3, dtype=torch.float64)  # n, sum, sum of squares
        self.extremes = torch.tensor([-math.inf, -math.inf], dtype=torch.float64)  # max, -min

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().reshape(-1).to("cpu", torch.float64)
        if v.numel() == 0:
            return
        if not bool(torch.isfinite(v).all()):
            raise ValueError("histogram values must be finite")
        width = (self.hi - self.lo) / self.bins
        pos = torch.floor((v - self.lo) / width).clamp(-1, self.bins).to(torch.int64) + 1
        self.counts += torch.bincount(pos, minlength=self.bins + 2)
        self.moments += torch.stack([torch.tensor(float(v.numel()), dtype=torch.float64), v.sum(), (v * v).sum()])
        self.extremes = torch.maximum(self.extremes, torch.stack([v.max(), -v.min()]))

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float:
        """Value below which a fraction ``q`` (0..1) of the samples lie."""
        n = self.n
        if n == 0:
            raise ValueError("empty histogram")
        vmax, vmin = float(self.extremes[0]), -float(self.extremes[1])
        target = q * n
        cum = torch.cumsum(self.counts, 0)
        rank = max(1, math.ceil(target))  # 1-based rank of the wanted sample
        i = int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype))[0])  # first bin with cum >= rank
        i = min(i, self.bins + 1)
        if i == 0:
            return vmin
        if i == self.bins + 1:
            return vmax
        width = (self.hi - self.lo) / self.bins
        before = int(cum[i - 1]) if i > 0 else 0
        inside = int(self.counts[i])
        frac = (target - before) / inside if inside else 0.0
        value = self.lo + (i - 1 + min(max(frac, 0.0), 1.0)) * width
        return min(max(value, vmin), vmax)

    def fraction_above(self, x: float) -> float:
        """Fraction of samples in bins lying entirely above ``x`` (so exact to one bin width, never over-stated)."""
        width = (self.hi - self.lo) / self.bins
        k = math.floor((x - self.lo) / width) + 1  # counts index of the bin holding x
        k = min(max(k, 0), self.bins + 1)
        return float(self.counts[k + 1:].sum()) / max(self.n, 1)

    def summary(self) -> dict:
        n, s, ss = (float(v) for v in self.moments)
        mean = s / n if n else float("nan")
        std = math.sqrt(max(ss / n - mean * mean, 0.0)) if n else float("nan")
        return {"count": int(n), "mean": mean, "std": std, "min": -float(self.extremes[1]),
                "max": float(self.extremes[0]),
                "percentiles": {p: self.quantile(float(p) / 100.0) for p in ("1", "50", "90", "99", "99.9")}}

    def state(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts, "moments": self.moments, "extremes": self.extremes}

    def load(self, state: dict[str, torch.Tensor]) -> "Histogram":
        self.counts = state["counts"].to(torch.int64).clone()
        self.moments = state["moments"].to(torch.float64).clone()
        self.extremes = state["extremes"].to(torch.float64).clone()
        return self


def theorem_margin_nats(delta: float = POSTERIOR_SAMPLE_MISS, c1: float = 0.0) -> float:
    """Smallest surplus t (nats) with exp(-e^t sqrt(2/pi) e^(-c1-1/2)) <= delta."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return math.log(math.log(1.0 / delta)) - math.log(_SQRT_2_OVER_PI) + c1 + 0.5


def theorem_bound(t_nats: float, c1: float = 0.0) -> float:
    """The theorem's upper bound on P(|z_hat - mu| >= sigma) for a surplus of ``t_nats`` (informative for t > 0)."""
    return math.exp(-math.exp(min(t_nats, 700.0)) * _SQRT_2_OVER_PI * math.exp(-c1 - 0.5))


def advise(kl_bits: Histogram, codebook_size: int, c1: float, percentile: float = 99.0,
           delta: float = POSTERIOR_SAMPLE_MISS) -> dict:
    """Apply the rule above to a histogram of per-group KL bits; returns the JSON-able advice."""
    log2k = math.log2(codebook_size)
    rate = kl_bits.quantile(percentile / 100.0)
    margin_bits = theorem_margin_nats(delta, c1) / math.log(2.0)
    required = rate + margin_bits
    rec_log2 = max(1, math.ceil(required - 1e-9))
    guideline_log2 = max(1, math.ceil(rate - 1e-9))
    verdict = "sufficient" if log2k >= required else ("marginal" if log2k >= rate else "insufficient")
    surplus_nats = (log2k - rate) * math.log(2.0)
    return {
        "rule": f"log2 K >= p{percentile:g}(per-group KL bits) + theorem margin(delta={delta:.4g}, c1)",
        "percentile": percentile, "delta": delta, "c1": c1,
        "rate_bits": rate, "margin_bits": margin_bits, "required_bits": required,
        "codebook_size": int(codebook_size), "log2_codebook_size": log2k,
        "verdict": verdict, "suffices": verdict == "sufficient",
        "recommended_log2": rec_log2, "recommended_codebook_size": 2 ** rec_log2 if rec_log2 <= 62 else None,
        "guideline_log2": guideline_log2,
        "bound_at_this_k": theorem_bound(surplus_nats, c1) if surplus_nats > 0 else 1.0,
        "fraction_groups_over_log2k": kl_bits.fraction_above(log2k),
    }
