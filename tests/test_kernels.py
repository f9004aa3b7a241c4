"""The codebook search's torch path, API, custom-op registration and memory bound (CPU, in-process).

Every index check compares against the float64 *direct* formula (``kernels.reference.oracle_search``:
``sum_a log N(c_a; mu_a, var_a) - beta log N(c_a; 0, 1)``, no GEMM expansion). Rows whose float64 best codeword is
within the float32 error bound of another, different codeword (``kernels.reference.float32_error_bound``:
``2 (s_best - s_k) <= (2m + 8) 2^-24 (T_best + T_k)`` with T the sum of the absolute values of the score's terms)
are genuine float32 ties; they are excluded from the exact-equality check and their share is asserted to be small.
Bitwise copies of a codeword are not ties: the lowest index must win where their float32 scores are exact, and any
copy is correct where they are not (``OracleResult.copies_open``; docs/kernels.md section 4). The Triton kernel is
tested under the interpreter in ``test_kernels_triton.py``.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from gq_model.codebook import gaussian_codebook
from kernels import gemm_to_log_ratio, gq_search, gq_search_topk, prepare_features
from kernels.reference import (float32_error_bound, float32_exact_dot, oracle_search, profile_peak_bytes,
                               reference_search, term_magnitudes_f64)
from kernels.search_cpu import TILE_BUDGET_BYTES, row_weights, search_blocked, search_topk_blocked
from tests.kernel_cases import (DUP, all_copies_case, check_against_oracle, check_exact_copies_resolve_low, check_topk,
                                make_case)

CASES = [  # (m, K, rows, beta): K and rows not multiples of any tile size
    (1, 200, 301, 0.0), (1, 120, 257, 1.0), (4, 1000, 257, 0.5), (4, 1500, 300, 0.0),
    (8, 2500, 300, 1.0), (8, 999, 130, 0.5), (16, 3000, 300, 1.0), (16, 2047, 200, 0.0), (16, 1100, 70, 0.5),
    (32, 700, 65, 1.0),
]


@pytest.mark.parametrize("m,k_total,rows,beta", CASES)
def test_torch_path_matches_float64_oracle(m, k_total, rows, beta):
    cb, mu, lv = make_case(m, k_total, rows, seed=m * 7 + k_total, beta=beta)
    f = prepare_features(cb)
    got = gq_search(mu, lv, f, beta, backend="torch")
    assert got.dtype == torch.int64 and got.shape == (rows,)
    check_against_oracle(got, mu, lv, cb, beta)
    check_exact_copies_resolve_low(got, mu, lv, cb, beta)
    # Small tiles: many codebook tiles (running merge, the gathered-rows argmax branch) and partial row blocks.
    w = row_weights(mu, lv, beta)
    for br, bk in ((64, 256), (37, 100), (rows, 64)):
        small = search_blocked(w, f, block_rows=br, block_k=bk)
        check_against_oracle(small, mu, lv, cb, beta)
        check_exact_copies_resolve_low(small, mu, lv, cb, beta)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_all_extreme_logvar_rows(beta):
    """Every row at a clamp limit, or half and half: 1/var up to e^30 ~ 1e13 stresses the expanded GEMM form."""
    m, k_total = 8, 1200
    cb, mu, _ = make_case(m, k_total, 96, seed=11, beta=beta)
    lv = torch.empty(96, m)
    lv[:32] = -30.0
    lv[32:64] = 20.0
    lv[64:] = torch.where(torch.arange(m) % 2 == 0, -30.0, 20.0)
    got = gq_search(mu, lv, prepare_features(cb), beta, backend="torch")
    check_against_oracle(got, mu, lv, cb, beta, max_tie_frac=0.05)


def test_real_codebook_realistic_posteriors():
    """The released configuration: Sobol codebook K=65536, m=16, sigma ~ 0.5, mu ~ N(0, 0.8^2): zero mismatches."""
    cb = gaussian_codebook(65536, 16)
    g = torch.Generator().manual_seed(5)
    rows = 256
    mu = 0.8 * torch.randn(rows, 16, generator=g)
    lv = 2 * math.log(0.5) + 0.2 * torch.randn(rows, 16, generator=g)
    got = gq_search(mu, lv, prepare_features(cb), 1.0)  # auto -> torch on CPU
    ref, amb = check_against_oracle(got, mu, lv, cb, 1.0, max_tie_frac=0.0)
    assert torch.equal(got, ref)


def test_reference_algorithm_baseline_agrees():
    """The benchmark's baseline (the reference's chunked log-prob algorithm) picks the oracle's codewords too."""
    cb, mu, lv = make_case(16, 800, 64, seed=3)
    got = reference_search(mu, lv, cb, 1.0)
    check_against_oracle(got, mu, lv, cb, 1.0)
    assert torch.equal(reference_search(mu[:5], lv[:5], cb, 1.0), gq_search(mu[:5], lv[:5], prepare_features(cb)))


def test_ties_exact_and_lowest_index():
    """A codebook of copies: every row ties across all tiles; the answer is index 0 (torch.argmax semantics)."""
    cb, mu, lv = all_copies_case()
    f = prepare_features(cb)
    assert (gq_search(mu, lv, f, 1.0, backend="torch") == 0).all()
    w = row_weights(mu, lv, 1.0)
    assert (search_blocked(w, f, block_rows=16, block_k=100) == 0).all()
    idx, val = gq_search_topk(mu, lv, f, 1.0, 5, backend="torch")
    assert (idx == torch.arange(5)).all()
    assert (val == val[:, :1]).all()


def test_small_and_empty_inputs():
    cb, mu, lv = make_case(4, 300, 20)
    f = prepare_features(cb)
    assert gq_search(mu[:0], lv[:0], f).shape == (0,)
    one = gq_search(mu[:1], lv[:1], f)
    assert one.shape == (1,) and one.item() == oracle_search(mu[:1], lv[:1], cb, 1.0)[0].item()
    # fewer than 8 rows (the reference crashes there) and a single codeword
    assert gq_search(mu[:3], lv[:3], f[:1]).tolist() == [0, 0, 0]
    # float64 (or half) inputs are accepted and computed in float32
    assert torch.equal(gq_search(mu.double(), lv.double(), f.double()), gq_search(mu, lv, f))


def test_input_validation_and_backend_errors(monkeypatch):
    cb, mu, lv = make_case(4, 100, 20)
    f = prepare_features(cb)
    with pytest.raises(ValueError, match="backend"):
        gq_search(mu, lv, f, backend="cuda")
    with pytest.raises(ValueError, match=r"\[rows, m\]"):
        gq_search(mu, lv[:, :2], f)
    with pytest.raises(ValueError, match="2\\*m"):
        gq_search(mu, lv, f[:, :4])
    with pytest.raises(TypeError):
        gq_search(mu.long(), lv, f)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gq_search(mu, lv, f, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gq_search_topk(mu, lv, f, 1.0, 2, backend="triton")
    with pytest.raises(ValueError, match="k must be"):
        gq_search_topk(mu, lv, f, 1.0, 0)
    with pytest.raises(ValueError, match="k must be"):
        gq_search_topk(mu, lv, f, 1.0, 101)
    with pytest.raises(ValueError, match="score"):
        gq_search_topk(mu, lv, f, 1.0, 2, score="nats")


def test_triton_kernels_are_not_imported_by_the_torch_path():
    """kernels imports its Triton module lazily: the CPU path never builds (or needs) Triton kernels. (torch itself may
    import the triton package when it sets up custom ops; that is not ours to avoid.)"""
    import subprocess
    import sys
    code = ("import sys, torch; from kernels import gq_search, prepare_features; "
            "f = prepare_features(torch.randn(50, 4)); gq_search(torch.randn(3, 4), torch.zeros(3, 4), f); "
            "print('kernels.search_triton' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


# ---- top-k ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k_total,rows,beta,k", [(4, 1000, 130, 0.5, 5), (16, 2000, 100, 1.0, 8),
                                                   (1, 150, 64, 0.0, 3), (8, 600, 70, 1.0, 1)])
def test_topk_torch_path(m, k_total, rows, beta, k):
    cb, mu, lv = make_case(m, k_total, rows, seed=k_total, beta=beta)
    f = prepare_features(cb)
    idx, val = gq_search_topk(mu, lv, f, beta, k, backend="torch")
    check_topk(idx, val, mu, lv, cb, beta, k)
    if k >= 3:  # rows on the duplicated codeword: the three copies, lowest index first
        assert idx[16, :3].tolist() == [DUP, DUP + 2, k_total // 2]
    w = row_weights(mu, lv, beta)
    i2, v2 = search_topk_blocked(w, f, k, block_rows=33, block_k=max(k, 50))
    assert torch.equal(i2, idx)
    lr_idx, lr = gq_search_topk(mu, lv, f, beta, k, backend="torch", score="log_ratio")
    assert torch.equal(lr_idx, idx)
    assert torch.allclose(lr, gemm_to_log_ratio(val, mu, lv, beta))


def test_topk_boundary_ties_pick_lowest_indices():
    """More equal scores than k straddle the cut inside one tile: the lowest indices must be kept, in order.
    (beta 0, logvar 0: the score is ``-|c - mu|^2 + |mu|^2``, exact in float32 for these dyadic values.)"""
    base = torch.tensor([[0.5, -1.0, 1.5, 0.25]])
    cb = torch.cat([torch.randn(30, 4) * 0.1 + 5.0, base.repeat(10, 1), torch.randn(30, 4) * 0.1 + 5.0])
    mu, lv = base.repeat(3, 1), torch.zeros(3, 4)
    assert float32_exact_dot(row_weights(mu, lv, 0.0), prepare_features(base)).all()
    idx, val = gq_search_topk(mu, lv, prepare_features(cb), 0.0, 4, backend="torch")
    assert idx.tolist() == [[30, 31, 32, 33]] * 3


# ---- memory bound -----------------------------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    """torch.set_num_threads(1) for the test: the search then runs its row blocks inline on this thread, where the
    profiler sees every allocation (it does not record allocations made on other threads). With N threads the same
    per-block function runs on N workers at once, so the bound below is per worker thread."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def test_cpu_path_memory_is_bounded_not_rows_times_k(one_thread):
    """Peak allocation of the whole call stays at one score tile plus O(rows), independent of K (torch profiler
    memory events, not a stopwatch): a [rows, K] score matrix would be 655 MB here."""
    rows, m = 2500, 16  # five row blocks (4 x 512 + 452)
    g = torch.Generator().manual_seed(0)
    mu, lv = torch.randn(rows, m, generator=g), torch.zeros(rows, m)
    peaks = {}
    for k_total in (16384, 65536):
        f = prepare_features(torch.randn(k_total, m, generator=g))
        _, peaks[k_total] = profile_peak_bytes(gq_search, mu, lv, f, 1.0, backend="torch")
    # tile + at most a quarter tile of gathered improved rows + weights (4 B x 2m per row) and per-row vectors + slack
    bound = 1.25 * TILE_BUDGET_BYTES + (8 * m + 64) * rows + (256 << 10)
    assert max(peaks.values()) <= bound, peaks  # the same K-independent bound for 4x the codebook
    assert max(peaks.values()) < rows * 65536 * 4 / 100


def test_topk_memory_is_bounded(one_thread):
    rows, m, k = 2048, 16, 8
    g = torch.Generator().manual_seed(1)
    mu, lv = torch.randn(rows, m, generator=g), torch.zeros(rows, m)
    f = prepare_features(torch.randn(32768, m, generator=g))
    _, peak = profile_peak_bytes(gq_search_topk, mu, lv, f, 1.0, k, backend="torch")
    # the tile, a gathered copy of its improved rows (< 1/4 tile) and O(rows * k) candidate lists and sorts
    assert peak <= 1.25 * TILE_BUDGET_BYTES + 64 * rows * k + (8 * m + 64) * rows + (256 << 10), peak


def test_worker_threads_agree_and_leave_thread_settings_alone():
    """Row blocks on the worker pool, the codebook split across workers for small batches, and the inline path all
    return correct indices (the oracle's, up to float32 ties) and the same scores within the float32 bound. They use
    different tile shapes, and BLAS does not promise bitwise-equal dot products across shapes, so bitwise agreement
    is asserted only on rows whose scores are exact (make_case's copy rows). The caller's torch thread count, and
    that of threads created later, is unchanged."""
    import threading
    cb, mu, lv = make_case(16, 3000, 1200, seed=4)
    f = prepare_features(cb)
    w = row_weights(mu, lv, 1.0)
    tau = float32_error_bound(16)
    before = torch.get_num_threads()
    for rows in (1200, 40, 1):  # row blocks / codebook split / one row
        ref_i, ref_v = search_blocked(w[:rows], f, threads=1, return_scores=True)
        for threads in (2, 3):
            i, v = search_blocked(w[:rows], f, threads=threads, return_scores=True)
            check_against_oracle(i, mu[:rows], lv[:rows], cb, 1.0)
            t = term_magnitudes_f64(mu[:rows], lv[:rows], cb, 1.0).gather(1, i[:, None])[:, 0]
            assert ((v.double() - ref_v.double()).abs() <= 2 * tau * t).all(), (rows, threads)
            if rows > 16:
                assert torch.equal(i[10:17], ref_i[10:17]) and torch.equal(v[10:17], ref_v[10:17])
        ti, tv = search_topk_blocked(w[:rows], f, 4, threads=2)
        check_against_oracle(ti[:, 0], mu[:rows], lv[:rows], cb, 1.0)
    assert torch.get_num_threads() == before
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [before]


# ---- custom op / torch.compile ------------------------------------------------------------------------------------

def test_custom_op_registration_and_fake_impl():
    cb, mu, lv = make_case(4, 200, 24)
    f = prepare_features(cb)
    torch.library.opcheck(torch.ops.gq_kernels.search.default, (mu, lv, f, 1.0, "torch"),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.gq_kernels.search_topk.default, (mu, lv, f, 1.0, 3, "torch"),
                          test_utils=("test_schema", "test_faketensor"))


def test_model_calling_search_compiles():
    """A module that calls gq_search / gq_search_topk traces with torch.compile (fullgraph) through the fake impls;
    aot_eager keeps the test fast (no inductor C++ build)."""
    cb, mu, lv = make_case(8, 300, 40)
    f = prepare_features(cb)

    class Quant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("features", f)
            self.register_buffer("codebook", cb)

        def forward(self, mu, lv):
            idx = gq_search(mu, lv.clamp(-30, 20), self.features, 1.0, backend="torch")
            top, _ = gq_search_topk(mu, lv, self.features, 1.0, 2, backend="torch")
            return self.codebook[idx] * 2.0, top

    model = Quant()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    z, top = compiled(mu, lv)
    z_ref, top_ref = model(mu, lv)
    assert torch.equal(z, z_ref) and torch.equal(top, top_ref)


def test_full_float32_precision_whatever_the_global_setting():
    """A caller's torch.set_float32_matmul_precision('medium') (bf16 / TF32 inner products where the backend has
    them; this CPU has AVX512-BF16) must not reach the search: it runs at 'highest' and restores the setting."""
    cb, mu, lv = make_case(16, 1500, 100, seed=9)
    f = prepare_features(cb)
    seen = []
    real_matmul = torch.matmul

    def spy(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return real_matmul(*args, **kwargs)

    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        torch.matmul = spy
        got = gq_search(mu, lv, f, 1.0, backend="torch")
        idx, _ = gq_search_topk(mu, lv, f, 1.0, 3, backend="torch")
    finally:
        torch.matmul = real_matmul
        after = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(prev)
    assert seen and set(seen) == {"highest"}
    assert after == "medium"
    check_against_oracle(got, mu, lv, cb, 1.0)
    assert torch.equal(idx[:, 0], got)


def test_cpu_path_works_inside_inference_mode():
    """Pool threads must honour the caller's inference mode (its tensors are inference tensors)."""
    from gq_model import GaussianQuantizer

    q = GaussianQuantizer(codebook_size=4096, group=16)
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 16, 16, 16, generator=g), torch.full((4, 16, 16, 16), -1.0)
    expected, _ = q.quantize(mu, logvar)
    with torch.inference_mode():
        got, _ = q.quantize(mu, logvar)
    assert torch.equal(got, expected)
