#!/usr/bin/env python
"""Benchmark the GQ codebook search (not a test; prints markdown tables, ``--json PATH`` also writes the numbers).

CPU section (always): K=65536, m=16 (the released model), real Sobol codebook, realistic posteriors (sigma ~ 0.5,
mu ~ N(0, 0.8^2)), rows in ``--rows`` (default 1024 and 16384). For each row count:

* ours: ``gq_search(..., backend="torch")``, the blocked amax/argmax path;
* plain: ``W @ F.T`` materialised, then ``argmax`` over all K (the GEMM form without tiling). Above
  ``--plain-chunk`` rows it runs in row chunks of that size so the score matrix stays at chunk x K floats;
* reference: the reference repository's algorithm (``kernels.reference.reference_search``: 8 row chunks, each a
  ``[rows/8, K, m]`` Normal log-prob tensor). It is timed at ``--ref-rows`` rows only (a 16384-row call would need
  8.6 GB per temporary) and extrapolated linearly in rows, which holds because its cost is rows x K x m elementwise
  work.

Reported: wall time (best of ``--repeats`` runs, ours and plain interleaved), rows/s, the ratio of our rows/s to each
baseline's, peak memory allocated by the call (torch profiler, ``kernels.reference.profile_peak_bytes``; ours with torch
limited to one thread, so it runs inline and the figure is the footprint of one worker thread), achieved GFLOP/s
counting 2 * rows * K * 2m for the score GEMM, and that as a percentage of the float32 matmul peak measured in the same
run (best of several 4096^3 ``torch.mm``). Index parity with the plain path is checked. An ablation table (``--ablation-rows``) times the
first version of the CPU path and the intermediate steps against the current one.

GPU section (only when CUDA is available): rows in 1024 x {1, 16, 64}: the Triton kernel vs materialise + argmax in
torch on the GPU, and vs our CPU path; GFLOP/s, and index parity between the Triton kernel and the torch GEMM on the
card
(rows where they differ are checked against the float64 oracle's tie bound).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gq_model.codebook import gaussian_codebook  # noqa: E402
from kernels import gq_search, prepare_features  # noqa: E402
from kernels.reference import oracle_search, profile_peak_bytes, reference_search  # noqa: E402
from kernels.search_cpu import row_weights, search_blocked, search_threads  # noqa: E402


def _best_time(fn, repeats: int, sync=None) -> float:
    best = math.inf
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:  # noqa: BLE001
        pass
    return platform.processor() or "unknown"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def measure_peak_gflops(device: str = "cpu", n: int = 4096, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else None
    torch.mm(a, b, out=c)
    return 2 * n ** 3 / _best_time(lambda: torch.mm(a, b, out=c), repeats, sync) / 1e9


def measure_cpu_peak_gflops(repeats: int = 5) -> tuple[float, dict]:
    """The machine's float32 matmul peak, measured two ways, best of each: one 4096^3 ``torch.mm`` on torch's
    intra-op threads, and one 2048^3 single-threaded ``torch.mm`` per worker thread running concurrently (the way the
    search itself uses the cores; far less sensitive to other processes competing for them). Returns the larger."""
    from kernels.search_cpu import _pool  # noqa: PLC0415  (the search's own single-threaded workers)

    intra = measure_peak_gflops("cpu", repeats=repeats)
    workers = search_threads()
    n = 2048
    mats = [(torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)) for _ in range(workers)]
    run = lambda abc: torch.mm(abc[0], abc[1], out=abc[2])  # noqa: E731
    best = math.inf
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        list(_pool(workers).map(run, mats)) if workers > 1 else run(mats[0])
        best = min(best, time.perf_counter() - t0)
    pooled = workers * 2 * n ** 3 / best / 1e9
    return max(intra, pooled), {"intra_op_4096": intra, "per_thread_2048": pooled}


def make_inputs(rows: int, m: int, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mu = 0.8 * torch.randn(rows, m, generator=g)
    logvar = 2 * math.log(0.5) + 0.2 * torch.randn(rows, m, generator=g)  # sigma ~ 0.5
    return mu.to(device), logvar.to(device)


def plain_search(mu, logvar, features, beta, chunk: int) -> torch.Tensor:
    """The GEMM form without tiling: materialise ``[rows (or chunk), K]`` scores, then argmax."""
    w = row_weights(mu, logvar, beta)
    out = torch.empty(w.shape[0], dtype=torch.int64, device=w.device)
    for r0 in range(0, w.shape[0], chunk):
        out[r0:r0 + chunk] = (w[r0:r0 + chunk] @ features.T).argmax(dim=1)
    return out


def _interleaved(fns: dict, repeats: int) -> dict:
    """Best and median wall time of each callable, the callables run in turn ``repeats`` times (so a burst of load
    from other processes hits all of them alike)."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: (min(v), sorted(v)[len(v) // 2]) for k, v in times.items()}


def _peak_one_thread(fn, *a, **kw):
    """``profile_peak_bytes`` with torch limited to one thread, so the search runs its blocks inline on this thread
    and the profiler (which only records this thread's allocations) sees all of them: the per-worker footprint."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return profile_peak_bytes(fn, *a, **kw)
    finally:
        torch.set_num_threads(prev)


def original_blocked(weights, features, block_rows=256, block_k=4096):
    """The first version of this repository's CPU path (before this benchmark's tuning): tile matmul, then
    ``max(dim=1)`` with indices on every tile, running merge; torch intra-op threads."""
    rows, k_total = weights.shape[0], features.shape[0]
    best_val = torch.full((rows,), float("-inf"))
    best_idx = torch.zeros((rows,), dtype=torch.int64)
    tile = torch.empty((min(block_rows, rows), min(block_k, k_total)))
    for r0 in range(0, rows, block_rows):
        r1 = min(r0 + block_rows, rows)
        bv, bi = best_val[r0:r1], best_idx[r0:r1]
        for k0 in range(0, k_total, block_k):
            k1 = min(k0 + block_k, k_total)
            sc = tile[: r1 - r0, : k1 - k0]
            torch.matmul(weights[r0:r1], features[k0:k1].T, out=sc)
            tv, ti = sc.max(dim=1)
            better = tv > bv
            bv.copy_(torch.where(better, tv, bv))
            bi.copy_(torch.where(better, ti + k0, bi))
    return best_idx


def ablation_section(args, results: dict, peak: float) -> list[str]:
    k_total, m, beta, rows = args.K, args.m, 1.0, args.ablation_rows
    features = prepare_features(gaussian_codebook(k_total, m))
    mu, lv = make_inputs(rows, m, seed=7)
    w = row_weights(mu, lv, beta)
    flops = 2 * rows * k_total * 2 * m
    variants = {
        "first version: tile matmul + max(dim=1) per tile, 256x4096 tiles, intra-op threads":
            lambda: original_blocked(w, features),
        "amax first + argmax of improved rows, 2048x512 tiles, intra-op threads":
            lambda: search_blocked(w, features, threads=1, block_rows=2048, block_k=512),
        "amax first + argmax of improved rows, 512x512 tiles, one worker thread per core (**current**)":
            lambda: search_blocked(w, features),
        "plain matmul + argmax (2048-row chunks)": lambda: plain_search(mu, lv, features, beta, 2048),
    }
    ref_idx = search_blocked(w, features)
    diff = (original_blocked(w, features) != ref_idx).nonzero().squeeze(1)
    if diff.numel():  # different tile shapes may round differently: only float32 ties may disagree
        res = oracle_search(mu[diff], lv[diff], gaussian_codebook(k_total, m), beta)
        assert (res.ambiguous | res.copies_open).all(), "the ablation variants disagree outside float32 ties"
    t = _interleaved(variants, args.repeats + 2)
    results["cpu"]["ablation"] = {"rows": rows, **{k: {"best_s": b, "median_s": md} for k, (b, md) in t.items()}}
    lines = [f"Ablation, {rows} rows (best / median of {args.repeats + 2} interleaved runs):", "",
             "| variant | best GFLOP/s | % of mm peak | median GFLOP/s |", "|---|---:|---:|---:|"]
    for k, (b, md) in t.items():
        lines.append(f"| {k} | {flops / b / 1e9:.1f} | {100 * flops / b / 1e9 / peak:.0f}% | {flops / md / 1e9:.1f} |")
    return lines


def cpu_section(args, results: dict) -> list[str]:
    k_total, m, beta = args.K, args.m, 1.0
    codebook = gaussian_codebook(k_total, m)
    features = prepare_features(codebook)
    flop_per_row = 2 * k_total * 2 * m
    peak, peak_detail = measure_cpu_peak_gflops(repeats=args.repeats + 2)
    results["cpu"] = {"peak_gflops": peak, "peak_detail": peak_detail, "threads": torch.get_num_threads(), "load_before": _load(), "rows": {}}

    ref = None
    if not args.skip_reference:
        mu, lv = make_inputs(args.ref_rows, m)
        reference_search(mu[:8], lv[:8], codebook, beta)  # warm-up
        t_ref = _best_time(lambda: reference_search(mu, lv, codebook, beta), 1)
        chunk_rows = max(8, args.ref_rows // 8)  # one of the reference's 8 chunks
        _, ref_peak = profile_peak_bytes(reference_search, mu[:chunk_rows], lv[:chunk_rows], codebook, beta, chunks=1)
        ref = {"rows": args.ref_rows, "seconds": t_ref, "rows_per_s": args.ref_rows / t_ref,
               "peak_bytes_per_chunk_row": ref_peak / chunk_rows}
        results["cpu"]["reference"] = ref

    lines = [f"float32 matmul peak: **{peak:.0f} GFLOP/s** (best of {args.repeats + 2}; one 4096^3 `torch.mm` on "
             f"{torch.get_num_threads()} intra-op threads: {peak_detail['intra_op_4096']:.0f}; one single-threaded "
             f"2048^3 `torch.mm` per core, concurrently: {peak_detail['per_thread_2048']:.0f})", ""]
    lines.append("| rows | path | time (s) | rows/s | ours vs this | peak mem | GFLOP/s | % of mm peak |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        mu, lv = make_inputs(rows, m, seed=rows)
        gq_search(mu[:16], lv[:16], features, beta, backend="torch")  # warm-up (custom-op first call)
        chunk = min(rows, args.plain_chunk)
        t = _interleaved({"ours": lambda: gq_search(mu, lv, features, beta, backend="torch"),
                          "plain": lambda: plain_search(mu, lv, features, beta, chunk)}, args.repeats)
        t_ours, t_plain = t["ours"][0], t["plain"][0]
        ours_idx, mem_ours = _peak_one_thread(gq_search, mu, lv, features, beta, backend="torch")
        plain_idx, mem_plain = profile_peak_bytes(plain_search, mu, lv, features, beta, chunk)
        mismatch = int((ours_idx != plain_idx).sum())
        entry = {"ours_s": t_ours, "plain_s": t_plain, "ours_median_s": t["ours"][1], "plain_median_s": t["plain"][1],
                 "ours_peak_bytes_per_thread": mem_ours, "plain_peak_bytes": mem_plain, "plain_chunk": chunk,
                 "mismatch_vs_plain": mismatch}
        gf_ours = rows * flop_per_row / t_ours / 1e9
        gf_plain = rows * flop_per_row / t_plain / 1e9
        lines.append(f"| {rows} | **ours** (`gq_search`, blocked amax/argmax, {search_threads()} worker threads) | "
                     f"{t_ours:.3f} | {rows / t_ours:,.0f} | 1.0x | {mem_ours / 2**20:.1f} MiB per thread | "
                     f"{gf_ours:.1f} | {100 * gf_ours / peak:.0f}% |")
        plain_name = "plain matmul + argmax" + (f" ({chunk}-row chunks)" if chunk < rows else "")
        lines.append(f"| {rows} | {plain_name} | {t_plain:.3f} | {rows / t_plain:,.0f} | {t_plain / t_ours:.1f}x | "
                     f"{mem_plain / 2**20:.0f} MiB | {gf_plain:.1f} | {100 * gf_plain / peak:.0f}% |")
        if ref is not None:
            t_ref = rows / ref["rows_per_s"]
            mem_ref = ref["peak_bytes_per_chunk_row"] * max(1, rows // 8)
            measured = "measured" if rows == ref["rows"] else f"extrapolated from {ref['rows']} rows"
            gf_ref = rows * flop_per_row / t_ref / 1e9
            lines.append(f"| {rows} | reference (8 chunks of [rows/8,K,m] log-probs; {measured}) | {t_ref:.2f} | "
                         f"{rows / t_ref:,.0f} | {t_ref / t_ours:.0f}x | {mem_ref / 2**30:.2f} GiB | "
                         f"{gf_ref:.2f} (GEMM-equiv.) | {100 * gf_ref / peak:.1f}% |")
            entry.update(reference_s=t_ref, reference_measured=rows == ref["rows"], reference_peak_bytes=mem_ref)
        entry.update(ours_gflops=gf_ours, plain_gflops=gf_plain, ours_pct_peak=100 * gf_ours / peak)
        results["cpu"]["rows"][rows] = entry
        print(f"  [cpu] rows={rows} done (index mismatches vs plain: {mismatch})", file=sys.stderr, flush=True)
    if args.ablation_rows:
        lines += [""] + ablation_section(args, results, peak)
    results["cpu"]["load_after"] = _load()
    return lines


def gpu_section(args, results: dict) -> list[str]:
    k_total, m, beta = args.K, args.m, 1.0
    dev = args.gpu_device
    codebook = gaussian_codebook(k_total, m)
    features_cpu = prepare_features(codebook)
    features = features_cpu.to(dev)
    flop_per_row = 2 * k_total * 2 * m
    sync = torch.cuda.synchronize if dev == "cuda" else None
    # Triton's ieee fp32 dot uses FMA, not tensor cores: compare with the fp32 SGEMM peak (TF32 off).
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    n_peak = 8192 if dev == "cuda" else 1024
    peak = measure_peak_gflops(dev, n=n_peak, repeats=args.repeats + 2)
    name = torch.cuda.get_device_name() if dev == "cuda" else f"{dev} (smoke test of this section)"
    results["gpu"] = {"device": name, "peak_gflops_fp32": peak, "rows": {}}
    lines = [f"GPU: {name}; float32 (no TF32) matmul peak, {n_peak}^3 torch.mm: **{peak:,.0f} GFLOP/s**", "",
             "| rows | path | time (ms) | rows/s | Triton vs this | GFLOP/s | % of fp32 peak | index parity |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    for mult in args.gpu_mults:
        rows = 1024 * mult
        mu, lv = make_inputs(rows, m, dev, seed=rows)
        gq_search(mu, lv, features, beta, backend="triton")  # autotune + compile
        t_tr = _best_time(lambda: gq_search(mu, lv, features, beta, backend="triton"), args.repeats * 3, sync)
        idx_tr = gq_search(mu, lv, features, beta, backend="triton")
        chunk = min(rows, 16384)  # 16384 x 65536 x 4 B = 4 GiB materialised per chunk
        t_mat = _best_time(lambda: plain_search(mu, lv, features, beta, chunk), args.repeats * 3, sync)
        idx_mat = plain_search(mu, lv, features, beta, chunk)
        diff = (idx_tr != idx_mat).nonzero().squeeze(1).cpu()
        unexplained = 0
        if diff.numel():
            res = oracle_search(mu[diff].cpu(), lv[diff].cpu(), codebook, beta)
            unexplained = int((~(res.ambiguous | res.copies_open)).sum())
        cpu_rows = min(rows, args.gpu_cpu_rows)
        mu_c, lv_c = mu[:cpu_rows].cpu(), lv[:cpu_rows].cpu()
        t_cpu = _best_time(lambda: gq_search(mu_c, lv_c, features_cpu, beta, backend="torch"), 1) * rows / cpu_rows
        gf = lambda t: rows * flop_per_row / t / 1e9  # noqa: E731
        parity = f"{rows - diff.numel()}/{rows} equal; {diff.numel() - unexplained} float32 ties, {unexplained} other"
        lines.append(f"| {rows} | **Triton (fused)** | {1e3 * t_tr:.2f} | {rows / t_tr:,.0f} | 1.0x | "
                     f"{gf(t_tr):,.0f} | {100 * gf(t_tr) / peak:.0f}% | {parity} |")
        lines.append(f"| {rows} | torch: materialise [rows,K] + argmax | {1e3 * t_mat:.2f} | {rows / t_mat:,.0f} | "
                     f"{t_mat / t_tr:.1f}x | {gf(t_mat):,.0f} | {100 * gf(t_mat) / peak:.0f}% | reference for parity |")
        how = f"extrapolated from {cpu_rows} rows" if cpu_rows < rows else "measured"
        lines.append(f"| {rows} | our CPU path (host, {how}) | "
                     f"{1e3 * t_cpu:.1f} | {rows / t_cpu:,.0f} | {t_cpu / t_tr:.0f}x | {gf(t_cpu):,.0f} | - | - |")
        results["gpu"]["rows"][rows] = {"triton_s": t_tr, "materialize_s": t_mat, "cpu_s": t_cpu,
                                        "mismatch": int(diff.numel()), "mismatch_not_tie": unexplained}
        print(f"  [gpu] rows={rows} done", file=sys.stderr, flush=True)
    torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1024, 16384])
    p.add_argument("--K", type=int, default=65536)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref-rows", type=int, default=1024, help="rows at which the reference algorithm is timed")
    p.add_argument("--plain-chunk", type=int, default=2048, help="row chunk of the plain matmul+argmax baseline")
    p.add_argument("--ablation-rows", type=int, default=4096, help="rows of the CPU variant comparison (0: skip)")
    p.add_argument("--gpu-cpu-rows", type=int, default=4096, help="rows timed on the CPU path in the GPU section")
    p.add_argument("--gpu-mults", type=int, nargs="+", default=[1, 16, 64], help="GPU rows = 1024 x these")
    p.add_argument("--gpu-device", default="cuda", help=argparse.SUPPRESS)  # "cpu" + TRITON_INTERPRET=1: smoke test
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--no-cpu", action="store_true")
    p.add_argument("--no-gpu", action="store_true")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)

    results = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "cpu_model": _cpu_model(),
               "cpus": os.cpu_count(), "python": platform.python_version(), "K": args.K, "m": args.m}
    print(f"# Codebook search benchmark: K={args.K}, m={args.m}, beta=1")
    print(f"{results['date']}, torch {torch.__version__}, CPU {results['cpu_model']} ({os.cpu_count()} logical CPUs), "
          f"load average before: {_load()}\n")
    if not args.no_cpu:
        print("## CPU\n")
        print("\n".join(cpu_section(args, results)))
        print(f"\nload average after: {results['cpu']['load_after']}\n")
    if not args.no_gpu:
        if torch.cuda.is_available() or args.gpu_device != "cuda":
            print("## GPU\n")
            print("\n".join(gpu_section(args, results)))
        else:
            print("## GPU\n\nCUDA is not available: GPU section skipped.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
