"""Slow, obviously-correct versions of the GQ search, for tests and benchmarks (never used by the fast paths).

* :func:`reference_search` is the reference repository's torch algorithm as ``docs/gq-reference.md`` §1.4 describes it:
  rows in 8 chunks, a ``[rows/8, K, m]`` Normal log-prob tensor per chunk, sum over m, argmax over K (float32). It is
  the baseline of ``benchmarks/bench_search.py``.
* :func:`oracle_search` evaluates the *direct* score ``sum_a log N(c_a; mu_a, var_a) - beta log N(c_a; 0, 1)`` in
  float64 and says which rows are genuine float32 ties (see :func:`float32_error_bound`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["reference_search", "direct_scores_f64", "term_magnitudes_f64", "float32_error_bound", "float32_exact_dot",
           "OracleResult", "oracle_search", "profile_peak_bytes"]

_LOG_2PI = math.log(2.0 * math.pi)


@torch.no_grad()
def reference_search(mu: torch.Tensor, logvar: torch.Tensor, codebook: torch.Tensor, beta: float = 1.0,
                     chunks: int = 8) -> torch.Tensor:
    """The reference's torch backend: ``chunks`` row chunks, each materialising ``[rows/chunks, K, m]`` log-probs.

    (The reference's chunk size ``rows // 8`` is 0 for fewer than 8 rows and crashes; here it is at least 1.)
    """
    mu, logvar, codebook = mu.float(), logvar.float(), codebook.float()
    std = torch.exp(0.5 * logvar)
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(codebook)  # [K, m]
    out = torch.empty(mu.shape[0], dtype=torch.long, device=mu.device)
    bs = max(1, mu.shape[0] // chunks)
    for r0 in range(0, mu.shape[0], bs):
        post = torch.distributions.Normal(mu[r0:r0 + bs, None, :], std[r0:r0 + bs, None, :])
        score = (post.log_prob(codebook[None]) - beta * prior[None]).sum(-1)  # [bs, K]
        out[r0:r0 + bs] = score.argmax(-1)
    return out


@torch.no_grad()
def direct_scores_f64(mu: torch.Tensor, logvar: torch.Tensor, codebook: torch.Tensor, beta: float) -> torch.Tensor:
    """``[rows, K]`` float64 ``sum_a log N(c_ka; mu_a, var_a) - beta log N(c_ka; 0, 1)``, term by term (no GEMM
    expansion), accumulated one dimension at a time so memory stays ``rows x K``."""
    mu, logvar, cb = mu.double(), logvar.double(), codebook.double()
    inv_var = torch.exp(-logvar)
    out = torch.zeros(mu.shape[0], cb.shape[0], dtype=torch.float64, device=mu.device)
    for a in range(cb.shape[1]):
        c = cb[:, a][None, :]
        log_q = -0.5 * ((c - mu[:, a, None]) ** 2 * inv_var[:, a, None] + logvar[:, a, None] + _LOG_2PI)
        log_p = -0.5 * (c * c + _LOG_2PI)
        out += log_q - beta * log_p
    return out


@torch.no_grad()
def term_magnitudes_f64(mu: torch.Tensor, logvar: torch.Tensor, codebook: torch.Tensor, beta: float) -> torch.Tensor:
    """``T[r, k] = sum_a 2|mu_a c_a|/var_a + c_a^2/var_a + |beta| c_a^2``: the sum of the absolute values of every
    term the float32 GEMM score is built from (in GEMM units, i.e. 2x the log-ratio score)."""
    mu, cb = mu.double(), codebook.double()
    inv_var = torch.exp(-logvar.double())
    return ((2.0 * mu.abs() * inv_var) @ cb.abs().T + inv_var @ (cb * cb).T
            + abs(float(beta)) * (cb * cb).sum(1)[None, :])


def float32_error_bound(m: int) -> float:
    """Relative bound ``tau`` such that ``|G32_k - G_k| <= tau * T_k`` for the float32 GEMM score of one codeword.

    Rounding steps, each at most u = 2^-24 relative to the term magnitudes in ``T``: ``exp`` (<= 2u with SLEEF/libm),
    the products ``2 mu/var`` and ``c*c`` and the subtraction ``1/var - beta`` (1u each), each product ``w_j f_j`` (1u),
    and the dot product of n = 2m terms (``gamma_n ~ n u`` for any summation order, FMA or not). That is at most
    (2m + 5) u; we use (2m + 8) u for slack. Two codewords whose exact GEMM scores differ by at most
    ``tau (T_a + T_b)`` can swap order in float32: a genuine tie at this precision.
    """
    return (2 * m + 8) * 2.0 ** -24


def float32_exact_dot(weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """True where the float32 dot product ``weights[r] . features[r]`` is exact in *every* evaluation order.

    ``weights`` and ``features`` are float32 ``[..., n]`` (broadcastable). Sufficient condition, checked in float64
    (which holds the product of two float32 values exactly): every product ``w_j f_j`` is a float32 value, and
    ``sum_j |w_j f_j| <= 2^24 g`` where ``g`` is the largest power of two dividing every nonzero product. Then every
    partial sum, in any order, with or without FMA, is a multiple of ``g`` no larger than ``2^24 g`` in magnitude,
    i.e. exactly representable, so no step rounds. Only then do two bitwise-equal codewords get bitwise-equal scores
    wherever they sit in a GEMM: BLAS kernels sum columns in position-dependent orders (OpenBLAS's AVX2 sgemm, and the
    numpy matmul behind ``tl.dot`` under ``TRITON_INTERPRET=1``, measurably do).
    """
    w, f = torch.broadcast_tensors(weights.float(), features.float())
    p = w.double() * f.double()
    representable = (p.float().double() == p) & torch.isfinite(p)
    nonzero = p != 0
    mant, expo = torch.frexp(p)  # p = mant * 2^expo, 0.5 <= |mant| < 1
    ints = (mant.abs() * 2.0 ** 53).to(torch.int64)  # exact: a float64 mantissa is 53 bits
    low_bit = torch.log2((ints & -ints).clamp(min=1).double()).round().to(torch.int64)
    lowest = torch.where(nonzero, expo.to(torch.int64) - 53 + low_bit, torch.full_like(expo, 10 ** 6,
                                                                                     dtype=torch.int64))
    g = lowest.amin(dim=-1)
    total = p.abs().sum(dim=-1)
    # float64 rounding of the total is far below the margin kept here (2^-30 relative)
    limit = torch.ldexp(torch.ones_like(total), (g + 24).clamp(max=1000).to(torch.int32))
    fits = total * (1.0 + 2.0 ** -30) <= limit
    return representable.all(dim=-1) & (fits | ~nonzero.any(dim=-1))


class OracleResult(NamedTuple):
    """What a correct float32 search may return for each row (see :func:`oracle_search`)."""

    index: torch.Tensor  # int64 [rows]: float64 argmax; the lowest index among bitwise copies of the winner
    ambiguous: torch.Tensor  # bool [rows]: a *different* codeword is within the float32 bound (a genuine tie)
    gap: torch.Tensor  # float64 [rows]: best-to-runner-up gap, log-ratio units
    copies_open: torch.Tensor  # bool [rows]: the winner has copies and its float32 score is not provably exact, so
    #                            a GEMM may rank the copies in any order: any copy is a correct answer


def _direct_scores_at(mu: torch.Tensor, logvar: torch.Tensor, cand: torch.Tensor, beta: float) -> torch.Tensor:
    """Direct float64 score (as :func:`direct_scores_f64`) of candidate codewords ``cand`` ``[rows, C, m]``."""
    mu, logvar = mu.double()[:, None, :], logvar.double()[:, None, :]
    c = cand.double()
    log_q = -0.5 * ((c - mu) ** 2 * torch.exp(-logvar) + logvar + _LOG_2PI)
    log_p = -0.5 * (c * c + _LOG_2PI)
    return (log_q - beta * log_p).sum(-1)


@torch.no_grad()
def oracle_search(mu: torch.Tensor, logvar: torch.Tensor, codebook: torch.Tensor, beta: float, *,
                  row_chunk: int = 256) -> OracleResult:
    """Float64 argmax of the direct score, lowest index among exactly equal codewords, and what float32 leaves open.

    Returns an :class:`OracleResult`. ``ambiguous[r]`` is True when some codeword that differs from the winner scores
    within the float32 error bound of it, ``2 (s_best - s_k) <= tau (T_best + T_k)`` (the factor 2 converts
    log-ratio units to GEMM units), so a correct float32 implementation may return either; ``gap`` is the
    best-to-runner-up score gap in log-ratio units. Bitwise copies of the winner must lose to the lowest index only
    where their float32 score is exact (:func:`float32_exact_dot` on the float32 weights every backend computes,
    ``kernels.search_cpu.row_weights``); elsewhere ``copies_open[r]`` says that any copy is correct.

    For speed with K = 65536 the direct formula is evaluated only on candidates: every codeword whose float64 GEMM-form
    score is within ``2 tau max_k T + 1e-9 max_k T`` of the row's float64 GEMM maximum. The float64 GEMM form is off by
    at most ~(2m + 8) 2^-53 T ~ 1e-14 T, so that set contains the direct-formula winner and every codeword that could be
    a float32 tie with it, by a margin of five orders of magnitude.
    """
    from kernels.search import prepare_features  # noqa: PLC0415 (the float32 inputs every path uses)
    from kernels.search_cpu import row_weights  # noqa: PLC0415

    cb = codebook.float().cpu()
    feats32 = prepare_features(cb)
    cb64 = cb.double()
    feats = torch.cat([cb64, cb64 * cb64], dim=1)
    tau = float32_error_bound(cb.shape[1])
    idx, amb, gap, open_ = [], [], [], []
    for r0 in range(0, mu.shape[0], row_chunk):
        m_, l_ = mu[r0:r0 + row_chunk].cpu().double(), logvar[r0:r0 + row_chunk].cpu().double()
        inv_var = torch.exp(-l_)
        g = torch.cat([2.0 * m_ * inv_var, -(inv_var - beta)], dim=1) @ feats.T  # float64 GEMM form
        t = term_magnitudes_f64(m_, l_, cb, beta)
        t_max = t.amax(dim=1, keepdim=True)
        g_max = g.amax(dim=1, keepdim=True)
        within = g >= g_max - (2 * tau + 1e-9) * t_max
        n_cand = int(within.sum(dim=1).max())
        cand = g.topk(n_cand, dim=1).indices.sort(dim=1).values  # ascending index: argmax picks the lowest
        s = _direct_scores_at(m_, l_, cb[cand], beta)  # [rows, C]
        tc = t.gather(1, cand)
        # candidates that are not within the window are only padding from topk: harmless, they score lower
        j = s.argmax(dim=1)
        best = cand.gather(1, j[:, None])[:, 0]
        s_best = s.gather(1, j[:, None])
        t_best = tc.gather(1, j[:, None])
        other = (cb[cand] != cb[best][:, None, :]).any(dim=2)
        close = (2.0 * (s_best - s) <= tau * (t_best + tc)) & other
        amb.append(close.any(dim=1))
        runner = torch.where(other, s, torch.full_like(s, -math.inf)).amax(dim=1)
        # no distinct candidate: the runner-up is outside the window; estimate its gap from the GEMM form
        outside = torch.where(within, torch.full_like(g, -math.inf), g).amax(dim=1)
        gap_r = torch.where(torch.isfinite(runner), s_best[:, 0] - runner, 0.5 * (g_max[:, 0] - outside))
        gap.append(gap_r)
        idx.append(best)
        has_copies = (cb[None, :, :] == cb[best][:, None, :]).all(dim=2).sum(dim=1) > 1
        w32 = row_weights(mu[r0:r0 + row_chunk].cpu(), logvar[r0:r0 + row_chunk].cpu(), beta)
        open_.append(has_copies & ~float32_exact_dot(w32, feats32[best]))
    if not idx:
        empty = torch.zeros(0, dtype=torch.int64)
        return OracleResult(empty, empty.bool(), empty.double(), empty.bool())
    return OracleResult(torch.cat(idx), torch.cat(amb), torch.cat(gap), torch.cat(open_))


def profile_peak_bytes(fn, *args, **kwargs):
    """Run ``fn`` under ``torch.profiler`` with memory profiling; return ``(result, peak_bytes)``.

    ``peak_bytes`` is the high-water mark of the torch allocations ``fn`` itself made (every ``[memory]`` event,
    alloc positive and free negative, summed in time order), including its outputs; tensors that existed before the
    call do not count. Not a stopwatch: the profiler slows ops down but does not change what they allocate.
    """
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args, **kwargs)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return result, peak
