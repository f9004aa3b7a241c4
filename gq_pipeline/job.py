"""``gq_pipeline.tokenize``: the whole tokenization job (plan -> Ray Data pipeline -> per-unit commits -> manifest).

Data flow::

    driver: list inputs -> units; skip committed units (units/*.json)
    ray.data.from_items(units)                                   one row per unit
      .map_batches(read_units, batch_size=1)                     CPU tasks: read + decode + preprocess, streamed
      .map_batches(TokenizerActor, ActorPoolStrategy, batch_size=B)   model once per actor; GPU or CPU
    driver: iter_batches [-> TokenizerActor in-process, driver placement] -> UnitAssembler
            -> commit tasks: shards, error file, commit record (last)

The driver assembles units from the streamed results rather than writing from the actors: Ray Data's writers name
files by UUID and do not keep a unit together, and per-unit tasks with ``batch_size=None`` would make the model
stage's batch size equal to a unit. Measurements and the trade-off are in docs/architecture.md ("Pipeline").
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from typing import Any, Sequence

import numpy as np

from gq_pipeline.assembly import FailedUnit, UnitAssembler
from gq_pipeline.lease import OutputLease
from gq_pipeline.manifest import OutputStore, manifest_unit_entry
from gq_pipeline.model_loader import load_model
from gq_pipeline.preprocess import CROP_MODES, DEFAULT_MAX_PIXELS
from gq_pipeline.records import FORMAT_VERSION
from gq_pipeline.replan import reconcile_with_committed
from gq_pipeline.sources import plan_units
from gq_pipeline.writers import ShardContext

__all__ = ["tokenize", "JobError", "FORMATS", "PRECISIONS", "PLACEMENTS"]

FORMATS = {"parquet": ("parquet",), "webdataset": ("webdataset",), "both": ("parquet", "webdataset")}
PRECISIONS = ("fp32", "bf16")
PLACEMENTS = ("auto", "driver", "actors")
MAX_INPUT_BLOCKS = 2000
DRIVER_READ_TASKS = 2  # concurrent read/decode tasks feeding a model in the driver


class JobError(RuntimeError):
    """The Ray pipeline failed (e.g. the model raises on every image): committed units stay, the rest is redone."""


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[gq tokenize] {msg}", file=sys.stderr, flush=True)


def _ensure_ray(ray_address: str | None, num_cpus: int | None, object_store_memory: int | None) -> bool:
    """Connect to ``ray_address``/``RAY_ADDRESS`` if given, else start a local cluster. True if we started it."""
    from gq_pipeline.ray_init import init_ray

    kwargs: dict[str, Any] = {}
    if num_cpus:
        kwargs["num_cpus"] = int(num_cpus)
    if object_store_memory:
        kwargs["object_store_memory"] = int(object_store_memory)
    return init_ray(ray_address, **kwargs)


def _resources(gpus_per_worker, workers, cpus_per_worker, read_cpus, writers, model_placement) -> dict[str, Any]:
    """Where the model runs, actors, CPUs/GPUs per actor and per read task, and concurrent commits for the
    connected cluster."""
    import ray

    cluster = ray.cluster_resources()
    n_gpu, n_cpu = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 1))
    gpw = (1.0 if n_gpu > 0 else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
    if gpw > 0 and n_gpu == 0:
        raise ValueError(f"--gpus-per-worker {gpw} but the Ray cluster has no GPUs")
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    # A driver outside the cluster (Ray Client) would pull every decoded image over the network: it counts as a
    # second node, so auto keeps the model on the cluster.
    on_cluster = ray.get_runtime_context().get_node_id() in nodes
    placement = _model_placement(model_placement, gpw, len(nodes) + (0 if on_cluster else 1), workers,
                                 cpus_per_worker)
    if placement == "driver":
        workers, cpus_per_worker, read_cpus = 1, cpus_per_worker or n_cpu, read_cpus or 0.25
    else:
        workers, cpus_per_worker, read_cpus = _placement(gpw, n_gpu, workers, cpus_per_worker, read_cpus)
    # Commit tasks take no CPU reservation; each new one may start a worker process (~1 s of CPU), so small clusters
    # get few, large ones enough for ~40 ms of CPU per 1000 images at 100k+ images/s.
    writers = writers or int(min(32, max(2, n_cpu // 4)))
    return {"cluster_cpus": n_cpu, "cluster_gpus": n_gpu, "model_placement": placement, "workers": workers,
            "gpus_per_worker": gpw, "cpus_per_worker": float(cpus_per_worker), "read_cpus": read_cpus,
            "writers": writers}


def _model_placement(requested: str, gpw: float, n_nodes: int, workers: int | None,
                     cpus_per_worker: float | None) -> str:
    """``driver``: this process runs the encoder and search on the batches the read tasks decode; ``actors``: a Ray
    actor pool does.

    ``auto`` picks the driver on a single CPU-only node, with no actor settings asked for. There an actor buys nothing
    and costs a process start, a second torch import, the weights' transfer and one more object-store hop per
    batch: on a 2-core machine the actor pool reached 0.74-0.85 of a plain DataLoader loop's images/s and the
    driver 0.90-1.11, median 1.0 (docs/benchmarks.md). GPUs and several nodes take actors: one per GPU, fed by
    read tasks everywhere.
    """
    if requested not in PLACEMENTS:
        raise ValueError(f"model placement must be one of {PLACEMENTS}, got {requested!r}")
    if requested == "driver" and gpw > 0:
        raise ValueError("--model-placement driver runs the model on this process's CPU, but the run asks for GPU "
                         "actors (the cluster has GPUs): use --model-placement actors, or --gpus-per-worker 0")
    if requested == "driver" and workers not in (None, 1):
        raise ValueError(f"--model-placement driver runs one model, in this process; --workers {workers} asks for "
                         f"an actor pool")
    if requested != "auto":
        return requested
    return "driver" if gpw == 0 and n_nodes <= 1 and workers in (None, 1) and cpus_per_worker is None else "actors"


def _build_dataset(gq, todo, cfg: dict[str, Any], res: dict[str, Any], *, batch_size: int, precision: str,
                   latents: bool):
    """units -> read/decode tasks [-> model actor pool] (lazy Ray Dataset; the driver placement stops after the
    read tasks and runs the model in :func:`_drive`)."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from gq_pipeline.stages import TokenizerActor, model_payload, read_units

    read_task_memory = int(min(2 << 30, max(256 << 20, 4 * cfg["max_pixels"] + (64 << 20))))
    items = [{"unit": json.dumps(u.to_dict())} for u in todo]
    # One block per unit up to 2000 blocks (then several units per read task): from_items puts every block in the
    # object store from the driver, ~1.3 ms each, which would take minutes for millions of units.
    n_blocks = min(len(items), MAX_INPUT_BLOCKS)
    ds = ray.data.from_items(items, override_num_blocks=n_blocks)
    # The memory reservation (a decode of up to --max-pixels) also makes the read's remote args differ from the
    # actor's, which stops Ray fusing the read into the actor: fused, decoding would run serially with the model.
    read_kwargs: dict[str, Any] = {}
    if res["model_placement"] == "driver":
        # The driver's torch threads hold every core without a Ray reservation, so Ray would start CPUs / read_cpus
        # decode tasks at once (8 on 2 cores). Niced, they still take CPU from the model's threads while runnable
        # (measured: model time +15-20 %, 0.82 of the DataLoader loop instead of 0.92-0.94). Two, as beside a CPU
        # actor, keep ahead of any encoder: a decode costs a few percent of an encode on CPU.
        read_kwargs["compute"] = TaskPoolStrategy(size=min(DRIVER_READ_TASKS, n_blocks))
    ds = ds.map_batches(read_units, batch_size=1, batch_format="pyarrow", fn_kwargs={"cfg": cfg},
                        num_cpus=res["read_cpus"], memory=read_task_memory, **read_kwargs)
    if res["model_placement"] == "driver":
        return ds
    payload_ref = ray.put(model_payload(gq))
    actor_kwargs = {"num_cpus": res["cpus_per_worker"]}
    if res["gpus_per_worker"] > 0:
        actor_kwargs["num_gpus"] = res["gpus_per_worker"]
    return ds.map_batches(TokenizerActor, batch_size=batch_size, batch_format="pyarrow",
                          compute=ActorPoolStrategy(size=res["workers"]),
                          fn_constructor_kwargs={"payload_ref": [payload_ref], "batch_size": batch_size,
                                                 "precision": precision, "latents": latents,
                                                 "use_gpu": res["gpus_per_worker"] > 0,
                                                 "cpu_threads": max(1, int(math.ceil(res["cpus_per_worker"] - 1e-9))),
                                                 "warmup_size": cfg["image_size"]},
                          **actor_kwargs)


def _placement(gpw: float, n_gpu: float, workers: int | None, cpus_per_worker: float | None,
               read_cpus: float | None) -> tuple[int, float, float]:
    """(actors, CPUs per actor, logical CPUs per read task).

    GPU clusters: one actor per ``gpw`` GPUs with 1 CPU to feed it; read tasks take 1 CPU each (decode is the
    bottleneck there). CPU-only clusters: the encoder costs 20-100x a JPEG decode + resize, so each node gets one
    actor holding all but half a CPU (its torch threads use every core) and read tasks are logical quarter-CPUs
    that share the cores while the model waits for input (a fixed 1-CPU read + 1-CPU model split measured 35% slower
    than a plain 2-thread loop on a 2-core machine; docs/benchmarks.md).
    """
    import ray

    if gpw > 0:
        return (workers or max(1, int(n_gpu // gpw)), cpus_per_worker or 1.0, read_cpus or 1.0)
    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    per_node = min(nodes) if nodes else 1.0
    read_cpus = read_cpus or 0.25
    if cpus_per_worker is None:
        count = workers or len(nodes) or 1
        cpus_per_worker = max(1.0, per_node * len(nodes or [1]) / count - 2 * read_cpus)
        cpus_per_worker = min(cpus_per_worker, max(1.0, per_node - 2 * read_cpus))
    return (workers or max(1, len(nodes)), float(cpus_per_worker), float(read_cpus))


def _check_first_parquet(units, image_column: str | None, storage_options: dict | None) -> None:
    """Fail fast on a wrong or missing image column (one footer read) instead of failing every Parquet unit."""
    import pyarrow.parquet as pq

    from gq_pipeline.sources import find_image_column, get_fs

    first = next((u for u in units if u.kind == "parquet"), None)
    if first is None:
        return
    fs, path = get_fs(first.source, storage_options)
    try:
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
    except Exception:  # unreadable files are reported per unit later
        return
    try:
        find_image_column(schema, image_column)
    except ValueError as e:
        raise ValueError(f"{first.source}: {e}") from None


def _usage(hist: np.ndarray | None) -> dict[str, Any]:
    """``gq_model.metrics.usage_stats`` of this run's token histogram, under the manifest's names."""
    if hist is None or hist.sum() == 0:
        return {"scope": "this run", "tokens": 0}
    import torch

    from gq_model.metrics.codebook_usage import usage_stats

    s = usage_stats(torch.from_numpy(hist))
    return {"scope": "this run", "tokens": s["tokens"], "codes_used": s["used"], "codebook_size": int(hist.size),
            "usage_fraction": s["usage"], "entropy_bits": round(s["entropy_bits"], 4),
            "perplexity": round(s["perplexity"], 2)}


def tokenize(model: Any, inputs: str | Sequence[str], output: str, *, format: str = "parquet",
             image_size: int = 256, crop: str = "center", batch_size: int = 64, workers: int | None = None,
             gpus_per_worker: float | None = None, cpus_per_worker: float | None = None,
             read_cpus: float | None = None, latents: bool = False,
             precision: str = "fp32", config: str | None = None, preset: str | None = None,
             unit_size: int = 1000, max_pixels: int = DEFAULT_MAX_PIXELS, image_column: str | None = None,
             storage_options: dict | None = None, writers: int | None = None, progress: bool = True,
             ray_address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None,
             trust_checkpoint: bool = False, read_chunk_rows: int = 32, model_placement: str = "auto",
             force_lease: bool = False) -> dict[str, Any]:
    """Tokenize image inputs into token shards under ``output``; returns the run summary (also in manifest.json).

    Safe to rerun after a crash: committed units are skipped, unfinished ones redone with identical output names
    and bytes. See ``gq tokenize --help`` for the options and docs/token-format.md for what is written.
    """
    t_start = time.perf_counter()
    if isinstance(inputs, str):
        inputs = [inputs]
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if batch_size < 1 or unit_size < 1 or max_pixels < 1:
        raise ValueError("batch_size, unit_size and max_pixels must be positive")
    formats = FORMATS[format]
    store = OutputStore(output, storage_options)

    # ---------------------------------------------------------------- model and its identity
    gq = load_model(model, config=config, preset=preset, trust_checkpoint=trust_checkpoint,
                    storage_options=storage_options)
    factor = gq.downsample_factor
    if image_size % factor:
        raise ValueError(f"--image-size {image_size} is not a multiple of the model's downsampling factor {factor}")
    if gq.config.arch == "vit":
        fixed = int(gq.config.encoder["image_size"])
        if image_size != fixed or crop != "center":
            raise ValueError(f"this ViT model takes {fixed}x{fixed} images only: use --image-size {fixed} "
                             f"--crop center")
    preprocess = {"image_size": int(image_size), "crop": crop, "resize": "PIL bicubic, shorter side",
                  "multiple_of": factor, "alpha": "composite on white", "max_pixels": int(max_pixels),
                  "encoder_precision": precision}  # bf16 changes ~2% of tokens: never mixed in one output
    c = gq.config
    ctx = ShardContext(model_fingerprint=gq.model_fingerprint, codebook_fingerprint=gq.fingerprint,
                       codebook_size=c.codebook_size, group=c.group, seed=c.seed, beta=c.beta, arch=c.arch,
                       preprocess=preprocess, latents=latents)

    # ---------------------------------------------------------------- plan, guard, resume
    t0 = time.perf_counter()
    plan = plan_units(list(inputs), unit_size, storage_options)
    _log(progress, f"listed {plan.listed} files into {len(plan.units)} units in {plan.list_s:.2f}s"
                   + (f" ({plan.ignored} non-image files ignored, e.g. {plan.ignored_examples[0]})"
                      if plan.ignored else ""))
    _check_first_parquet(plan.units, image_column, storage_options)
    # One writer per output (gq_pipeline.lease): taken before the state is read, so no other run commits between
    # the listing this run plans from and its own commits; a second run refuses here.
    with OutputLease.for_store(store, force=force_lease, log=lambda m: _log(progress, m)) as lease:
        state = store.load()
        store.check_compatible(state, ctx)
        store.prepare(temp_stale_s=lease.temp_grace_s)  # after the check: a refused output is left as it was
        records = dict(state.records)
        replanned = reconcile_with_committed(plan.units, records, unit_size, store.committed_sources)
        if replanned.changed_dirs:
            _log(progress, "note: " + replanned.describe())

        def is_done(uid: str) -> bool:
            r = records.get(uid)
            return r is not None and set(formats) <= set(r.get("formats", ())) and (not latents or r.get("latents"))

        todo = [u for u in replanned.units if not is_done(u.unit_id)]
        skipped = len(replanned.units) - len(todo)
        plan_s = time.perf_counter() - t0
        _log(progress, f"{skipped} units already committed, {len(todo)} to do")

        # ---------------------------------------------------------------- run
        failed: list[dict[str, str]] = []
        new_records: list[dict[str, Any]] = []
        known_records: list[dict[str, Any]] = []  # units found committed already at commit time: not this run's
        hist_total: np.ndarray | None = None
        stage = {"read_decode_s": 0.0, "model_s": 0.0, "write_s": 0.0, "driver_wait_s": 0.0, "driver_assemble_s": 0.0}
        pipeline_s = 0.0
        pipeline_error: Exception | None = None
        resources: dict[str, Any] = {}
        if todo:
            import ray
            from ray.data import DataContext

            started = _ensure_ray(ray_address, num_cpus, object_store_memory)
            dctx = DataContext.get_current()
            saved_ctx = (dctx.enable_progress_bars, dctx.target_max_block_size)
            try:
                resources = _resources(gpus_per_worker, workers, cpus_per_worker, read_cpus, writers, model_placement)
                if precision == "bf16" and resources["gpus_per_worker"] == 0:
                    raise ValueError("--precision bf16 runs the encoder in bf16 on GPU actors, but this run has none "
                                     "(no GPUs in the cluster, or --gpus-per-worker 0); use --precision fp32")
                if resources["model_placement"] == "driver":
                    _log(progress, f"model in this process ({resources['cpus_per_worker']:g} CPU threads); cluster "
                                   f"{resources['cluster_cpus']:g} CPU for reading and committing")
                else:
                    _log(progress, f"{resources['workers']} model actor(s), {resources['gpus_per_worker']:g} GPU / "
                                   f"{resources['cpus_per_worker']:g} CPU each; cluster {resources['cluster_cpus']:g} "
                                   f"CPU {resources['cluster_gpus']:g} GPU")
                dctx.enable_progress_bars = False
                # Ray Data merges a task's outputs into blocks of up to 128 MiB, so a whole unit reached the actor pool
                # as one block, became one actor task, and its tokens reached the driver only when the unit was done
                # (measured: first output after 31 s of a 33 s run). Blocks of about one model batch of decoded images
                # keep actor tasks at a batch or two and results streaming. (A streaming repartition would do the same
                # but runs as its own 1-CPU operator, which deadlocked next to a CPU actor on a 2-CPU node.)
                dctx.target_max_block_size = max(1 << 20, batch_size * 3 * image_size * image_size
                                                 * (2 if crop == "none" else 1))
                niceness = 10 if resources["gpus_per_worker"] == 0 else 0  # CPU-only: the model's threads come first
                cfg = {"image_size": image_size, "crop": crop, "max_pixels": max_pixels, "multiple_of": factor,
                       "storage_options": storage_options, "image_column": image_column, "chunk_rows": read_chunk_rows,
                       "niceness": niceness}
                ds = _build_dataset(gq, todo, cfg, resources, batch_size=batch_size, precision=precision,
                                    latents=latents)
                try:
                    with _driver_model(gq, resources, batch_size, latents) as local_model:
                        pipeline_s, hist_total = _drive(ds, todo, store, storage_options, ctx, formats,
                                                        resources["writers"], niceness, progress, stage, new_records,
                                                        failed, local_model, lease, known_records)
                except Exception as e:  # the job stopped: keep what was committed, account for it, then re-raise
                    pipeline_error = e
            finally:
                dctx.enable_progress_bars, dctx.target_max_block_size = saved_ctx
                if started:
                    ray.shutdown()

        # ---------------------------------------------------------------- manifest and summary
        for r in known_records + new_records:
            records[r["unit_id"]] = r
        all_records = [records[k] for k in sorted(records)]
        tot_in = sum(r["inputs"] for r in all_records)
        tot_ok = sum(r["tokenized"] for r in all_records)
        tot_err = sum(r["errors"] for r in all_records)
        by_kind: dict[str, int] = {}
        for r in all_records:
            for k, v in r.get("errors_by_kind", {}).items():
                by_kind[k] = by_kind.get(k, 0) + v
        run_in = sum(r["inputs"] for r in new_records)
        wall = time.perf_counter() - t_start
        busy = {k: stage[k] for k in ("read_decode_s", "model_s", "write_s")}
        busy_total = sum(busy.values()) or 1.0
        throughput = {
            "wall_s": round(wall, 3), "list_s": round(plan.list_s, 3), "plan_s": round(plan_s, 3),
            "pipeline_s": round(pipeline_s, 3), "images": run_in,
            "images_per_s": round(run_in / pipeline_s, 2) if pipeline_s > 0 else None,
            "first_output_s": round(stage.get("first_output_s", 0.0), 3),
            "stage_busy_s": {k: round(v, 3) for k, v in busy.items()},
            "time_split": {k: round(v / busy_total, 3) for k, v in busy.items()},
            "model_utilization": (round(stage["model_s"] / (pipeline_s * resources["workers"]), 3)
                                  if pipeline_s > 0 and resources else None),
            "driver_wait_s": round(stage["driver_wait_s"], 3),
            "driver_assemble_s": round(stage["driver_assemble_s"], 3), "resources": resources,
        }
        wids = store.write_wids_index(all_records)
        manifest = {"format_version": FORMAT_VERSION, "model_fingerprint": ctx.model_fingerprint,
                    "codebook_fingerprint": ctx.codebook_fingerprint, "codebook_size": c.codebook_size,
                    "group": c.group, "seed": c.seed, "beta": c.beta, "arch": c.arch, "preprocess": preprocess,
                    "inputs": tot_in, "tokenized": tot_ok, "errors": tot_err,
                    "errors_by_kind": dict(sorted(by_kind.items())),
                    "units": [manifest_unit_entry(r) for r in all_records], "wids_index": wids,
                    "throughput": throughput, "codebook_usage": _usage(hist_total),
                    "listing_changes": {"folders": len(replanned.changed_dirs), "recut_units": replanned.recut_units,
                                        "committed_files_no_longer_listed": replanned.committed_unlisted,
                                        "units_read_back": replanned.shards_read}}
        if failed:
            manifest["failed_units"] = failed
        lease.check()  # a run that lost the lease must not overwrite the holder's manifest
        store.write_manifest(manifest)
    if pipeline_error is not None:
        raise JobError(f"the pipeline stopped after committing {len(new_records)} of {len(todo)} units; committed work "
                       f"is kept and a rerun continues from there. Cause: {type(pipeline_error).__name__}: "
                       f"{str(pipeline_error)[-3000:]}") from pipeline_error
    summary = {"output": store.url, "units_planned": len(replanned.units), "units_skipped": skipped,
               "units_committed": len(new_records), "units_failed": failed, "inputs": tot_in, "tokenized": tot_ok,
               "errors": tot_err, "errors_by_kind": manifest["errors_by_kind"],
               "this_run": {"inputs": run_in, "tokenized": sum(r["tokenized"] for r in new_records),
                            "errors": sum(r["errors"] for r in new_records)},
               "ignored_files": plan.ignored, "listing_changes": manifest["listing_changes"],
               "throughput": throughput, "codebook_usage": manifest["codebook_usage"],
               "model_fingerprint": ctx.model_fingerprint, "codebook_fingerprint": ctx.codebook_fingerprint}
    _log(progress, f"done: {tot_ok} tokenized + {tot_err} errors = {tot_in} inputs "
                   f"({len(new_records)} units committed, {skipped} skipped, {len(failed)} failed) in {wall:.1f}s")
    return summary


@contextlib.contextmanager
def _driver_model(gq, resources: dict[str, Any], batch_size: int, latents: bool):
    """The model stage for the driver placement (None for actors), with torch's threads set for the run and then
    put back: the caller's process is ours only while tokenize() runs."""
    if resources["model_placement"] != "driver":
        yield None
        return
    import torch

    from gq_pipeline.stages import TokenizerActor

    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, int(math.ceil(resources["cpus_per_worker"] - 1e-9))))
    try:
        yield TokenizerActor.in_process(gq, batch_size=batch_size, latents=latents)
    finally:
        torch.set_num_threads(saved)


def _drive(ds, todo, store, storage_options, ctx, formats, writers, niceness, progress, stage, new_records,
           failed, local_model=None, lease=None, known_records=None):
    """Consume the pipeline on the driver: (run the model on each decoded batch, for the driver placement,)
    assemble units, hand complete ones to commit tasks.

    Returns (pipeline seconds, token histogram of this run)."""
    from gq_pipeline.committer import Committer

    assembler = UnitAssembler({u.unit_id: u for u in todo})
    committer = Committer(store, storage_options, ctx, formats, parallel=writers, niceness=niceness)
    hist_total = np.zeros(ctx.codebook_size, dtype=np.int64)
    t0 = time.perf_counter()
    last_log = t0
    n_rows = 0

    def harvest(results) -> None:
        for r in results:
            if r.error:
                failed.append({"unit_id": r.unit.unit_id, "source": r.unit.source, "reason": r.error})
                _log(progress, f"unit {r.unit.unit_id} ({r.unit.source}) failed: {r.error}")
                continue
            if not r.created:  # committed already (another run, or an earlier attempt): counted once, not here
                known_records.append(r.record)
                _log(progress, f"unit {r.unit.unit_id} was already committed; not counted as this run's")
                continue
            new_records.append(r.record)
            stage["write_s"] += r.write_s
            stage["read_decode_s"] += r.read_s
            stage["model_s"] += r.model_s
            if r.hist is not None:
                hist_total[:] += r.hist

    # No prefetch: with prefetch_batches=2 each block reached the driver seconds after the actor produced it
    # (measured), which delays commits; assembly is cheap enough not to need the overlap.
    it = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
    while True:
        tw = time.perf_counter()
        try:
            table = next(it)
        except StopIteration:
            break
        stage["driver_wait_s"] += time.perf_counter() - tw
        if local_model is not None:
            table = local_model(table)
        ta = time.perf_counter()
        if "first_output_s" not in stage:  # start-up: actor launch, model load and warm-up, first batch
            stage["first_output_s"] = ta - t0
        n_rows += table.num_rows
        for result in assembler.add(table):
            if isinstance(result, FailedUnit):
                failed.append({"unit_id": result.unit.unit_id, "source": result.unit.source, "reason": result.reason})
                _log(progress, f"unit {result.unit.unit_id} ({result.unit.source}) failed: {result.reason}")
            else:
                harvest(committer.submit(result))
        harvest(committer.poll())
        if lease is not None:
            lease.check()  # stop committing once another run holds the output
        stage["driver_assemble_s"] += time.perf_counter() - ta
        now = time.perf_counter()
        if progress and now - last_log > 10:
            last_log = now
            _log(progress, f"{len(new_records)}/{len(todo)} units committed, {n_rows} rows, "
                           f"{len(assembler.buffers)} units buffered ({assembler.buffered_bytes / 1e6:.1f} MB)")
    harvest(committer.drain())
    for f in assembler.leftovers():
        failed.append({"unit_id": f.unit.unit_id, "source": f.unit.source, "reason": f.reason})
    return time.perf_counter() - t0, hist_total
