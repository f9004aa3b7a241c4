"""Training-step benchmark: DeepSpeed ZeRO 0/1/2/3 vs the plain-PyTorch engine, on the same model, same loop (CPU).

Every configuration runs in a fresh process (torchrun for several ranks) so peak memory is its own. A step is one
generator step plus one discriminator step (``Trainer._train_micro``) on a fixed in-memory batch, so data loading is
not measured. Rounds interleave the configurations, and the reported step time is the median over rounds of each
round's median, which tames the noise of a shared machine.

    python benchmarks/bench_train.py                      # 1 and 2 processes, markdown table on stdout
    python benchmarks/bench_train.py --nproc 1 --steps 40 --rounds 3 --json out.json

Peak memory is the peak resident set size per rank (ru_maxrss): on CPU it includes the Python runtime and
libraries, so compare differences between rows, not absolute values.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from report import print_table  # benchmarks/report.py (this script's folder is on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("plain", "zero0", "zero1", "zero2", "zero3")


def _config(backend: str, out_dir: str, size: int, batch: int, ch: int) -> dict:
    enc = {"ch": ch, "out_ch": 3, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
           "resolution": size, "in_channels": 3, "z_channels": 4, "double_z": True}
    ds = {"enabled": backend != "plain", "zero_stage": int(backend[-1]) if backend != "plain" else 0}
    if backend == "zero3":
        ds["config"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    return {
        "model": {"arch": "unet", "encoder": enc, "codebook_size": 4096, "group": 4},
        "loss": {"perceptual_weight": 0.0, "disc": {"enabled": True, "start": 0, "ndf": 16, "n_layers": 3}},
        "data": {"train": "<in-memory>", "image_size": size, "batch_size": batch, "holdout": 0, "num_workers": 0},
        "deepspeed": ds,
        "run": {"out_dir": out_dir, "max_steps": 0, "ckpt_every": 0, "image_every": 0, "progress": False,
                "tensorboard": False, "export_bundle": False, "resume": "never", "threads": 1},
    }


def worker(args) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from jobs.training.config import load_config
    from jobs.training.loop import Trainer

    rng = np.random.default_rng(0)
    images = [(rng.random((args.size, args.size, 3)) * 255).astype(np.uint8) for _ in range(4 * args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(_config(args.backend, tmp, args.size, args.batch, args.ch))
        tr = Trainer(cfg, train_images=images).setup()
        x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)) * 2 - 1
        batch = {"image": x, "corrupt": []}
        times = []
        for i in range(args.warmup + args.steps):
            if tr.dist.distributed and tr.dist.world_size > 1:
                dist.barrier()
            t0 = time.perf_counter()
            tr._train_micro(batch)
            tr.step += 1
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        stats = {"rank": tr.dist.rank, "median_s": statistics.median(times), "mean_s": statistics.fmean(times),
                 "peak_rss_mb": peak_mb}
        gathered = [stats]
        if tr.dist.distributed and tr.dist.world_size > 1:
            gathered = [None] * tr.dist.world_size
            dist.all_gather_object(gathered, stats)
        if tr.dist.is_main:
            print("BENCH " + json.dumps({"backend": args.backend, "nproc": tr.dist.world_size, "ranks": gathered}),
                  flush=True)
        if tr.monitor is not None:
            tr.monitor.close()


def _run(backend: str, nproc: int, args) -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    wargs = ["--worker", "--backend", backend, "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--size", str(args.size), "--batch", str(args.batch), "--ch", str(args.ch)]
    if nproc == 1:
        cmd = [sys.executable, os.path.abspath(__file__), *wargs]
    else:
        from jobs.training.engines import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", os.path.abspath(__file__), *wargs]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[len("BENCH "):])
    raise RuntimeError(f"{backend} x{nproc} failed:\n{(p.stdout + p.stderr)[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", choices=BACKENDS, default="plain")
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS))
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ch", type=int, default=32)
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args()
    if args.worker:
        sys.path.insert(0, REPO)
        worker(args)
        return
    results: dict[tuple[int, str], list[dict]] = {}
    for r in range(args.rounds):
        for nproc in args.nproc:
            for backend in args.backends:
                res = _run(backend, nproc, args)
                results.setdefault((nproc, backend), []).append(res)
                print(f"round {r + 1}: {backend} x{nproc}: " + ", ".join(
                    f"rank {x['rank']} {x['median_s'] * 1e3:.1f} ms, {x['peak_rss_mb']:.0f} MB" for x in res["ranks"]),
                    file=sys.stderr, flush=True)
    print(f"\nmodel: UNet ch={args.ch} ch_mult [1,2,2], {args.size}px, batch {args.batch}/rank, discriminator ndf 16 "
          f"x3; one generator + one discriminator step; {args.steps} timed steps after {args.warmup} warm-up, "
          f"median over {args.rounds} rounds; torch threads 1 per rank\n")
    table = {}
    for (nproc, backend), runs in sorted(results.items()):
        step = statistics.median(statistics.median(x["median_s"] for x in run["ranks"]) for run in runs)
        mem = statistics.median(max(x["peak_rss_mb"] for x in run["ranks"]) for run in runs)
        table[(nproc, backend)] = (step, mem)
    rows = []
    for (nproc, backend), (step, mem) in sorted(table.items(), key=lambda kv: (kv[0][0], BACKENDS.index(kv[0][1]))):
        base_step, base_mem = table.get((nproc, "plain"), (step, mem))
        rows.append([nproc, backend, f"{step * 1e3:.1f}", f"{step / base_step:.3f}", f"{mem:.0f}",
                     f"{mem / base_mem:.3f}"])
    print_table(["ranks", "engine", "step time (ms, median)", "vs plain", "peak RSS per rank (MB)", "vs plain"], rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({f"{n}x{b}": runs for (n, b), runs in results.items()}, f, indent=2)


if __name__ == "__main__":
    main()
