"""The fused Triton kernels, run on CPU under the Triton interpreter, against the float64 direct-formula oracle.

Isolation: ``TRITON_INTERPRET=1`` must be in the environment before ``triton.jit`` decorates our kernels, and it must
not leak into the other test modules of this pytest process (they import torch and ``kernels`` too). So this module
runs *itself* as a worker in one subprocess with the variable set (``python tests/test_kernels_triton.py OUT``); the
worker computes every case's Triton result and saves them, and the tests below (in the pytest process, without the
variable) regenerate the same inputs and check them against the oracle exactly as ``test_kernels.py`` checks the torch
path. Under the interpreter the kernels use one big-tile config (no autotuning), so the whole worker takes seconds.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # worker mode: make `tests.` importable like under pytest
    sys.path.insert(0, REPO)

from tests.kernel_cases import (DUP, all_copies_case, check_against_oracle, check_exact_copies_resolve_low,  # noqa: E402
                                check_topk, make_case)

# Each case is one interpreter launch (~0.3 s of fixed cost each, plus ~5 ms per tile iteration), so the list is a
# selection: every m in {1, 4, 8, 16, 32}, every beta, rows/K off the 256 x 1024 tile grid, and codebook splits
# (the int64 atomic-max merge) in some. The torch path runs the full CASES list in test_kernels.py.
ARGMAX_CASES = [(1, 200, 301, 0.0, None), (4, 1000, 257, 0.5, None), (8, 2500, 300, 1.0, 3),
                (16, 3000, 300, 1.0, None), (16, 2047, 200, 0.0, 2), (32, 700, 65, 1.0, None)]
TOPK_CASES = [(4, 1000, 130, 0.5, 5, None), (16, 2000, 100, 1.0, 8, 3), (1, 150, 64, 0.0, 3, None),
              (8, 600, 70, 1.0, 1, 2)]
EXTREME_BETAS = [0.0, 0.5, 1.0]


def extreme_case():
    m = 8
    cb, mu, _ = make_case(m, 1200, 96, seed=11)
    lv = torch.empty(96, m)
    lv[:32] = -30.0
    lv[32:64] = 20.0
    lv[64:] = torch.where(torch.arange(m) % 2 == 0, -30.0, 20.0)
    return cb, mu, lv


def real_case():
    from gq_model.codebook import gaussian_codebook
    g = torch.Generator().manual_seed(5)
    mu = 0.8 * torch.randn(256, 16, generator=g)
    lv = 2 * math.log(0.5) + 0.2 * torch.randn(256, 16, generator=g)
    return gaussian_codebook(65536, 16), mu, lv


def _worker(out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from kernels import gq_search, gq_search_topk, prepare_features
    from kernels import search_triton as st
    from kernels.search_cpu import row_weights
    assert st.INTERPRETED
    res = {}
    for m, k_total, rows, beta, splits in ARGMAX_CASES:
        cb, mu, lv = make_case(m, k_total, rows, seed=m * 7 + k_total, beta=beta)
        f = prepare_features(cb)
        if splits is None:
            res[("argmax", m, k_total, rows, beta, splits)] = gq_search(mu, lv, f, beta, backend="triton")
        else:
            idx, val = st.triton_argmax(row_weights(mu, lv, beta), f, splits=splits, return_scores=True)
            res[("argmax", m, k_total, rows, beta, splits)] = idx
            res[("argmax_scores", m, k_total, rows, beta, splits)] = val
    # the three betas' weights stacked into one launch (same codebook and posteriors)
    cb, mu, lv = extreme_case()
    w = torch.cat([row_weights(mu, lv, beta) for beta in EXTREME_BETAS])
    for beta, idx in zip(EXTREME_BETAS, st.triton_argmax(w, prepare_features(cb)).chunk(len(EXTREME_BETAS))):
        res[("extreme", beta)] = idx
    cb, mu, lv = real_case()
    res[("real",)] = gq_search(mu, lv, prepare_features(cb), 1.0, backend="triton")
    for m, k_total, rows, beta, k, splits in TOPK_CASES:
        cb, mu, lv = make_case(m, k_total, rows, seed=k_total, beta=beta)
        f = prepare_features(cb)
        if splits is None:
            res[("topk", m, k_total, rows, beta, k, splits)] = gq_search_topk(mu, lv, f, beta, k, backend="triton")
        else:
            res[("topk", m, k_total, rows, beta, k, splits)] = st.triton_topk(row_weights(mu, lv, beta), f, k,
                                                                              splits=splits)
    # all-equal codebook (every score ties across tiles and splits), no rows, auto stays on torch for CPU tensors
    cb, mu, lv = all_copies_case()
    res[("allties",)] = st.triton_argmax(row_weights(mu, lv, 1.0), prepare_features(cb), splits=2)
    res[("allties_topk",)] = st.triton_topk(row_weights(mu, lv, 1.0), prepare_features(cb), 5, splits=2)
    res[("empty",)] = gq_search(mu[:0], lv[:0], prepare_features(cb), 1.0, backend="triton")  # no launch
    res[("empty_topk",)] = gq_search_topk(mu[:0], lv[:0], prepare_features(cb), 1.0, 2, backend="triton")
    import kernels.search as ks
    res[("auto_cpu",)] = ks.resolve_backend("auto", torch.device("cpu"))
    torch.save(res, out_path)


if __name__ == "__main__":
    _worker(sys.argv[1])
    sys.exit(0)


pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def tr(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton_interp") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out)


@pytest.mark.parametrize("m,k_total,rows,beta,splits", ARGMAX_CASES)
def test_triton_argmax_matches_float64_oracle(tr, m, k_total, rows, beta, splits):
    cb, mu, lv = make_case(m, k_total, rows, seed=m * 7 + k_total, beta=beta)
    got = tr[("argmax", m, k_total, rows, beta, splits)]
    assert got.dtype == torch.int64 and got.shape == (rows,)
    check_against_oracle(got, mu, lv, cb, beta)
    check_exact_copies_resolve_low(got, mu, lv, cb, beta)  # copies in the same tile, later tiles, the last tile
    if splits is not None:  # the packed atomic merge across codebook splits also returns the winning GEMM score
        from kernels import prepare_features
        from kernels.search_cpu import row_weights
        w = row_weights(mu, lv, beta).double()  # the float32 weights the kernel used, exactly
        f = prepare_features(cb).double()
        exact = (w @ f.T).gather(1, got[:, None])[:, 0]
        mag = (w.abs() @ f.abs().T).gather(1, got[:, None])[:, 0]
        val = tr[("argmax_scores", m, k_total, rows, beta, splits)].double()
        # only the dot product's own rounding is left: 2m terms, gamma_2m ~ 2m * 2^-24 relative to sum |w_j f_j|
        assert ((val - exact).abs() <= (2 * m + 2) * 2.0 ** -24 * mag).all()


@pytest.mark.parametrize("beta", EXTREME_BETAS)
def test_triton_extreme_logvar(tr, beta):
    cb, mu, lv = extreme_case()
    check_against_oracle(tr[("extreme", beta)], mu, lv, cb, beta, max_tie_frac=0.05)


def test_triton_real_codebook_realistic_posteriors(tr):
    cb, mu, lv = real_case()
    got = tr[("real",)]
    check_against_oracle(got, mu, lv, cb, 1.0, max_tie_frac=0.0)
    from kernels import gq_search, prepare_features
    assert torch.equal(got, gq_search(mu, lv, prepare_features(cb), 1.0, backend="torch"))


@pytest.mark.parametrize("m,k_total,rows,beta,k,splits", TOPK_CASES)
def test_triton_topk(tr, m, k_total, rows, beta, k, splits):
    cb, mu, lv = make_case(m, k_total, rows, seed=k_total, beta=beta)
    idx, val = tr[("topk", m, k_total, rows, beta, k, splits)]
    check_topk(idx, val, mu, lv, cb, beta, k)
    if k >= 3:
        assert idx[16, :3].tolist() == [DUP, DUP + 2, k_total // 2]


def test_triton_ties_empty_and_auto(tr):
    assert (tr[("allties",)] == 0).all()
    idx, val = tr[("allties_topk",)]
    assert (idx == torch.arange(5)).all() and (val == val[:, :1]).all()
    assert tr[("empty",)].shape == (0,)
    assert tr[("empty_topk",)][0].shape == (0, 2)
    assert tr[("auto_cpu",)] == "torch"
