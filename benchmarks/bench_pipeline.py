"""Benchmark of ``gq tokenize`` (not a test): pipeline vs a plain PyTorch DataLoader loop, plus scaling costs.

    .venv/bin/python benchmarks/bench_pipeline.py                 # everything, writes docs/benchmarks.md section
    .venv/bin/python benchmarks/bench_pipeline.py --only throughput --images 120

Parts:
* ``throughput``: images/s of ``gq_pipeline.tokenize`` (default settings, which on one CPU node run the model in
  the driver; and ``model_placement="actors"`` for comparison) vs the usual DataLoader loop (``num_workers=1``, torch
  using every core) with the same model and preprocessing, and the pipeline's per-stage time split. The model is
  the small test UNet (no real checkpoint is available offline).
* ``driver``: how many rows/s the driver can assemble into units and commit (the design choice in
  docs/architecture.md), and Ray's object-store -> driver transfer rate for token rows.
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
    from tests.conftest import make_tiny_model

    return make_tiny_model(seed)


def make_images(root: str, n: int) -> list[str]:
    """Photo-like JPEGs of 300-480 px (so decode + resize cost something, as in real data)."""
    from PIL import Image

    from tests.conftest import _smooth_rgb

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(300, 420)), int(rng.integers(340, 480))
        p = os.path.join(root, f"img_{i:06d}.jpg")
        Image.fromarray(_smooth_rgb(h, w, i)).save(p, quality=90)
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
            "images_per_s": tp["images_per_s"], "first_output_s": tp["first_output_s"],
            "steady_images_per_s": round(tp["images"] / (tp["pipeline_s"] - tp["first_output_s"]), 2),
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


def _synthetic_unit_rows(uid: str, n: int, tokens_per_image: int, rng) -> "pa.Table":
    import pyarrow as pa

    from gq_pipeline.stages import TOKEN_SCHEMA

    tok = rng.integers(0, 65536, (n, tokens_per_image), dtype=np.uint16)
    cols = {"unit": [uid] * n, "idx": list(range(n)), "kind": ["ok"] * n, "key": [f"k{uid}-{i}" for i in range(n)],
            "source": [f"s3://b/{uid}.tar"] * n, "member": [f"{i:06d}" for i in range(n)], "width": [256] * n,
            "height": [256] * n, "extra": [b""] * n, "error": [""] * n, "message": [""] * n, "n": [0] * n,
            "info": [b""] * n, "tokens": [t.tobytes() for t in tok], "tg": [1] * n, "th": [32] * n, "tw": [32] * n,
            "latent": [b""] * n, "lc": [0] * n, "lh": [0] * n, "lw": [0] * n, "model_s": [0.0] * n}
    return pa.Table.from_pydict(cols, schema=TOKEN_SCHEMA)


def run_driver(args, work: str) -> dict:
    """The driver's share of the work (unit assembly) vs the commit work it hands to Ray tasks."""
    import pickle

    import pyarrow as pa
    import ray

    from gq_pipeline.assembly import CompleteUnit, UnitAssembler, commit_unit
    from gq_pipeline.committer import Committer
    from gq_pipeline.manifest import OutputStore
    from gq_pipeline.sources import Unit
    from gq_pipeline.stages import TOKEN_SCHEMA
    from gq_pipeline.writers import ShardContext

    rng = np.random.default_rng(0)
    n_units, per_unit = 24, 1000
    units = [Unit("tar", f"s3://b/shard-{i:05d}.tar") for i in range(n_units)]
    tables = []
    for u in units:
        t = _synthetic_unit_rows(u.unit_id, per_unit, 1024, rng)
        end = dict(t.slice(0, 1).to_pydict())
        end.update(kind=["end"], idx=[-1], n=[per_unit], tokens=[b""],
                   info=[pickle.dumps({"read_s": 0.0, "passthrough_schema": None, "image_column": None})])
        tables.append(pa.concat_tables([t, pa.Table.from_pydict(end, schema=TOKEN_SCHEMA)]))
    rows = n_units * per_unit
    res: dict = {"rows": rows, "units": n_units, "tokens_per_row": 1024}

    def stream(block: int, batch: int) -> list:
        """Rows cut into blocks of ``block`` consecutive rows of one unit, blocks interleaved at random, re-cut into
        batches of ``batch`` (what iter_batches yields after the actor pool)."""
        blocks = [t.slice(i, block) for t in tables for i in range(0, t.num_rows, block)]
        order = rng.permutation(len(blocks))
        merged = pa.concat_tables([blocks[i] for i in order]).combine_chunks()  # blocks are contiguous
        return [merged.slice(i, batch) for i in range(0, merged.num_rows, batch)]

    for name, block in (("realistic (32-row blocks interleaved)", 32), ("worst case (rows shuffled)", 1)):
        batches = stream(block, 256)
        best = float("inf")
        for _ in range(3):  # best of 3 (the first pass also pays one-off set-up costs)
            asm = UnitAssembler({u.unit_id: u for u in units})
            t0 = time.perf_counter()
            done = [d for b in batches for d in asm.add(b)]
            best = min(best, time.perf_counter() - t0)
        assert len(done) == n_units and all(isinstance(d, CompleteUnit) for d in done)
        res.setdefault("assembly_rows_per_s", {})[name] = round(rows / best)
    ctx = ShardContext("0123456789abcdef", "fedcba9876543210", 65536, 16, 42, 1.0, "unet",
                       {"image_size": 256, "crop": "center"})
    for formats in (("parquet",), ("parquet", "webdataset")):
        key = "+".join(formats)
        out = os.path.join(work, "driver-" + key)
        store = OutputStore(out)
        store.prepare()
        t0 = time.perf_counter()
        for d in done[:6]:
            commit_unit(store, ctx, formats, d)
        res.setdefault("commit_ms_per_1000_rows_one_thread", {})[key] = round((time.perf_counter() - t0) / 6 * 1e3, 1)
        shutil.rmtree(out, ignore_errors=True)
    init_ray(num_cpus=2, object_store_memory=400 << 20, log_to_driver=False)
    try:
        for formats in (("parquet",), ("parquet", "webdataset")):
            key = "+".join(formats)
            out = os.path.join(work, "tasks-" + key)
            store = OutputStore(out)
            store.prepare()
            committer = Committer(store, None, ctx, formats, parallel=8)
            for d in done[:8]:  # warm-up: start the task workers
                committer.submit(d)
            committer.drain()
            t0 = time.perf_counter()
            results = []
            for d in done:
                results += committer.submit(d)
            results += committer.drain()
            dt = time.perf_counter() - t0
            assert len(results) == n_units and not any(r.error for r in results)
            res.setdefault("commit_tasks_rows_per_s_2_cpus", {})[key] = round(rows / dt)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        ray.shutdown()
    res["ray_to_driver"] = _ray_transfer()
    return res


def _ray_transfer() -> dict:
    import ray

    from gq_pipeline.stages import TOKEN_SCHEMA

    def make(batch):
        n = len(batch["id"])
        r = np.random.default_rng(int(batch["id"][0]))
        t = _synthetic_unit_rows("u", n, 1024, r)
        assert t.schema == TOKEN_SCHEMA
        return t

    init_ray(num_cpus=2, object_store_memory=400 << 20, log_to_driver=False)
    try:
        n = 60_000
        ds = ray.data.range(n, override_num_blocks=60).map_batches(make, batch_size=1000, batch_format="numpy")
        ds = ds.materialize()  # time the object store -> driver path alone
        t0 = time.perf_counter()
        rows = 0
        for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows += b.num_rows
        dt = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {"rows": rows, "seconds": round(dt, 2), "rows_per_s": round(rows / dt),
            "mb_per_s": round(rows * 2048 / dt / 1e6), "note": "blocks already in the local object store"}


# ------------------------------------------------------------------------------------------------ scaling


def run_scaling(args, work: str) -> dict:
    import tracemalloc

    from gq_pipeline.sources import plan_units

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
    from tests.conftest import rgb_bytes

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
                msize = os.path.getsize(os.path.join(out, "manifest.json"))
                rec = os.path.getsize(os.path.join(out, "units", os.listdir(os.path.join(out, "units"))[0]))
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
             "errors_file": f"errors/u-{i:016x}-0123456789abcdef.parquet", "formats": ["parquet"],
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
        shared = {"format_version": 1, "model_fingerprint": "0123456789abcdef",
                  "codebook_fingerprint": "fedcba9876543210", "preprocess": {"image_size": 256, "crop": "center"}}
        for r in recs:
            with open(os.path.join(out, "units", r["unit_id"] + ".json"), "w") as f:
                json.dump({**r, **shared}, f)
        t0 = time.perf_counter()
        state = store.load()
        res["resume_load_s_20k_units_no_manifest"] = round(time.perf_counter() - t0, 2)
        manifest = {**shared, "units": [manifest_unit_entry(r) for r in state.records.values()]}
        store.write_manifest(manifest)
        res["manifest_bytes_per_unit_20k"] = round(os.path.getsize(os.path.join(out, "manifest.json")) / len(recs))
        t0 = time.perf_counter()
        state = store.load()
        res["resume_load_s_20k_units_with_manifest"] = round(time.perf_counter() - t0, 2)
        assert len(state.records) == len(recs)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    del recs

    # from_items cost for many units (driver -> object store): one block per unit vs the job's cap on blocks.
    from gq_pipeline.job import MAX_INPUT_BLOCKS

    init_ray(num_cpus=2, object_store_memory=300 << 20, log_to_driver=False)
    try:
        n = 20000
        items = [{"unit": json.dumps({"kind": "tar", "source": f"s3://bucket/shards/shard-{i:06d}.tar"})}
                 for i in range(n)]
        t0 = time.perf_counter()
        ray.data.from_items(items, override_num_blocks=n)
        res["from_items_s_per_1000_blocks"] = round((time.perf_counter() - t0) / n * 1000, 3)
        t0 = time.perf_counter()
        ray.data.from_items(items, override_num_blocks=min(n, MAX_INPUT_BLOCKS))
        res["from_items_s_20k_units_capped_blocks"] = round(time.perf_counter() - t0, 2)
    finally:
        ray.shutdown()
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
                  f"(placement `{b['gq']['model_placement']}`), Ray already started; "
                  "`--model-placement actors` (one actor with all but half a CPU, its start-up and warm-up "
                  "included) for comparison):",
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
        a = dr["assembly_rows_per_s"]
        c1, ct = dr["commit_ms_per_1000_rows_one_thread"], dr["commit_tasks_rows_per_s_2_cpus"]
        rt = dr["ray_to_driver"]
        lines += ["**Driver-side unit assembly vs commit work** (the design choice in docs/architecture.md): "
                  f"{dr['rows']} synthetic rows of 1024 uint16 tokens (256², K=65536) in {dr['units']} units:", "",
                  "| what | measured |", "|---|---|"]
        for k, v in a.items():
            lines.append(f"| driver: assemble units, {k} | {v} rows/s |")
        for k, v in c1.items():
            lines.append(f"| commit one unit ({k}), one thread | {v} ms per 1000 rows |")
        for k, v in ct.items():
            lines.append(f"| commit as Ray tasks ({k}), 8 in flight, this 2-CPU box | {v} rows/s |")
        lines.append(f"| Ray object store -> driver `iter_batches` ({rt['note']}) | {rt['rows_per_s']} rows/s |")
        lines.append("")
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
