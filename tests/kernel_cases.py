"""Synthetic codebook-search cases and their checks against the float64 oracle, shared by ``test_kernels.py`` (the
torch path) and ``test_kernels_triton.py`` (the Triton kernels under the interpreter), so both backends are held to
the same cases and the same tolerance rules (see ``test_kernels.py``'s docstring and docs/kernels.md section 4).
"""
from __future__ import annotations

import math

import torch

from kernels import gemm_to_log_ratio, prepare_features
from kernels.reference import (direct_scores_f64, float32_error_bound, float32_exact_dot, oracle_search,
                               term_magnitudes_f64)
from kernels.search_cpu import row_weights

DUP = 3  # codeword copied to other positions in the synthetic codebooks


def make_case(m: int, k_total: int, rows: int, seed: int = 0, beta: float = 1.0):
    """Synthetic codebook with copies of codeword DUP (same tile, other tiles, the last, partial tile) and posteriors
    with extreme log-variances (the clamp limits -30 and +20, mixed within a row) and rows sitting on the copied
    codeword.

    The rows on the copies (10-16) are built so that their float32 scores are *exact* (``float32_exact_dot``):
    logvar 0 (``exp(0) = 1`` on every libm), a dyadic codeword (entries +-2.5, or 5 for m = 1) and dyadic mu. Only
    then must every backend give the copies bitwise-equal scores and return the lowest index, whatever order its GEMM
    sums in (OpenBLAS's AVX2 sgemm under the Triton interpreter does not sum every column in the same order). With
    logvar 0 the score is ``2 mu.c + (beta - 1) c.c``: for beta < 1 its maximum is at ``c = mu / (1 - beta)``, so
    ``mu = (1 - beta) c_DUP``; for beta = 1 it is linear and the long codeword DUP has the largest projection on
    itself.
    """
    g = torch.Generator().manual_seed(seed)
    cb = torch.randn(k_total, m, generator=g)
    signs = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0)
    cb[DUP] = signs * (5.0 if m == 1 else 2.5)  # in 1-D the random codewords are dense: DUP in the sparse tail
    for pos in (DUP + 2, k_total // 2, k_total - 1):
        cb[pos] = cb[DUP]
    mu = 0.8 * torch.randn(rows, m, generator=g)
    lv = -1.4 + 0.5 * torch.randn(rows, m, generator=g)
    lv[0], lv[1] = -30.0, 20.0
    lv[2, : m // 2 + 1] = -30.0
    lv[3] = torch.linspace(-30.0, 20.0, m)
    lv[4, ::2] = 20.0
    on_dup = (1.0 - beta) * cb[DUP] if beta < 1 else cb[DUP]
    mu[10:16] = on_dup + torch.randint(-2, 3, (6, m), generator=g).float() / 64  # near DUP, still exact
    lv[10:17] = 0.0
    mu[16] = on_dup
    return cb, mu, lv



def check_against_oracle(got, mu, lv, cb, beta, max_tie_frac=0.02):
    """Every row equals the oracle's index, except genuine float32 ties between different codewords (their share
    bounded) and rows whose winner has copies with inexact float32 scores, where any copy of it is correct."""
    res = oracle_search(mu, lv, cb, beta)
    same_codeword = (cb[got] == cb[res.index]).all(dim=1)
    ok = (got == res.index) | res.ambiguous | (res.copies_open & same_codeword)
    bad = (~ok).nonzero().squeeze(1)
    assert bad.numel() == 0, f"{bad.numel()} mismatches outside float32 ties, rows {bad[:10].tolist()}"
    assert res.ambiguous.float().mean().item() <= max_tie_frac, \
        f"too many genuine ties: {res.ambiguous.float().mean().item():.3f}"
    return res.index, res.ambiguous



def check_exact_copies_resolve_low(got, mu, lv, cb, beta):
    """The rows make_case put on the copied codeword have exact float32 scores, so the lowest copy must win."""
    res = oracle_search(mu[10:17], lv[10:17], cb, beta)
    assert not res.copies_open.any() and not res.ambiguous.any(), "make_case's copy rows must be exact"
    assert (res.index == DUP).all() and (got[10:17] == DUP).all(), got[10:17].tolist()



def all_copies_case():
    """A codebook of 777 copies of one dyadic codeword and dyadic posteriors with logvar 0: every score is exact in
    float32 (asserted), so every row ties bitwise across all tiles and splits, in any summation order."""
    cb = torch.tensor([[0.5, -1.25, 2.0, 0.75]]).repeat(777, 1)
    g = torch.Generator().manual_seed(0)
    mu, lv = torch.randint(-16, 17, (50, 4), generator=g).float() / 8, torch.zeros(50, 4)
    assert float32_exact_dot(row_weights(mu, lv, 1.0), prepare_features(cb)[:1]).all()
    return cb, mu, lv



def check_topk(idx, val, mu, lv, cb, beta, k):
    """A top-k result is sorted (ties by index), its first column a correct argmax, its values the GEMM scores within
    the float32 bound, and its ranking the float64 one wherever no float32 tie makes the order open."""
    rows = mu.shape[0]
    assert idx.shape == (rows, k) and val.shape == (rows, k)
    assert idx.dtype == torch.int64 and val.dtype == torch.float32
    # sorted by descending score, equal scores in ascending index order
    assert (val[:, :-1] >= val[:, 1:]).all()
    eq = val[:, :-1] == val[:, 1:]
    assert (idx[:, :-1][eq] < idx[:, 1:][eq]).all()
    # column 0 is a correct argmax (the oracle's, up to ties and inexact copies)
    check_against_oracle(idx[:, 0], mu, lv, cb, beta, max_tie_frac=1.0)
    # GEMM scores = 2 * (float64 direct log-ratio score) + row constant, within the float32 bound
    s = direct_scores_f64(mu, lv, cb, beta)
    t = term_magnitudes_f64(mu, lv, cb, beta)
    tau = float32_error_bound(cb.shape[1])
    const = (mu.double() ** 2 * torch.exp(-lv.double()) + lv.double()).sum(1) + cb.shape[1] * (1 - beta) * math.log(
        2 * math.pi)
    g_exact = 2 * s.gather(1, idx) + const[:, None]
    f64_err = 1e-14 * (2 * s.gather(1, idx).abs() + const.abs()[:, None])  # the oracle's own rounding (cancellation)
    assert ((val.double() - g_exact).abs() <= tau * t.gather(1, idx) + f64_err).all()
    # the log-ratio conversion recovers the direct score (up to the same float32 error, halved)
    lr = gemm_to_log_ratio(val, mu, lv, beta).double()
    assert ((lr - s.gather(1, idx)).abs() <= 0.5 * tau * t.gather(1, idx) + 1e-4 * s.gather(1, idx).abs() + 1e-6).all()
    # The ranked list is the float64 one (stable sort: duplicates lowest index first) wherever no two consecutive
    # entries of the top k+1 are a float32 tie between different codewords.
    order = s.argsort(dim=1, descending=True, stable=True)[:, : k + 1]
    s_o, t_o, c_o = s.gather(1, order), t.gather(1, order), cb[order]
    dup = (c_o[:, 1:] == c_o[:, :-1]).all(dim=2)
    tie = (2 * (s_o[:, :-1] - s_o[:, 1:]) <= tau * (t_o[:, :-1] + t_o[:, 1:])) & ~dup
    # copies rank in index order only where their float32 scores are exact; elsewhere a GEMM may swap them
    exact = float32_exact_dot(row_weights(mu, lv, beta)[:, None, :], prepare_features(cb)[order])
    tie |= dup & ~(exact[:, 1:] & exact[:, :-1])
    clear = ~tie.any(dim=1)
    assert clear.float().mean() > 0.9
    assert torch.equal(idx[clear], order[clear, :k])
