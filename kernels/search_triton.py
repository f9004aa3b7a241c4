"""Fused Triton kernels for the GQ codebook search (imported lazily: only when the Triton backend is used).

``_argmax_kernel``: each program owns ``BLOCK_M`` rows and a contiguous range of codebook tiles. It loads its row
weights once, streams ``BLOCK_K`` codewords at a time, scores them with one ``tl.dot`` (float32, ``ieee`` precision)
against the ``[c, c*c]`` features zero-padded to ``BLOCK_D >= 16`` along the inner dimension, and keeps a running
(max, argmax) per row in registers. The ``[rows, K]`` score matrix never exists, not even per program beyond one tile.

Small batches would leave most of a GPU idle (1024 rows / 128 = 8 programs), so the codebook can also be split across a
second grid axis. Programs then combine their results with a 64-bit ``atomic_max`` on a packed key
``(order-preserving int32 of the score) << 32 | (2^32 - 1 - index)``: the larger score wins and, for equal scores,
the lower index. So the kernel's only output is one int64 per row, decoded to the index (and score) afterwards; the
result is independent of the split count and of the order in which programs finish.

``_topk_kernel``: the same streaming, with a running sorted top-k list per row in registers (k extraction rounds per
tile, skipped when no row's tile max beats its k-th best). Its per-split lists are merged in torch.

Triton needs a GPU, or ``TRITON_INTERPRET=1`` set before this module is imported (the CPU test path). Under the
interpreter only one config is tried, so autotuning never runs there.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "triton_argmax", "triton_topk", "block_d"]

# triton.jit decides at decoration time whether it builds an interpreted function; remember what we got.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_INT64_MIN = -(2 ** 63)
_LOW32 = 0xFFFFFFFF


def block_d(d: int) -> int:
    """Inner (feature) dimension padded for ``tl.dot``: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(d))


def _argmax_configs():
    if INTERPRETED:  # numpy-backed interpreter: a few big tiles are what is fast; no autotuning.
        return [triton.Config({"BLOCK_M": 256, "BLOCK_K": 1024}, num_warps=4)]
    cfgs = []
    for bm, bk, warps, stages in [(64, 64, 4, 2), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3),
                                  (128, 128, 4, 2), (64, 256, 8, 3), (256, 64, 8, 3), (128, 256, 8, 2),
                                  (256, 128, 8, 2), (32, 128, 4, 4)]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return cfgs


def _prune(configs, named_args, **kwargs):
    """Drop configs whose score tile plus inputs would not fit comfortably in registers for wide features."""
    bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 16))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] * max(1, bd // 32) <= 32768]
    return kept or configs[:1]


@triton.autotune(configs=_argmax_configs(), key=["K", "D", "R_BUCKET"], restore_value=["out_ptr"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _argmax_kernel(w_ptr, f_ptr, out_ptr, R, K, D, stride_w, stride_f, R_BUCKET,
                   BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    # Row weights, zero-padded from D = 2m up to BLOCK_D (the padding adds exact zeros to every dot product).
    w = tl.load(w_ptr + rows[:, None] * stride_w + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < D),
                other=0.0)
    n_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per = tl.cdiv(n_tiles, n_split)
    k_lo = pid_s * tiles_per * BLOCK_K
    k_hi = tl.minimum(K, k_lo + tiles_per * BLOCK_K)
    best_v = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_i = tl.zeros((BLOCK_M,), dtype=tl.int32)
    cols = tl.arange(0, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + cols
        k_ok = kk < K
        f = tl.load(f_ptr + kk[:, None] * stride_f + dims[None, :], mask=k_ok[:, None] & (dims[None, :] < D),
                    other=0.0)
        s = tl.dot(w, tl.trans(f), input_precision="ieee")
        s = tl.where(k_ok[None, :], s, float("-inf"))
        t_v = tl.max(s, axis=1)
        t_i = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int32) + k0
        up = t_v > best_v  # strict: equal scores in a later tile keep the earlier, lower index
        best_v = tl.where(up, t_v, best_v)
        best_i = tl.where(up, t_i, best_i)
    # Pack (score, -index) into one int64 that orders like (score asc, index desc). "+ 0.0" maps -0.0 to +0.0.
    bits = (best_v + 0.0).to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    packed = (key.to(tl.int64) << 32) | (4294967295 - best_i.to(tl.int64))
    tl.atomic_max(out_ptr + rows, packed, mask=row_ok & ((rows * 0 + k_lo) < K))


def _topk_configs():
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 256, "BLOCK_K": 1024}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk, w, s in [(64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 8, 2), (32, 128, 4, 3), (128, 128, 8, 2)]]


@triton.autotune(configs=_topk_configs(), key=["K", "D", "R_BUCKET", "K_TOP"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _topk_kernel(w_ptr, f_ptr, val_ptr, idx_ptr, R, K, D, stride_w, stride_f, R_BUCKET,
                 K_TOP: tl.constexpr, KP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    w = tl.load(w_ptr + rows[:, None] * stride_w + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < D),
                other=0.0)
    n_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per = tl.cdiv(n_tiles, n_split)
    k_lo = pid_s * tiles_per * BLOCK_K
    k_hi = tl.minimum(K, k_lo + tiles_per * BLOCK_K)
    slot = tl.arange(0, KP)[None, :]
    cols = tl.arange(0, BLOCK_K)
    # Running list, sorted (score desc, index asc); slots >= K_TOP stay -inf and are never read back.
    run_v = tl.full((BLOCK_M, KP), float("-inf"), tl.float32)
    run_i = tl.zeros((BLOCK_M, KP), dtype=tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + cols
        k_ok = kk < K
        f = tl.load(f_ptr + kk[:, None] * stride_f + dims[None, :], mask=k_ok[:, None] & (dims[None, :] < D),
                    other=0.0)
        s = tl.dot(w, tl.trans(f), input_precision="ieee")
        s = tl.where(k_ok[None, :], s, float("-inf"))
        kth = tl.max(tl.where(slot == K_TOP - 1, run_v, float("-inf")), axis=1)
        # A tile value equal to the k-th best cannot enter (it has a higher index), hence strict.
        n_up = tl.sum((tl.max(s, axis=1) > kth).to(tl.int32), axis=0)
        if n_up > 0:
            cand_v = run_v
            new_v = tl.full((BLOCK_M, KP), float("-inf"), tl.float32)
            new_i = tl.zeros((BLOCK_M, KP), dtype=tl.int32)
            for j in range(K_TOP):
                a_v = tl.max(s, axis=1)
                a_c = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int32)
                b_v = tl.max(cand_v, axis=1)
                b_p = tl.argmax(cand_v, axis=1, tie_break_left=True).to(tl.int32)
                b_i = tl.sum(tl.where(slot == b_p[:, None], run_i, 0), axis=1)
                take_run = b_v >= a_v  # the running list holds lower indices: it wins ties
                v = tl.where(take_run, b_v, a_v)
                i = tl.where(take_run, b_i, a_c + k0)
                new_v = tl.where(slot == j, v[:, None], new_v)
                new_i = tl.where(slot == j, i[:, None], new_i)
                cand_v = tl.where(take_run[:, None] & (slot == b_p[:, None]), float("-inf"), cand_v)
                s = tl.where((take_run == 0)[:, None] & (cols[None, :] == a_c[:, None]), float("-inf"), s)
            run_v = new_v
            run_i = new_i
    out = (pid_s * R + rows[:, None]) * KP + slot
    ok = row_ok[:, None] & (slot < K_TOP)
    tl.store(val_ptr + out, run_v, mask=ok)
    tl.store(idx_ptr + out, run_i, mask=ok)


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("the Triton backend needs CUDA tensors; on CPU it only runs under the Triton interpreter "
                           "(set TRITON_INTERPRET=1 before kernels.search_triton / triton is first used)")


def _on_device(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _r_bucket(rows: int) -> int:
    return triton.next_power_of_2(max(1, triton.cdiv(rows, 1024)))


def _splits_fn(rows: int, k_total: int, splits: int | None, device: torch.device):
    """Grid's second axis: explicit, or enough programs to fill the GPU (>= 4 codebook tiles per program)."""
    if splits is not None:
        return lambda meta: max(1, min(int(splits), triton.cdiv(k_total, meta["BLOCK_K"])))
    if device.type != "cuda":
        return lambda meta: 1
    target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())

    def fn(meta):
        row_blocks = triton.cdiv(rows, meta["BLOCK_M"])
        max_split = max(1, triton.cdiv(k_total, meta["BLOCK_K"]) // 4)
        return max(1, min(max_split, triton.cdiv(target, row_blocks)))
    return fn


def decode_packed(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 index, float32 score) from the kernel's packed keys."""
    idx = _LOW32 - (packed & _LOW32)
    key = (packed >> 32).to(torch.int32)
    bits = torch.where(key < 0, key ^ 0x7FFFFFFF, key)
    return idx, bits.view(torch.float32)


def triton_argmax(weights: torch.Tensor, features: torch.Tensor, *, splits: int | None = None,
                  return_scores: bool = False):
    """Indices (int64 ``[rows]``) of the best codeword per row; ``weights`` ``[rows, D]``, ``features`` ``[K, D]``,
    both float32 contiguous on the same device. ``splits`` forces the codebook split count (tests)."""
    _check_device(weights)
    rows, d = weights.shape
    k_total = features.shape[0]
    packed = torch.full((rows,), _INT64_MIN, dtype=torch.int64, device=weights.device)
    if rows and k_total:
        split = _splits_fn(rows, k_total, splits, weights.device)
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), split(meta))  # noqa: E731
        with _on_device(weights.device):
            _argmax_kernel[grid](weights, features, packed, rows, k_total, d, weights.stride(0), features.stride(0),
                                 _r_bucket(rows), BLOCK_D=block_d(d))
    idx, val = decode_packed(packed)
    return (idx, val) if return_scores else idx


def triton_topk(weights: torch.Tensor, features: torch.Tensor, k: int, *,
                splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (int64 indices, float32 GEMM scores), ``[rows, k]``, sorted by score desc, ties lowest index first."""
    _check_device(weights)
    rows, d = weights.shape
    k_total = features.shape[0]
    kp = triton.next_power_of_2(k)
    max_split = max(1, triton.cdiv(k_total, 16))
    if splits is not None:
        max_split = max(1, min(max_split, int(splits)))
    elif weights.device.type == "cuda":
        # Bound the partial-list buffers: the heuristic never asks for more than 4*SMs programs in all, and row
        # blocks have at most 128 rows, so this many splits suffice (a few MiB of buffers at most).
        dev_index = weights.device.index if weights.device.index is not None else torch.cuda.current_device()
        target = 4 * _sm_count(dev_index)
        max_split = max(1, min(max_split, triton.cdiv(target, triton.cdiv(max(rows, 1), 128))))
    else:
        max_split = 1
    split = _splits_fn(rows, k_total, splits, weights.device)
    split_holder = {}

    def grid(meta):
        # A split whose codebook range holds fewer than k codewords leaves -inf placeholders in its list; they sort
        # after every real (finite) score in the merge below, and K >= k real candidates always exist.
        s = max(1, min(max_split, split(meta)))
        split_holder["s"] = s  # the last call is the launch that counts (autotuning calls it per config first)
        return (triton.cdiv(rows, meta["BLOCK_M"]), s)

    vals = torch.full((max_split, rows, kp), float("-inf"), dtype=torch.float32, device=weights.device)
    idxs = torch.zeros((max_split, rows, kp), dtype=torch.int32, device=weights.device)
    if rows == 0:
        return idxs[0, :, :k].long(), vals[0, :, :k]
    with _on_device(weights.device):
        _topk_kernel[grid](weights, features, vals, idxs, rows, k_total, d, weights.stride(0), features.stride(0),
                           _r_bucket(rows), K_TOP=k, KP=kp, BLOCK_D=block_d(d))
    s = split_holder["s"]
    # Splits hold increasing index ranges and each list is (score desc, index asc): concatenating in split order and
    # sorting stably by score keeps equal scores in index order.
    v = vals[:s, :, :k].permute(1, 0, 2).reshape(rows, s * k)
    i = idxs[:s, :, :k].permute(1, 0, 2).reshape(rows, s * k).long()
    v, order = v.sort(dim=1, descending=True, stable=True)
    return i.gather(1, order[:, :k]).contiguous(), v[:, :k].contiguous()
