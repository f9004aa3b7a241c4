"""Codebook usage, entropy and perplexity from exact per-group token counts.

The reference never measures these (its histogram code is commented out and ``cal_ent`` adds a 1e-5 bias inside the
log), so the README's "almost 100% usage" is unverified. Here the counts are exact int64 histograms, one per
sub-codebook position (group) plus their pooled total, so they can be summed across workers:

* usage = fraction of the K codewords used at least once;
* entropy H = -sum p log2 p over used codewords (bits; no smoothing);
* perplexity = 2^H, the "effective number of codewords" (K for a uniform distribution).

All groups index the same codebook in GQ, so the pooled histogram is meaningful too. Note that usage is bounded by the
number of tokens seen: with fewer than K tokens it cannot reach 1, so the report carries ``tokens`` as well.
"""
from __future__ import annotations

import math

import torch

__all__ = ["CodebookUsage", "usage_stats", "usage_summary", "run_usage"]


def usage_stats(counts: torch.Tensor) -> dict:
    """{usage, used, entropy_bits, perplexity, tokens} of one histogram of counts ``[K]``."""
    counts = counts.to(torch.int64)
    total = int(counts.sum())
    used = int((counts > 0).sum())
    if total == 0:
        return {"tokens": 0, "used": 0, "usage": 0.0, "entropy_bits": 0.0, "perplexity": 0.0}
    p = counts[counts > 0].double() / total
    h = float(-(p * torch.log2(p)).sum())
    return {"tokens": total, "used": used, "usage": used / counts.numel(), "entropy_bits": h,
            "perplexity": 2.0 ** h}


def usage_summary(counts, codebook_size: int | None = None, *, scope: str | None = None,
                  rounded: bool = True) -> dict:
    """The one codebook-usage vocabulary every report uses (run manifests, ``GQShardSink``, ``gq inspect``,
    ``gq demo``; the trainer logs the same words as ``codebook_used``/``codebook_usage``): ``tokens``,
    ``codebook_size``, ``used`` (codes seen at least once), ``usage`` (used / codebook_size), ``entropy_bits`` and
    ``perplexity`` (2**entropy) of a histogram of counts ``[K]`` (torch or numpy). ``rounded``: entropy to 4 and
    perplexity to 2 decimals, as JSON reports keep them."""
    counts = torch.as_tensor(counts).reshape(-1)
    k = int(codebook_size or counts.numel())
    s = usage_stats(counts)
    out = {"scope": scope} if scope else {}
    h, ppl = (round(s["entropy_bits"], 4), round(s["perplexity"], 2)) if rounded else (s["entropy_bits"],
                                                                                    s["perplexity"])
    out.update(tokens=s["tokens"], codebook_size=k, used=s["used"], usage=s["used"] / k if k else 0.0,
               entropy_bits=h, perplexity=ppl)
    return out


def run_usage(hist) -> dict:
    """The ``codebook_usage`` block of a run's report (``gq tokenize``'s manifest and summary, ``GQShardSink``'s):
    :func:`usage_summary` of the run's token histogram, or only ``tokens: 0`` when it tokenized nothing."""
    if hist is None or int(hist.sum()) == 0:
        return {"scope": "this run", "tokens": 0}
    return usage_summary(hist, scope="this run")


class CodebookUsage:
    """Per-group token histograms ``counts[G, K]``; ``add`` takes indices with the group axis at ``group_dim``."""

    def __init__(self, codebook_size: int, num_groups: int):
        self.codebook_size, self.num_groups = int(codebook_size), int(num_groups)
        self.counts = torch.zeros(self.num_groups, self.codebook_size, dtype=torch.int64)

    def add(self, indices: torch.Tensor, group_dim: int) -> None:
        """Count ``indices`` (``[B,G,h,w]`` with group_dim=1, or ``[B,L,G]`` with group_dim=-1)."""
        idx = indices.detach().to("cpu", torch.int64).movedim(group_dim, 0).reshape(self.num_groups, -1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.codebook_size):
            raise ValueError(f"token indices outside [0, {self.codebook_size})")
        offsets = (torch.arange(self.num_groups) * self.codebook_size).view(-1, 1)
        flat = torch.bincount((idx + offsets).reshape(-1), minlength=self.num_groups * self.codebook_size)
        self.counts += flat.view(self.num_groups, self.codebook_size)

    def report(self) -> dict:
        pooled = usage_stats(self.counts.sum(0))
        per_group = [usage_stats(c) for c in self.counts]
        return {**pooled, "codebook_size": self.codebook_size, "log2_codebook_size": math.log2(self.codebook_size),
                "per_group": [{k: g[k] for k in ("usage", "perplexity", "entropy_bits")} for g in per_group]}
