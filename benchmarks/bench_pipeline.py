"""Benchmark of ``gq tokenize`` (not a test): pipeline vs a plain PyTorch DataLoader loop, plus scaling costs.

    .venv/bin/python benchmarks/bench_pipeline.py                 # everything, writes docs/benchmarks.md section
    .venv/bin/python benchmarks/bench_pipeline.py --only throughput --images 120

Parts:
* ``throughput``: images/s of ``gq_pipeline.tokenize`` (default settings, which on one CPU node run the model in
  the driver; and ``model_placement="actors"`` for comparison) vs the usual DataLoader loop (``num_workers=1``, torch
  using every core) with the same model and preprocessing, and the pipeline's per-stage time split. The model is
  the small test UNet (no real checkpoint is available offline).
* ``driver``: what the driver does per unit (CPU, bytes received) in a real actor-pool run, the scheduling loop's
  units/s, and the extrapolation to 1000 GPUs (docs/scaling.md).
* ``scaling``: listing speed, per-unit overhead, manifest bytes and driver memory per unit (docs/scaling.md).

Results are printed as JSON and the throughput/driver tables replace the ``## Tokenization pipeline`` section of
docs/benchmarks.md (``--no-write`` to skip).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from gq_pipeline.ray_init import init_ray  # noqa: E402

SECTION = "## Tokenization pipeline"


def _model(seed: int = 0):
    from benchmarks.synthetic import make_tiny_model

    return make_tiny_model(seed)


def make_images(root: str, n: int) -> list[str]:
    """Photo-like JPEGs of 300-480 px (so decode + resize cost something, as in real data)."""
    from PIL import Image

    from benchmarks.synthetic import smooth_rgb

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(300, 420)), int(rng.integers(340, 480))
        p = os.path.join(root, f"img_{i:06d}.jpg")
        Image.fromarray(smooth_rgb(h, w, i)).save(p, quality=90)
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------------ throughput


def bench_baseline(model, paths: list[str], size: int, batch: int, threads: int = 1) -> dict:
    """The usual script: Dataset(preprocess_image) -> DataLoader(num_workers=1) -> model.tokenize -> Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from torch.utils.data import DataLoader, Dataset

    from gq_pipeline import preprocess_image

    class Images(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with open(paths[i], "rb") as f:
                return preprocess_image(f.read(), size)

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    loader = DataLoader(Images(), batch_size=batch, num_workers=1)
    tokens, model_s, first = [], 0.0, None
    for x in loader:
        tm = time.perf_counter()
        tokens.append(model.tokenize(x).numpy().astype(np.uint16).reshape(len(x), -1))
        model_s += time.perf_counter() - tm
        first = first or time.perf_counter() - t0
    flat = np.concatenate(tokens)
    out = tempfile.mktemp(suffix=".parquet")
    pq.write_table(pa.table({"tokens": [t for t in flat]}), out)
    wall = time.perf_counter() - t0
    os.remove(out)
    return {"images": len(paths), "wall_s": round(wall, 2), "images_per_s": round(len(paths) / wall, 2),
            "first_output_s": round(first, 2), "steady_images_per_s": round(len(paths) / (wall - first), 2),
            "model_s": round(model_s, 2), "torch_threads": threads, "tokens": flat}


def bench_gq(model_dir: str, src: str, size: int, batch: int, unit_size: int, **kw) -> dict:
    import gq_pipeline

    out = tempfile.mkdtemp(prefix="gq-bench-")
    try:
        s = gq_pipeline.tokenize(model_dir, [src], out, image_size=size, batch_size=batch, unit_size=unit_size,
                                 progress=False, **kw)
        import pyarrow.parquet as pq

        t = pq.read_table(os.path.join(out, "parquet"))
        order = np.argsort(t.column("source").to_pylist())
        tokens = np.array(t.column("tokens").to_pylist(), dtype=np.uint16)[order]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    tp = s["throughput"]
    return {"images": tp["images"], "wall_s": tp["wall_s"], "pipeline_s": tp["pipeline_s"],
            "images_per_s": tp["images_per_s"], "first_output_s": round(tp["wall_s"] - tp["pipeline_s"], 2),
            "steady_images_per_s": tp["images_per_s"],
            "stage_busy_s": tp["stage_busy_s"], "time_split": tp["time_split"],
            "model_utilization": tp["model_utilization"],
            "model_placement": tp["resources"]["model_placement"], "tokens": tokens}


def run_throughput(args, work: str) -> dict:
    import ray

    src = os.path.join(work, "images")
    paths = make_images(src, args.images)
    model = _model()
    model_dir = os.path.join(work, "model")
    model.save_pretrained(model_dir)
    res: dict = {"images": args.images, "image_size": args.size, "batch_size": args.batch, "runs": []}
    init_ray(num_cpus=2, object_store_memory=400 << 20, log_to_driver=False)
    try:
        bench_gq(model_dir, src, args.size, args.batch, args.unit_size)  # warm-up (worker pool, page cache)
        threads = os.cpu_count() or 1
        for r in range(args.repeats):
            base = bench_baseline(model, paths, args.size, args.batch, threads=threads)
            gq = bench_gq(model_dir, src, args.size, args.batch, args.unit_size)  # default: auto placement
            actors = bench_gq(model_dir, src, args.size, args.batch, args.unit_size, model_placement="actors")
            loop_tokens, gq_tokens, actor_tokens = base.pop("tokens"), gq.pop("tokens"), actors.pop("tokens")
            same = bool(np.array_equal(loop_tokens, gq_tokens) and np.array_equal(gq_tokens, actor_tokens))
            base1 = bench_baseline(model, paths, args.size, args.batch, threads=1)
            gq1 = bench_gq(model_dir, src, args.size, args.batch, args.unit_size, cpus_per_worker=1.0,
                           model_placement=gq["model_placement"])
            base1.pop("tokens"), gq1.pop("tokens")
            res["runs"].append({"baseline": base, "gq": gq, "ratio": round(gq["images_per_s"] /
                                                                            base["images_per_s"], 3),
                                "gq_actors": actors,
                                "ratio_actors": round(actors["images_per_s"] / base["images_per_s"], 3),
                                "steady_ratio": round(gq["steady_images_per_s"] / base["steady_images_per_s"], 3),
                                "tokens_identical": same, "baseline_1_thread": base1, "gq_1_thread": gq1,
                                "ratio_1_thread": round(gq1["images_per_s"] / base1["images_per_s"], 3),
                                "loadavg_1min_after": round(os.getloadavg()[0], 1)})
            print(json.dumps(res["runs"][-1]), flush=True)
    finally:
        ray.shutdown()
    best = max(res["runs"], key=lambda r: r["ratio"])
    res["median_ratio"] = float(np.median([r["ratio"] for r in res["runs"]]))
    res["median_ratio_1_thread"] = float(np.median([r["ratio_1_thread"] for r in res["runs"]]))
    res["median_ratio_actors"] = float(np.median([r["ratio_actors"] for r in res["runs"]]))
    res["median_steady_ratio"] = float(np.median([r["steady_ratio"] for r in res["runs"]]))
    res["best"] = best
    return res


# ------------------------------------------------------------------------------------------------ driver capacity


OLD_DESIGN_REV = "576ba90"  # the last commit of the first-wave data plane (rows assembled on the driver)
OLD_DESIGN_SCRIPT = """
import json, resource, sys
import ray, ray.data
import gq_pipeline
from gq_pipeline.ray_init import init_ray

received = [0]
original = ray.data.Dataset.iter_batches

def counting_iter_batches(self, *a, **kw):  # measures what reaches the driver; changes nothing
    for batch in original(self, *a, **kw):
        received[0] += batch.nbytes
        yield batch

ray.data.Dataset.iter_batches = counting_iter_batches
model_dir, src, out, size, batch, unit_size = sys.argv[1:7]
init_ray(num_cpus=2, object_store_memory=300 << 20, log_to_driver=False)
cpu0 = resource.getrusage(resource.RUSAGE_SELF)
s = gq_pipeline.tokenize(model_dir, [src], out, image_size=int(size), batch_size=int(batch),
                         unit_size=int(unit_size), progress=False, model_placement="actors")
cpu1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
print("RESULT " + json.dumps({"images": s["throughput"]["images"], "cpu_s": cpu, "bytes": received[0]}))
"""


def _old_design_driver(args, work: str, model_dir: str, src: str) -> dict:
    """The same actor-pool run on the first-wave data plane, checked out from git history into a temp tree."""
    import subprocess

    tree = os.path.join(work, "old-design")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.makedirs(tree, exist_ok=True)
    archive = subprocess.run(["git", "-C", repo, "archive", OLD_DESIGN_REV], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    env = dict(os.environ, PYTHONPATH=tree)
    out = os.path.join(work, "old-design-out")
    p = subprocess.run([sys.executable, "-c", OLD_DESIGN_SCRIPT, model_dir, src, out, str(args.size),
                        str(args.batch), str(args.unit_size)], cwd=tree, env=env, capture_output=True, text=True,
                       timeout=1800)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        return {"error": p.stderr[-2000:]}
    r = json.loads(line[-1][7:])
    shutil.rmtree(out, ignore_errors=True)
    return {"rev": OLD_DESIGN_REV, "images": r["images"],
            "driver_cpu_s_per_1000_images": round(1000 * r["cpu_s"] / r["images"], 3),
            "driver_bytes_per_1000_images": round(1000 * r["bytes"] / r["images"])}


def run_driver(args, work: str) -> dict:
    """What the driver does per unit in the v2 data plane (the unit is the task): CPU seconds and bytes received
    per 1000 images in a real actor-pool run, and how many unit outcomes per second its scheduling loop handles."""
    import resource

    import ray

    import gq_pipeline
    from gq_pipeline.scheduler import FailureBudget, LocalPool, run_units

    src = os.path.join(work, "images")
    if not os.path.isdir(src):
        make_images(src, args.images)
    model_dir = os.path.join(work, "model")
    if not os.path.isdir(model_dir):
        _model().save_pretrained(model_dir)
    res: dict = {}
    init_ray(num_cpus=2, object_store_memory=300 << 20, log_to_driver=False)
    try:
        out = os.path.join(work, "driver-run")
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        s = gq_pipeline.tokenize(model_dir, [src], out, image_size=args.size, batch_size=args.batch,
                                 unit_size=args.unit_size, progress=False, model_placement="actors")
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        shutil.rmtree(out, ignore_errors=True)
    finally:
        ray.shutdown()
    n = s["throughput"]["images"]
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    res["old_design_run"] = _old_design_driver(args, work, model_dir, src)
    res["actor_run"] = {"images": n, "units": s["units_committed"],
                        "driver_cpu_s_per_1000_images": round(1000 * cpu / n, 3),
                        "driver_bytes_per_1000_images": round(1000 * s["throughput"]["driver_bytes_received"] / n),
                        "note": "driver CPU covers the whole call: model load, planning, Ray client, manifest"}
    # The scheduling loop alone: outcomes the size of a real commit record, returned at once.
    record = {"format_version": 1, "unit_id": "u" * 16, "kind": "tar", "source": "s3://bucket/shards/000000.tar",
              "inputs": 1000, "tokenized": 998, "errors": 2, "errors_by_kind": {"decode": 2},
              "shards": [{"format": "parquet", "path": "parquet/" + "u" * 16 + "-" + "f" * 16 + ".parquet",
                          "rows": 998, "bytes": 2_400_000, "sha256": "0" * 64}],
              "errors_file": ".gq/errors/x.parquet", "formats": ["parquet"], "latents": False,
              "model_fingerprint": "f" * 16, "codebook_fingerprint": "e" * 16,
              "preprocess": {"image_size": 256, "crop": "center"}}
    n_units = 20_000

    def instant(unit):
        return {"unit_id": unit["unit_id"], "source": unit["source"], "status": "committed", "record": record,
                "error": None, "inputs": 1000, "read_s": 1.0, "model_s": 1.0, "write_s": 0.1}

    units = ({"unit_id": f"{i:016x}", "kind": "tar", "source": f"s3://b/{i:06d}.tar"} for i in range(n_units))
    pool = LocalPool(instant, concurrency=8)
    t0, c0 = time.perf_counter(), time.process_time()
    stats = run_units(pool, units, budget=FailureBudget(None, n_units))
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    pool.close()
    assert len(stats.committed) == n_units
    res["scheduler_loop"] = {"units": n_units, "units_per_s": round(n_units / dt),
                             "cpu_ms_per_unit": round(1e3 * dc / n_units, 3),
                             "bytes_per_unit": round(stats.outcome_bytes / n_units)}
    # at 1000 GPUs x 1500 img/s and 1000-image units: 1500 unit outcomes/s reach the driver
    per_unit_ms = res["scheduler_loop"]["cpu_ms_per_unit"]
    res["extrapolation_1000_gpus"] = {"unit_outcomes_per_s": 1500,
                                      "driver_cores_busy": round(1500 * per_unit_ms / 1e3, 3),
                                      "driver_mb_per_s": round(1500 * res["scheduler_loop"]["bytes_per_unit"] / 1e6,
                                                               3)}
    return res


# ------------------------------------------------------------------------------------------------ scaling


def run_scaling(args, work: str) -> dict:
    import tracemalloc

    from gq_pipeline.planning import plan_units

    res: dict = {}
    # Listing: many files in many directories, on tmpfs (measures our code + fsspec, not the disk).
    base = tempfile.mkdtemp(prefix="gq-list-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        n_dirs, per_dir = 100, args.list_files // 100
        for d in range(n_dirs):
            dd = os.path.join(base, f"d{d:03d}")
            os.makedirs(dd)
            for i in range(per_dir):
                open(os.path.join(dd, f"{i:07d}.jpg"), "wb").close()
        t0 = time.perf_counter()
        plan = plan_units([base], unit_size=1000)
        dt = time.perf_counter() - t0
        tracemalloc.start()  # a second pass for memory (tracing slows Python down several-fold)
        plan = plan_units([base], unit_size=1000)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        n = n_dirs * per_dir
        res["listing_local"] = {"files": n, "units": len(plan.units), "seconds": round(dt, 2),
                                "files_per_s": round(n / dt), "peak_bytes_per_file": round(peak / n)}
        units = plan.units
        items = [{"unit": json.dumps(u.to_dict())} for u in units]
        res["unit_description_bytes_per_file"] = round(sum(len(i["unit"]) for i in items) / n, 1)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    # Per-unit overhead: the same 64 small images as 64 units of 1 vs 1 unit of 64.
    import ray

    import gq_pipeline

    src = os.path.join(work, "small")
    os.makedirs(src, exist_ok=True)
    from benchmarks.synthetic import rgb_bytes

    for i in range(64):
        with open(os.path.join(src, f"s{i:03d}.jpg"), "wb") as f:
            f.write(rgb_bytes(40, 40, seed=i))
    model = _model()
    init_ray(num_cpus=2, object_store_memory=300 << 20, log_to_driver=False)
    try:
        timings = {}
        for unit_size in (64, 64, 1):
            out = tempfile.mkdtemp(prefix="gq-units-")
            s = gq_pipeline.tokenize(model, [src], out, image_size=32, unit_size=unit_size, batch_size=16,
                                     format="both", progress=False)
            timings[unit_size] = s["throughput"]["pipeline_s"]
            if unit_size == 1:
                msize = os.path.getsize(os.path.join(out, ".gq", "manifest.json"))
                units_dir = os.path.join(out, ".gq", "units")
                rec = os.path.getsize(os.path.join(units_dir, os.listdir(units_dir)[0]))
                res["manifest_bytes_per_unit"] = round(msize / 64)
                res["commit_record_bytes"] = rec
            shutil.rmtree(out, ignore_errors=True)
        res["per_unit_overhead_s"] = round((timings[1] - timings[64]) / 63, 4)
        res["pipeline_s_64_units_of_1"] = timings[1]
        res["pipeline_s_1_unit_of_64"] = timings[64]
    finally:
        ray.shutdown()

    # Driver memory per committed-unit record kept for the manifest.
    tracemalloc.start()
    recs = [{"unit_id": f"u-{i:016x}", "kind": "tar", "source": f"s3://bucket/shards/shard-{i:06d}.tar",
             "inputs": 1000, "tokenized": 998, "errors": 2, "errors_by_kind": {"decode": 2},
             "shards": [{"format": "parquet", "path": f"parquet/u-{i:016x}-0123456789abcdef.parquet", "rows": 998,
                         "bytes": 2100000, "sha256": "%064x" % i}],
             "errors_file": f".gq/errors/u-{i:016x}-0123456789abcdef.parquet", "formats": ["parquet"],
             "latents": False} for i in range(20000)]
    cur, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    res["driver_bytes_per_record"] = round(cur / len(recs))

    # Resume cost: loading 20k committed units with and without an up-to-date manifest.json.
    from gq_pipeline.manifest import OutputStore, manifest_unit_entry

    out = tempfile.mkdtemp(prefix="gq-resume-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        store = OutputStore(out)
        store.prepare()
        shared = {"format_version": 2, "model_fingerprint": "0123456789abcdef",
                  "codebook_fingerprint": "fedcba9876543210", "preprocess": {"image_size": 256, "crop": "center"}}
        for r in recs:
            with open(os.path.join(out, ".gq", "units", r["unit_id"] + ".json"), "w") as f:
                json.dump({**r, **shared}, f)
        t0 = time.perf_counter()
        state = store.load()
        res["resume_load_s_20k_units_no_manifest"] = round(time.perf_counter() - t0, 2)
        manifest = {**shared, "units": [manifest_unit_entry(r) for r in state.records.values()]}
        store.write_manifest(manifest)
        res["manifest_bytes_per_unit_20k"] = round(os.path.getsize(os.path.join(out, ".gq", "manifest.json"))
                                                   / len(recs))
        t0 = time.perf_counter()
        state = store.load()
        res["resume_load_s_20k_units_with_manifest"] = round(time.perf_counter() - t0, 2)
        assert len(state.records) == len(recs)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    del recs

    return res


# ------------------------------------------------------------------------------------------------ report


def write_markdown(results: dict, path: str) -> None:
    tp, dr = results.get("throughput"), results.get("driver")
    lines = [SECTION, "",
             f"Measured by `benchmarks/bench_pipeline.py` on {results['machine']} "
             f"({results['date']}). CPU only; the model is the small test UNet (ch 32, 4 levels, K=4096), "
             "so absolute numbers say little about real models; the ratio and the split are the point.", ""]
    if tp:
        b = tp["best"]
        lines += [f"**gq tokenize vs a plain DataLoader loop** ({tp['images']} JPEGs of 300-480 px -> "
                  f"{tp['image_size']}², batch {tp['batch_size']}; the loop: `DataLoader(num_workers=1)` + "
                  "`model.tokenize` with torch on all cores + one Parquet write; gq tokenize: default settings "
                  f"(placement `{b['gq']['model_placement']}`: this process, two decode threads), Ray already "
                  "started; `--model-placement actors` (one worker actor holding the node's CPUs, its start-up and "
                  "warm-up included) for comparison):",
                  "", "| run | loop img/s | gq tokenize img/s | ratio | start-up s (loop / gq) | steady-state ratio "
                      "| actors img/s | ratio | loop, 1 thread | gq, 1 thread (`--cpus-per-worker 1`) | ratio "
                      "| tokens identical | load avg |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(tp["runs"]):
            lines.append(f"| {i + 1} | {r['baseline']['images_per_s']} | {r['gq']['images_per_s']} | "
                         f"{r['ratio']} | {r['baseline']['first_output_s']} / {r['gq']['first_output_s']} | "
                         f"{r['steady_ratio']} | {r['gq_actors']['images_per_s']} | {r['ratio_actors']} | "
                         f"{r['baseline_1_thread']['images_per_s']} | "
                         f"{r['gq_1_thread']['images_per_s']} | {r['ratio_1_thread']} | {r['tokens_identical']} | "
                         f"{r.get('loadavg_1min_after', '')} |")
        g = b["gq"]
        lines += ["", f"Median ratio **{tp['median_ratio']:.3f}** end to end with default settings (goal ≥ 0.9), "
                      f"**{tp['median_steady_ratio']:.3f}** in steady state (after the first output), "
                      f"{tp['median_ratio_1_thread']:.3f} end to end with one torch thread on both sides, and "
                      f"{tp['median_ratio_actors']:.3f} for the actor pool. Single runs on this 2-core box vary by "
                      "±10 % or more (load average column); the sides of a ratio ran back to back.", "",
                  "Pipeline stage busy time (best run): " + ", ".join(
                      f"{k.replace('_s', '')} {v} s" for k, v in g["stage_busy_s"].items())
                  + "; split " + ", ".join(f"{k.replace('_s', '')} {v:.0%}" for k, v in g["time_split"].items())
                  + f"; model utilization {g['model_utilization']:.0%} of the pipeline's "
                    f"{g['pipeline_s']} s (the rest is start-up and the pipeline's fill/drain).", ""]
    if dr:
        ar, sl, ex = dr["actor_run"], dr["scheduler_loop"], dr["extrapolation_1000_gpus"]
        od = dr.get("old_design_run", {})
        lines += ["**What reaches the driver** (v2: the unit is the task; docs/scaling.md):", "",
                  "| what | measured |", "|---|---|",
                  f"| first-wave data plane ({od.get('rev')}), same run and inputs: driver CPU, bytes received | "
                  f"{od.get('driver_cpu_s_per_1000_images')} s and {od.get('driver_bytes_per_1000_images')} B per "
                  "1000 images |",
                  f"| actor-pool run, {ar['images']} images in {ar['units']} units: driver CPU | "
                  f"{ar['driver_cpu_s_per_1000_images']} s per 1000 images ({ar['note']}) |",
                  f"| same run: bytes received by the driver | {ar['driver_bytes_per_1000_images']} B per 1000 "
                  "images |",
                  f"| scheduling loop alone, {sl['units']} record-sized outcomes | {sl['units_per_s']} units/s, "
                  f"{sl['cpu_ms_per_unit']} ms CPU and {sl['bytes_per_unit']} B per unit |",
                  f"| extrapolated to 1000 GPUs x 1500 img/s, 1000-image units | {ex['unit_outcomes_per_s']} "
                  f"outcomes/s: {ex['driver_cores_busy']} driver cores, {ex['driver_mb_per_s']} MB/s |", ""]
    text = "\n".join(lines) + "\n"
    existing = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if SECTION in existing:
        start = existing.index(SECTION)
        nxt = existing.find("\n## ", start + len(SECTION))
        existing = existing[:start] + text + (existing[nxt + 1:] if nxt >= 0 else "")
    else:
        existing = existing.rstrip("\n") + "\n\n" + text
    with open(path, "w") as f:
        f.write(existing)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["throughput", "driver", "scaling"], action="append")
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--unit-size", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--list-files", type=int, default=100_000)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--merge-json", action="append", default=[],
                   help="results of earlier runs to merge in (parts measured in this run win) before writing docs")
    args = p.parse_args()
    parts = args.only or ["throughput", "driver", "scaling"]
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
               "date": time.strftime("%Y-%m-%d")}
    work = tempfile.mkdtemp(prefix="gq-bench-")
    try:
        if "throughput" in parts:
            results["throughput"] = run_throughput(args, work)
        if "driver" in parts:
            results["driver"] = run_driver(args, work)
        if "scaling" in parts:
            results["scaling"] = run_scaling(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for path in args.merge_json:
        with open(path) as f:
            earlier = json.load(f)
        for part in ("throughput", "driver", "scaling"):
            if part not in results and part in earlier:
                results[part] = earlier[part]
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not args.no_write and ("throughput" in parts or "driver" in parts):
        write_markdown(results, os.path.join(ROOT, "docs", "benchmarks.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
