"""Blocked torch implementation of the GQ codebook search (the CPU path, and the fallback everywhere).

Scores are ``W @ F.T`` with row weights ``W = [2 mu/var, -(1/var - beta)]`` (``[rows, 2m]``) and the fixed table
``F = [c, c*c]`` (``[K, 2m]``); the argmax over K of that equals the reference's argmax of
``sum log N(c; mu, var) - beta * log N(c; 0, 1)`` (see ``docs/kernels.md`` for the derivation). We never hold the
``[rows, K]`` score matrix: rows and codewords are walked in tiles whose score block stays in a core's L2 cache, and
each tile's best is merged into a running (value, index) per row.

Why the CPU loop looks the way it does (the measurements behind each point are in ``docs/benchmarks.md``,
"Codebook search"; they are kept there only):

* The GEMM has an inner dimension of only 2m = 32, so it is cheap, and a full ``max(dim=1)`` with indices costs as much
  as the GEMM itself: matmul + ``max`` per tile tops out near 40% of the float32 matmul peak.
* ``amax`` (values only) is a fast vectorised pass. So per tile we take ``amax`` and compare it with the running best;
  only the rows whose best *strictly* improved need an index, and those are few after the first tiles (a row improves
  about ln(#tiles) times over a random codebook order). The argmax runs over the whole tile when many rows improved,
  and over just the improved rows (gathered) otherwise. The index found is that of the very score ``amax`` returned,
  so the result is exactly the argmax of the float32 scores this loop computed: no recomputation, no second rounding.
* Row blocks are spread over a small pool of worker threads whose torch ops are single-threaded, instead of letting
  every small tile op fork/join torch's intra-op threads. On an idle machine both reach the same speed; with other
  processes competing for the cores the intra-op version collapses (every op waits at a barrier for a descheduled
  thread), while the pool does not, since each worker proceeds on its own.
* A fused ``torch.compile`` (inductor) variant of ``matmul + max`` ran far below this eager loop, so it is not used.

Ties go to the lowest index: inside a tile ``argmax`` returns the first maximum, and tiles are merged with a strict
``>`` so an equal score in a later tile never replaces an earlier one.

Peak extra memory per worker thread is one ``[block_rows, block_k]`` float32 score tile (``TILE_BUDGET_BYTES`` = 1 MiB,
one core's L2 here) plus at most a quarter tile of gathered improved rows and a few ``[block_rows]`` vectors; on top
of that the O(rows) weights and outputs. Nothing depends on K or on rows x K.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["row_weights", "ieee_float32_matmul", "search_blocked", "search_topk_blocked", "merge_topk", "plan_tiles",
           "search_threads", "TILE_BUDGET_BYTES", "MAX_BLOCK_ROWS"]

# One score tile per worker: 1 MiB = 512 x 512 floats, one core's L2 on the 2-core machine (docs/benchmarks.md).
TILE_BUDGET_BYTES = 1 << 20
# Rows per task: the GEMM's M dimension and what one amax / argmax pass covers; tasks are queued to the workers.
MAX_BLOCK_ROWS = 512
# Smallest codebook tile (a multiple of 64 keeps BLAS on its full-width kernels).
MIN_BLOCK_K = 256
# Above this fraction of improved rows in a tile, the whole-tile argmax is cheaper than gathering the improved rows.
_FULL_ARGMAX_FRACTION = 0.25
# Below this many rows per worker, the workers split the codebook instead of the rows (tiny GEMMs are inefficient).
_MIN_ROWS_PER_WORKER = 64
# Rows re-selected at a time when a top-k cut falls inside a run of equal scores (keeps those temporaries small).
_TIE_CHUNK_ROWS = 64


def row_weights(mu: torch.Tensor, logvar: torch.Tensor, beta: float) -> torch.Tensor:
    """``[rows, 2m]`` float32 weights whose dot product with ``[c, c*c]`` is the GQ score up to a per-row constant.

    ``w = [2 mu / var, -(1 / var - beta)]`` with ``1/var = exp(-logvar)``; ``w . [c, c*c]`` equals twice the
    reference log-ratio score plus a per-row constant (``docs/kernels.md``).
    """
    mu = mu.to(torch.float32)
    inv_var = torch.exp(-logvar.to(torch.float32))
    return torch.cat([2.0 * mu * inv_var, -(inv_var - float(beta))], dim=1).contiguous()


def plan_tiles(rows: int, k_total: int, *, workers: int = 1, block_rows: int | None = None,
               block_k: int | None = None, budget_bytes: int = TILE_BUDGET_BYTES) -> tuple[int, int]:
    """Tile shape ``(block_rows, block_k)`` whose float32 score block fits ``budget_bytes``.

    Row blocks are up to ``MAX_BLOCK_ROWS`` rows, smaller when that gives every worker a block; the codebook tile gets
    the rest of the budget (at least ``MIN_BLOCK_K``, a multiple of 64), so small batches stream the codebook in a few
    wide tiles instead of many narrow ones.
    """
    budget = max(1, budget_bytes // 4)
    if block_rows is None:
        block_rows = min(MAX_BLOCK_ROWS, max(1, -(-rows // max(1, workers))))
    if block_k is None:
        block_k = max(MIN_BLOCK_K, (budget // block_rows) // 64 * 64)
    return max(1, int(block_rows)), max(1, min(int(block_k), max(k_total, 1)))


@contextlib.contextmanager
def ieee_float32_matmul():
    """Run float32 matmuls at full precision (no TF32 / bf16 inner products) inside the block, whatever
    ``torch.set_float32_matmul_precision`` the caller chose; the setting is restored afterwards. (It is process-global:
    a thread that changes it concurrently may see our value for the duration of a search.)"""
    prev = torch.get_float32_matmul_precision()
    if prev == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


# ---- worker pool ------------------------------------------------------------------------------------------------

_POOL_LOCK = threading.Lock()
_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _single_threaded_worker_init(barrier: threading.Barrier) -> None:
    # torch.set_num_threads sets this thread's OpenMP/MKL thread count and the process-wide default that *new* threads
    # read on their first parallel op; get_num_threads performs that lazy initialisation now, while the default is 1.
    torch.set_num_threads(1)
    torch.get_num_threads()
    barrier.wait()


def search_threads() -> int:
    """Worker threads the CPU path uses: ``torch.get_num_threads()`` of the calling thread (set it to 1, e.g. in a
    Ray actor that owns one core, and the search runs inline on the caller's thread)."""
    return max(1, torch.get_num_threads())


def _pool(workers: int) -> ThreadPoolExecutor:
    """A persistent pool of ``workers`` threads whose torch ops run single-threaded (created on first use)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL[0] == workers:
            return _POOL[1]
        if _POOL is not None:
            _POOL[1].shutdown(wait=False)
        prev = torch.get_num_threads()
        barrier = threading.Barrier(workers + 1)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gq-search",
                                  initializer=_single_threaded_worker_init, initargs=(barrier,))
        for _ in range(workers):  # start every worker now, so all of them initialise while the default is 1
            pool.submit(lambda: None)
        barrier.wait()
        torch.set_num_threads(prev)  # restore the default for the caller and for threads created later
        _POOL = (workers, pool)
        return pool


def _forget_pool_in_child() -> None:
    # A forked child inherits the executor object but not its threads: tasks would queue forever. Start afresh.
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _run_tasks(fn, tasks: list, workers: int) -> list:
    if workers <= 1 or len(tasks) <= 1:
        return [fn(*t) for t in tasks]
    # Grad and inference mode are thread-local: a caller inside torch.inference_mode() hands us inference tensors,
    # which pool threads may only update in place under the same mode.
    inference = torch.is_inference_mode_enabled()

    def run(t):
        with torch.inference_mode(inference), torch.no_grad():
            return fn(*t)

    return list(_pool(workers).map(run, tasks))


# ---- one row block ----------------------------------------------------------------------------------------------

def _tile_scores(w: torch.Tensor, features: torch.Tensor, tile: torch.Tensor, k0: int, k1: int,
                 bk: int) -> torch.Tensor:
    """Scores of codewords ``[k0, k1)`` for the rows of ``w``, computed into ``tile`` (``[n, bk]``).

    Every GEMM call has the same shape ``[n, 2m] x [2m, bk]``: a short last tile is computed as the ``bk`` codewords
    ending at ``k1`` (overlapping earlier columns) and only its new columns are returned. BLAS libraries pick different
    kernels for different shapes (MKL's narrow-N path rounds differently); one shape keeps copies of a codeword on the
    same kernel in every tile, so they score alike in practice. Only exact scores are guaranteed equal, though
    (docs/kernels.md section 4).
    """
    start = k1 - bk if (k1 - k0 < bk and k1 >= bk) else k0
    full = tile[:, : k1 - start]
    torch.matmul(w, features[start:k1].T, out=full)
    return full[:, k0 - start:]


def _argmax_block(w: torch.Tensor, features: torch.Tensor, k_lo: int, k_hi: int, bk: int, bv: torch.Tensor,
                  bi: torch.Tensor, selective: bool) -> None:
    """Running argmax of ``w @ features[k_lo:k_hi].T`` merged into ``bv`` / ``bi`` (views of the outputs)."""
    n = w.shape[0]
    tile = torch.empty((n, bk), dtype=torch.float32, device=w.device)
    tv = torch.empty((n,), dtype=torch.float32, device=w.device)
    up = torch.empty((n,), dtype=torch.bool, device=w.device)
    for k0 in range(k_lo, k_hi, bk):
        k1 = min(k0 + bk, k_hi)
        scores = _tile_scores(w, features, tile, k0, k1, bk)
        if not selective:
            t_val, t_idx = scores.max(dim=1)
            better = t_val > bv  # strict: an equal score in a later tile keeps the earlier (lower) index
            bv.copy_(torch.where(better, t_val, bv))
            bi.copy_(torch.where(better, t_idx + k0, bi))
            continue
        torch.amax(scores, dim=1, out=tv)
        torch.gt(tv, bv, out=up)  # strict, as above
        n_up = int(up.sum())
        if n_up == 0:
            continue
        if n_up >= _FULL_ARGMAX_FRACTION * n:
            t_idx = scores.argmax(dim=1)
            bi.copy_(torch.where(up, t_idx + k0, bi))
            bv.copy_(torch.where(up, tv, bv))
        else:
            sel = up.nonzero().squeeze(1)
            t_idx = scores.index_select(0, sel).argmax(dim=1)
            bi.index_copy_(0, sel, t_idx + k0)
            bv.index_copy_(0, sel, tv.index_select(0, sel))


@torch.no_grad()
@ieee_float32_matmul()
def search_blocked(weights: torch.Tensor, features: torch.Tensor, *, block_rows: int | None = None,
                   block_k: int | None = None, threads: int | None = None, return_scores: bool = False):
    """Argmax over codewords of ``weights @ features.T``, tile by tile; ties go to the lowest index. Matmuls run at
    full float32 precision regardless of ``torch.set_float32_matmul_precision`` (``ieee_float32_matmul``).

    Args:
        weights: float32 ``[rows, D]`` (``row_weights``); features: float32 ``[K, D]`` (``prepare_features``).
        block_rows, block_k: tile shape override (default ``plan_tiles``).
        threads: worker threads (default :func:`search_threads`; 1 runs inline). CPU tensors only.
        return_scores: also return the winning float32 GEMM scores.
    Returns: int64 ``[rows]`` (and float32 ``[rows]`` scores when ``return_scores``).
    """
    rows, k_total = weights.shape[0], features.shape[0]
    device = weights.device
    best_val = torch.full((rows,), float("-inf"), dtype=torch.float32, device=device)
    best_idx = torch.zeros((rows,), dtype=torch.int64, device=device)
    if rows == 0 or k_total == 0:
        return (best_idx, best_val) if return_scores else best_idx
    cpu = device.type == "cpu"
    workers = (search_threads() if threads is None else max(1, int(threads))) if cpu else 1
    # On an accelerator the improved-row count would force a host sync per tile; the plain fused max is better there.
    selective = cpu
    split_k = workers > 1 and rows < _MIN_ROWS_PER_WORKER * workers and block_rows is None
    br, bk = plan_tiles(rows, k_total, workers=1 if split_k else workers, block_rows=block_rows, block_k=block_k)
    tasks = [(weights[r0:r0 + br], r0) for r0 in range(0, rows, br)]
    if not split_k:
        # Row blocks, each over the whole codebook, queued to the workers (a slow worker simply takes fewer).
        _run_tasks(lambda w, r0: _argmax_block(w, features, 0, k_total, bk, best_val[r0:r0 + w.shape[0]],
                                               best_idx[r0:r0 + w.shape[0]], selective), tasks, workers)
    else:
        # A small batch: one row block, the codebook split between the workers on tile boundaries; the parts are merged
        # in codebook order with a strict ">" (the earlier part holds the lower indices).
        n_tiles = -(-k_total // bk)
        per = -(-n_tiles // workers)
        ranges = [(t * bk, min(k_total, (t + per) * bk)) for t in range(0, n_tiles, per)]
        parts = [(torch.full((rows,), float("-inf"), dtype=torch.float32), torch.zeros((rows,), dtype=torch.int64))
                 for _ in ranges]
        _run_tasks(lambda lo, hi, pv, pi: _argmax_block(weights, features, lo, hi, bk, pv, pi, selective),
                   [(lo, hi, pv, pi) for (lo, hi), (pv, pi) in zip(ranges, parts)], workers)
        for pv, pi in parts:
            better = pv > best_val
            best_val.copy_(torch.where(better, pv, best_val))
            best_idx.copy_(torch.where(better, pi, best_idx))
    return (best_idx, best_val) if return_scores else best_idx


# ---- top-k ------------------------------------------------------------------------------------------------------

def _select_topk_exact(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row of ``scores`` with ties resolved to the lowest column, sorted (value desc, column asc).

    ``torch.topk`` neither documents which of several equal values it keeps at the k-th place nor their order, so the
    rows where a run of equal values straddles the cut are re-selected by column order (in small row chunks).
    """
    extra = 1 if k < scores.shape[1] else 0
    vals, cols = torch.topk(scores, k + extra, dim=1, largest=True, sorted=True)
    # A run of equal values straddles the cut exactly when the (k+1)-th largest equals the k-th.
    tied = (vals[:, k] == vals[:, k - 1]).nonzero().squeeze(1) if extra else vals.new_zeros(0, dtype=torch.long)
    vals, cols = vals[:, :k], cols[:, :k]
    kth = vals[:, -1:]
    if tied.numel():
        cols, vals = cols.clone(), vals.clone()
        for c0 in range(0, tied.numel(), _TIE_CHUNK_ROWS):  # bounded temporaries even if every row is tied
            rows_c = tied[c0:c0 + _TIE_CHUNK_ROWS]
            s = scores.index_select(0, rows_c)
            t = kth.index_select(0, rows_c)
            gt = s > t
            eq = s == t
            room = k - gt.sum(dim=1, keepdim=True, dtype=torch.int32)
            keep = gt | (eq & (eq.cumsum(dim=1, dtype=torch.int32) <= room))
            c = keep.nonzero()[:, 1].reshape(-1, k)  # exactly k per row, in column order
            cols[rows_c] = c
            vals[rows_c] = s.gather(1, c)
    # Column-ascending, then a stable value-descending sort: equal values stay in column order.
    cols, order = cols.sort(dim=1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, descending=True, stable=True)
    return vals, cols.gather(1, order)


def merge_topk(vals_a: torch.Tensor, idx_a: torch.Tensor, vals_b: torch.Tensor, idx_b: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two per-row candidate lists, each sorted (value desc, index asc), where every index in ``a`` is lower
    than every index in ``b``; keeps the best ``k`` with the same order."""
    v = torch.cat([vals_a, vals_b], dim=1)
    i = torch.cat([idx_a, idx_b], dim=1)
    v, order = v.sort(dim=1, descending=True, stable=True)
    return v[:, :k].contiguous(), i.gather(1, order[:, :k]).contiguous()


def _topk_block(w: torch.Tensor, features: torch.Tensor, k: int, bk: int, rv: torch.Tensor, ri: torch.Tensor) -> None:
    n, k_total = w.shape[0], features.shape[0]
    tile = torch.empty((n, bk), dtype=torch.float32, device=w.device)
    for k0 in range(0, k_total, bk):
        k1 = min(k0 + bk, k_total)
        scores = _tile_scores(w, features, tile, k0, k1, bk)
        # Only rows whose tile max strictly beats their k-th best can change (an equal value has a higher index).
        up = scores.amax(dim=1) > rv[:, -1]
        n_up = int(up.sum())
        if n_up == 0:
            continue
        kk = min(k, k1 - k0)
        if n_up >= _FULL_ARGMAX_FRACTION * n:  # merging an unchanged row is a no-op: skip the gather
            tv, tc = _select_topk_exact(scores, kk)
            mv, mi = merge_topk(rv, ri, tv, tc + k0, k)
            rv.copy_(mv)
            ri.copy_(mi)
        else:
            sel = up.nonzero().squeeze(1)
            tv, tc = _select_topk_exact(scores.index_select(0, sel), kk)
            mv, mi = merge_topk(rv.index_select(0, sel), ri.index_select(0, sel), tv, tc + k0, k)
            rv.index_copy_(0, sel, mv)
            ri.index_copy_(0, sel, mi)


@torch.no_grad()
@ieee_float32_matmul()
def search_topk_blocked(weights: torch.Tensor, features: torch.Tensor, k: int, *, block_rows: int | None = None,
                        block_k: int | None = None, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best codewords per row of ``weights @ features.T``: int64 indices and float32 GEMM scores
    ``[rows, k]``, sorted by descending score, ties lowest index first. Same tiling, threading and memory bound as
    :func:`search_blocked` (plus O(k) per row); a tile is only examined for rows whose tile maximum beats their
    current k-th best."""
    rows, k_total = weights.shape[0], features.shape[0]
    device = weights.device
    if not 1 <= k <= k_total:
        raise ValueError(f"k must be in [1, K={k_total}], got {k}")
    out_v = torch.full((rows, k), float("-inf"), dtype=torch.float32, device=device)
    out_i = torch.zeros((rows, k), dtype=torch.int64, device=device)
    if rows == 0:
        return out_i, out_v
    workers = (search_threads() if threads is None else max(1, int(threads))) if device.type == "cpu" else 1
    br, bk = plan_tiles(rows, k_total, workers=workers, block_rows=block_rows, block_k=block_k)
    bk = max(bk, min(k, k_total))
    tasks = [(weights[r0:r0 + br], out_v[r0:r0 + br], out_i[r0:r0 + br]) for r0 in range(0, rows, br)]
    _run_tasks(lambda w, rv, ri: _topk_block(w, features, k, bk, rv, ri), tasks, workers)
    return out_i, out_v
