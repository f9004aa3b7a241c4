"""``gq_pipeline.tokenize``: the whole tokenization job (plan -> units on workers -> manifest).

Data flow::

    driver: list inputs -> units; survey the output without writing: skip committed units (units/*.json), plan
            format conversions (gq_pipeline.convert); with nothing to do, stop there (no lease, no write)
    driver, holding the output's lease: convert committed units to the missing format (no model call)
    for each unit, on a worker (a Ray actor per GPU / CPU node, or this process on a single CPU machine):
        read the unit's inputs -> decode threads -> model mini-batches -> shards -> commit record (last)
        -> one small outcome row back to the driver
    driver: retries, failure budget, manifest (a cache of units/)

Any failure after planning that is not a refusal (a full, read-only or unreachable store, a lost cluster) becomes
one ``JobError`` line naming the cause and what is committed (``gq tokenize`` exits 3); committed units stay.

The unit is the task: a worker owns one unit from its bytes to its commit record, so decoded pixels and token rows
never cross the object store or the driver, and a retry redoes exactly one unit. Design and measurements:
docs/architecture.md ("Pipeline") and docs/scaling.md. The run's settings are gq_pipeline.options
(``TokenizeOptions``, ``Resources``); where its units run, gq_pipeline.placement.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import numpy as np

from gq_model.loading import load_model
from gq_model.metrics.codebook_usage import run_usage
from gq_pipeline.commitset import staged_files
from gq_pipeline.convert import CONVERTED, NEEDS_MODEL, UNCHANGED, convert_unit, why_not_convertible
from gq_pipeline.layout import LEGACY_WIDS_INDEX
from gq_pipeline.lease import LeaseHeldError, LeaseLostError, OutputLease
from gq_pipeline.manifest import IncompatibleOutputError, OutputStore, manifest_unit_entry
from gq_pipeline.options import FORMATS, PLACEMENTS, PRECISIONS, Resources, TokenizeOptions, split_keywords
from gq_pipeline.placement import place, worker_pool
from gq_pipeline.plan_store import PLAN_DIR
from gq_pipeline.planning import ignored_counts, ignored_note, plan_units
from gq_pipeline.preprocess import preprocess_settings
from gq_pipeline.progress import ProgressReporter
from gq_pipeline.records import FORMAT_VERSION
from gq_pipeline.replan import reconcile_with_committed
from gq_pipeline.sources import Unit
from gq_pipeline.scheduler import FailureBudget, FailureBudgetExceeded, Interrupted, NoWorkersError, run_units
from gq_pipeline.worker import WorkSpec
from gq_pipeline.writers import ShardContext

__all__ = ["tokenize", "TokenizeOptions", "Resources", "JobError", "RunInterrupted", "FORMATS", "PRECISIONS",
           "PLACEMENTS"]


class JobError(RuntimeError):
    """The job stopped (every unit failed, the failure budget ran out, no worker could start): committed units stay,
    the rest is redone by a rerun."""


class RunInterrupted(JobError):
    """Ctrl-C or SIGTERM: the run stopped at once; what was committed is kept and counted in manifest.json."""


@contextlib.contextmanager
def _stop_signals():
    """SIGINT and SIGTERM (what schedulers send) stop the run cleanly: the first raises ``KeyboardInterrupt`` in the
    main thread, so the driver stops dispatching, stops its workers and writes the manifest of what was committed;
    a second one exits at once. Installed only in the main thread (signal handlers can only be set there)."""
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def hard_exit(signum, frame):
        os._exit(128 + signum)

    def first(signum, frame):
        signal.signal(signal.SIGINT, hard_exit)
        signal.signal(signal.SIGTERM, hard_exit)
        raise KeyboardInterrupt

    saved = signal.signal(signal.SIGINT, first), signal.signal(signal.SIGTERM, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[gq tokenize] {msg}", file=sys.stderr, flush=True)

def _under(url: str, root: str) -> bool:
    """``url`` is ``root`` or inside it (both as ``sources.to_url`` spells them)."""
    root = root.rstrip("/")
    return url.rstrip("/") == root or url.startswith(root + "/")


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


def tokenize(model: Any, inputs: str | Sequence[str], output: str, *, options: TokenizeOptions | None = None,
             resources: Resources | None = None, **keywords: Any) -> dict[str, Any]:
    """Tokenize image inputs into token shards under ``output``; returns the run summary (also in manifest.json).

    The settings are a ``TokenizeOptions`` and a ``Resources`` (gq_pipeline.options: every field, its default and
    its check), given whole (``options=``, ``resources=``), as keywords named like their fields
    (``format="both", workers=4``), or both: a keyword replaces that field of the object given.

    Safe to rerun after a crash: committed units are skipped, unfinished ones redone with identical output names
    and bytes. See ``gq tokenize --help`` for the options and docs/token-format.md for what is written.
    """
    t_start = time.perf_counter()
    opts, res = split_keywords(keywords, options, resources)  # a bad value is a ValueError here, before any I/O
    if isinstance(inputs, str):
        inputs = [inputs]
    inputs = list(inputs or [])
    store = OutputStore(output, opts.storage_options)
    try:  # a version-1 output (gq_pipeline.layout) is refused before anything is written
        store.refuse_older_layout()
    except _PASS_THROUGH:
        raise
    except Exception as e:  # the output's storage is unreachable: the same one line as any storage fault
        raise JobError(f"the run stopped: {_one_line(e)}. {_Tally().describe()}") from e

    # ---------------------------------------------------------------- model and its identity
    gq = load_model(model, config=opts.config, preset=opts.preset, trust_checkpoint=opts.trust_checkpoint,
                    storage_options=opts.storage_options)
    factor = gq.downsample_factor
    if opts.image_size % factor:
        raise ValueError(f"--image-size {opts.image_size} is not a multiple of the model's downsampling factor "
                         f"{factor}")
    if gq.config.arch == "vit":
        fixed = int(gq.config.encoder["image_size"])
        if opts.image_size != fixed or opts.crop != "center":
            raise ValueError(f"this ViT model takes {fixed}x{fixed} images only: use --image-size {fixed} "
                             f"--crop center")
    settings = preprocess_settings(gq, opts.image_size, opts.crop, opts.precision, opts.max_pixels,
                                   policy=opts.preprocess)
    c = gq.config
    ctx = ShardContext(model_fingerprint=gq.model_fingerprint, codebook_fingerprint=gq.fingerprint,
                       codebook_size=c.codebook_size, group=c.group, seed=c.seed, beta=c.beta, arch=c.arch,
                       preprocess=settings, latents=opts.latents)

    # ---------------------------------------------------------------- plan, guard, resume
    t0 = time.perf_counter()
    plan = plan_units(inputs, opts.unit_size, opts.storage_options, input_list=opts.input_list,
                      input_list_column=opts.input_list_column, plan_dir=f"{store.url}/{PLAN_DIR}",
                      relist=opts.relist, extensions=opts.extensions)
    _log(opts.progress, f"listed {plan.listed} files into {len(plan.units)} units in {plan.list_s:.2f}s"
                        + (f" ({plan.ignored} non-image files ignored, e.g. {plan.ignored_examples[0]})"
                           if plan.ignored else ""))
    inside = [u for u in plan.units if _under(u.source, store.url)]
    if inside:  # --output inside --input: gq's own shards are never inputs
        plan.units = [u for u in plan.units if not _under(u.source, store.url)]
        _log(opts.progress, f"note: {len(inside)} unit(s) under the output folder {store.url} are not inputs (the "
                            f"output lies inside an input); they were left out")
    if ignored_note(plan):
        _log(opts.progress, ignored_note(plan))
    _check_first_parquet(plan.units, opts.image_column, opts.storage_options)
    run = _Run(store=store, ctx=ctx, plan=plan, inputs=inputs, gq=gq, factor=factor, preprocess=settings,
               tally=_Tally(), t_start=t_start, t0=t0)
    try:
        return _run_planned(opts, res, run)
    except _PASS_THROUGH:
        raise
    except Exception as e:  # storage full, read-only or unreachable, a lost cluster: one line, exit 3
        raise JobError(f"the run stopped: {_one_line(e)}. {run.tally.describe()}") from e


def _signature():
    """``tokenize``'s signature as help() and IDEs show it: every field of the two settings classes a keyword, with
    its default (they are accepted through ``**keywords``, so the defaults live in gq_pipeline.options only)."""
    import inspect

    P = inspect.Parameter
    params = [P("model", P.POSITIONAL_OR_KEYWORD, annotation="Any"),
              P("inputs", P.POSITIONAL_OR_KEYWORD, annotation="str | Sequence[str]"),
              P("output", P.POSITIONAL_OR_KEYWORD, annotation="str"),
              P("options", P.KEYWORD_ONLY, default=None, annotation="TokenizeOptions | None"),
              P("resources", P.KEYWORD_ONLY, default=None, annotation="Resources | None")]
    params += [P(f.name, P.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for cls in (TokenizeOptions, Resources) for f in fields(cls)]
    return inspect.Signature(params, return_annotation="dict[str, Any]")


tokenize.__signature__ = _signature()


@dataclass
class _Run:
    """What ``tokenize`` established before the output is surveyed, for the steps after it: the output, the model
    and its identity, the plan, and the clocks and tally of the summary and the failure line."""

    store: OutputStore
    ctx: ShardContext
    plan: Any
    inputs: list[str]
    gq: Any
    factor: int           # the model's downsampling factor (crop=none cuts to a multiple of it)
    preprocess: dict      # the preprocessing record (preprocess_settings), in the manifest
    tally: "_Tally"
    t_start: float
    t0: float             # when planning began


# Errors that keep their own meaning (and exit code) when raised after planning: refusals, bad arguments, a lost
# lease, Ctrl-C. Anything else after planning is a failure of the storage or the cluster (JobError, exit 3).
_PASS_THROUGH = (JobError, LeaseHeldError, LeaseLostError, IncompatibleOutputError, ValueError, TypeError,
                 FileNotFoundError)


def _one_line(e: BaseException, limit: int = 600) -> str:
    """An exception as one line: its type and message, whitespace folded (Ray errors carry whole tracebacks: the
    last lines say what happened)."""
    text = " ".join(str(e).split())
    if len(text) > limit:
        text = "..." + text[-limit:]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _Tally:
    """What is known to be committed, for the one line a failure prints."""

    def __init__(self):
        self.this_run = 0
        self.records: dict[str, dict[str, Any]] | None = None

    def describe(self) -> str:
        if self.records is None:
            return ("Nothing was committed in this run; what the output held is unchanged, and rerunning the same "
                    "command resumes")
        recs = self.records.values()
        n_in, n_ok = sum(r["inputs"] for r in recs), sum(r["tokenized"] for r in recs)
        return (f"Committed: {self.this_run} units in this run, {len(self.records)} in the output ({n_ok} tokenized "
                f"+ {n_in - n_ok} errors = {n_in} inputs); committed work is kept and rerunning the same command "
                f"resumes")


@dataclass
class _Survey:
    """What a run has to do, read from the output without writing: units for the model, units to convert."""

    records: dict[str, dict[str, Any]]
    replanned: Any
    planned: list
    todo: list            # units the model must (re)tokenize (dicts, with "formats" where a record exists)
    convert: list[str]    # unit ids whose missing formats are written from their committed shard
    skipped: int
    model_again: dict[str, str]  # unit id -> why its missing format needs the model again


def _survey(store: OutputStore, state, plan, unit_size: int, formats, latents: bool) -> _Survey:
    records = dict(state.records)
    replanned = reconcile_with_committed(plan.units, records, unit_size, store.committed_sources)
    planned = replanned.units + list(plan.list_units)
    todo, convert, skipped, again = [], [], 0, {}
    for u in planned:
        r = records.get(u.unit_id)
        if r is None:
            todo.append(u.to_dict())
            continue
        have = set(r.get("formats", ()))
        if set(formats) <= have and (not latents or r.get("latents")):
            skipped += 1
            continue
        why = why_not_convertible(r, latents)
        if why is None:
            convert.append(u.unit_id)
        else:  # tokenized again, with every format the record has too (a record only ever gains formats)
            again[u.unit_id] = why
            todo.append({**u.to_dict(), "formats": sorted(have | set(formats))})
    return _Survey(records, replanned, planned, todo, convert, skipped, again)


def _output_current(store: OutputStore, state, records: dict[str, dict[str, Any]]) -> bool:
    """True when a run that commits nothing would write nothing: the manifest lists exactly the committed units
    (and no failed ones), the wids index is what it would be, and nothing waits to be rolled forward. Reads only."""
    m = state.manifest
    if not m or m.get("failed_units") or state.torn:
        return False
    if {u.get("unit_id") for u in m.get("units", []) if isinstance(u, dict)} != set(records):
        return False
    if staged_files(store.fs, store.root) or store.fs.exists(store.path(LEGACY_WIDS_INDEX)):
        return False
    want = store.wids_index_bytes([records[k] for k in sorted(records)])
    try:
        have = store.fs.cat_file(store.path(store.layout.wids_index))
    except FileNotFoundError:
        have = None
    return want == have


def _convert_units(store: OutputStore, ctx: ShardContext, uids: list[str], formats, progress: bool,
                   max_attempts: int, threads: int = 4):
    """Write the missing formats of committed units from their shards (gq_pipeline.convert), a few at a time.
    Returns (converted records, {unit id: why the model is needed}, failed units)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    converted: list[dict[str, Any]] = []
    again: dict[str, str] = {}
    failed: list[dict[str, Any]] = []

    def one(uid: str) -> dict[str, Any]:
        for attempt in range(max(1, max_attempts)):
            try:
                return convert_unit(store, ctx, uid, formats)
            except Exception as e:  # a storage error: tried again, then a failed unit (a rerun retries it)
                error = e
        return {"unit_id": uid, "status": "failed", "reason": _one_line(error), "attempts": max(1, max_attempts)}

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gq-convert")
    try:
        futures = [pool.submit(one, uid) for uid in uids]
        for f in as_completed(futures):
            out = f.result()
            if out["status"] in (CONVERTED, UNCHANGED):
                if out["record"] is not None:
                    converted.append(out["record"])
            elif out["status"] == NEEDS_MODEL:
                again[out["unit_id"]] = out["reason"]
            else:
                failed.append({"unit_id": out["unit_id"], "source": "", "reason": out["reason"],
                               "attempts": out["attempts"]})
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return converted, again, failed


def _no_inputs(inputs, input_list, plan) -> ValueError:
    where = ", ".join(list(inputs)[:3] + ([input_list] if input_list else []))
    return ValueError(f"no inputs found in {where} ({plan.listed} files listed, {plan.ignored} not images): "
                      f"check the path, or pass --allow-empty to accept an empty run")


def _run_planned(opts: TokenizeOptions, res: Resources, run: _Run) -> dict[str, Any]:
    """Everything after planning: survey the output (reads only), and only if there is work take the lease, convert,
    tokenize, and write the manifest. Storage failures raise here and become one JobError line in ``tokenize``."""
    store, plan, progress = run.store, run.plan, opts.progress
    state = store.load()
    store.check_compatible(state, run.ctx)
    run.tally.records = dict(state.records)
    # Staged files of committed units are rolled forward (a write) before the output is surveyed: reconciling a
    # changed folder reads committed shards back from their final names.
    work = None if staged_files(store.fs, store.root) else _survey(store, state, plan, opts.unit_size, opts.formats,
                                                                    opts.latents)
    if opts.input_list:
        how = "read from the persisted plan" if plan.list_units.reused else "planned into .gq/plan/"
        _log(progress, f"input list: {plan.list_units.rows} rows, {how}")
    if work is not None and not work.planned and not work.records and not opts.allow_empty:
        raise _no_inputs(run.inputs, opts.input_list, plan)
    lease = None
    if work is None or work.todo or work.convert or not _output_current(store, state, work.records):
        # One writer per output (gq_pipeline.lease), taken before the state this run acts on is read, so that no
        # other run commits between that reading and this run's commits; a second run refuses here. A run with
        # nothing to write never takes it: a complete output on read-only storage checks without a write.
        lease = OutputLease.for_store(store, force=opts.force_lease, log=lambda m: _log(progress, m))
        try:
            lease.acquire()
        except (LeaseHeldError, FileNotFoundError):
            raise
        except Exception as e:
            raise JobError(f"could not take the output's lease {lease.url}: {_one_line(e)}. Nothing was written; "
                           f"rerun the same command once the output is writable and reachable") from e
    try:
        return _run_leased(opts, res, run, state, work, lease)
    finally:
        if lease is not None and lease.held:
            try:
                lease.release()
            except Exception as e:
                _log(progress, f"note: could not remove the lease {lease.url} ({_one_line(e)}); a later run on "
                               f"this machine takes it over at once, elsewhere once it expires")


def _run_leased(opts: TokenizeOptions, res: Resources, run: _Run, state, work: _Survey | None,
                lease: OutputLease | None) -> dict[str, Any]:
    """Under the output's lease (or, with nothing to write, without one): convert, tokenize, write the manifest."""
    if lease is not None:
        state, work = _survey_under_lease(opts, run, state, work, lease)
    for path in state.torn:
        _log(opts.progress, f"note: {path} is damaged (not a whole commit record); its unit counts as not committed, "
                            f"is redone if this run plans it, and its record is then replaced")
    run.tally.records = records = work.records
    todo = list(work.todo)
    # One schema per output (gq_pipeline.schema): the committed one, or the union over this run's inputs
    ctx = run.store.resolve_schema(run.ctx, state, [Unit.from_dict(u) for u in todo], opts.image_column,
                                   opts.storage_options)
    if work.replanned.changed_dirs:
        _log(opts.progress, "note: " + work.replanned.describe())
    plan_s = time.perf_counter() - run.t0
    if lease is not None and state.manifest is not None and (
            work.convert or any(u["unit_id"] in records for u in todo)):
        # This run replaces records (formats or latents added). manifest.json caches records, and a run stopped
        # after a replace but before its new manifest would leave a cache naming fewer files than units/ does (gc
        # would take the added shards for orphans): the stale cache goes first, and is rebuilt at the end.
        run.store.fs.rm_file(run.store.path(run.store.layout.manifest))
    conv = _conversions(opts, run, ctx, work, records)
    todo += conv.todo
    model_again = {**work.model_again, **conv.model_again}
    if model_again:
        reasons = sorted(set(model_again.values()))
        _log(opts.progress, f"{len(model_again)} committed unit(s) need the model again for the asked format(s): "
                            + "; ".join(reasons[:3]))
    _log(opts.progress, f"{work.skipped} units already committed, {len(conv.converted)} converted, {len(todo)} to "
                        f"tokenize")
    done = _tokenize_units(opts, res, run, ctx, todo, lease) if todo else _Tokenized(
        hist=np.zeros(run.gq.config.codebook_size, dtype=np.int64))
    for r in done.already + done.new_records:  # another run's commits count in the manifest, not in this run's
        records[r["unit_id"]] = r
    run.tally.this_run = len(done.new_records) + len(conv.converted)
    return _finish(opts, run, ctx, lease, work, records, conv, done, len(todo), plan_s)


def _survey_under_lease(opts: TokenizeOptions, run: _Run, state, work: _Survey | None, lease: OutputLease):
    """The output's state read again under the lease (what another run committed meanwhile counts), checked,
    cleaned up after a killed run, and surveyed again if it changed since the survey without the lease."""
    store = run.store
    fresh = store.load()
    store.check_compatible(fresh, run.ctx)
    store.prepare(temp_stale_s=lease.temp_grace_s)  # after the check: a refused output is left as it was
    if work is None or fresh.records != state.records or fresh.torn != state.torn:
        state, work = fresh, _survey(store, fresh, run.plan, opts.unit_size, opts.formats, opts.latents)
        if not work.planned and not work.records and not opts.allow_empty:
            raise _no_inputs(run.inputs, opts.input_list, run.plan)
    return state, work


@dataclass
class _Converted:
    """What the format conversions did: records now holding the asked formats, units that failed, and units that
    turned out to need the model again (their ``todo`` entries, and why)."""

    converted: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    todo: list[dict[str, Any]] = field(default_factory=list)
    model_again: dict[str, str] = field(default_factory=dict)


def _conversions(opts: TokenizeOptions, run: _Run, ctx: ShardContext, work: _Survey,
                 records: dict[str, dict[str, Any]]) -> _Converted:
    """Write the asked formats of committed units from their committed shards (no model call). ``records`` gets the
    records as they are afterwards, failed ones included (a failure after the commit point still replaced it)."""
    out = _Converted()
    if not work.convert:
        return out
    store, formats = run.store, opts.formats
    _log(opts.progress, f"{len(work.convert)} committed units lack {'/'.join(formats)}: writing it from their "
                        f"committed shards (no model call)")
    try:
        with _stop_signals():
            out.converted, again, out.failed = _convert_units(store, ctx, work.convert, formats, opts.progress,
                                                              opts.max_attempts)
    except KeyboardInterrupt:
        raise RunInterrupted("interrupted while writing formats from committed shards; what was converted is "
                             "committed; rerun the same command to resume") from None
    for f in out.failed:
        f["source"] = next((u.source for u in work.planned if u.unit_id == f["unit_id"]), "")
        r = store.read_record(f["unit_id"])
        if r is not None:
            records[f["unit_id"]] = r
    for r in out.converted:
        records[r["unit_id"]] = r
    by_id = {u.unit_id: u for u in work.planned}
    for uid, why in again.items():
        out.model_again[uid] = why
        have = set(records.get(uid, {}).get("formats", ()))
        out.todo.append({**by_id[uid].to_dict(), "formats": sorted(have | set(formats))})
    return out


@dataclass
class _Tokenized:
    """What the model's part of the run did, for the manifest and the summary."""

    hist: np.ndarray
    new_records: list[dict[str, Any]] = field(default_factory=list)
    already: list[dict[str, Any]] = field(default_factory=list)  # committed by another run first
    failed: list[dict[str, str]] = field(default_factory=list)
    stage: dict[str, Any] = field(default_factory=lambda: {"read_decode_s": 0.0, "model_s": 0.0, "write_s": 0.0})
    pipeline_s: float = 0.0
    pipeline_error: Exception | None = None
    placement: Any = None
    interrupted: bool = False


def _tokenize_units(opts: TokenizeOptions, res: Resources, run: _Run, ctx: ShardContext, todo: list,
                    lease: OutputLease | None) -> _Tokenized:
    """Run ``todo`` on the placement's pool. Faults the budget allows, a lost cluster and Ctrl-C are recorded in the
    result (the manifest is still written); refusals and bad arguments raise."""
    done = _Tokenized(hist=np.zeros(run.gq.config.codebook_size, dtype=np.int64))
    stage, run_stats = done.stage, None
    with place(res, opts.verbose) as placement:
        done.placement = placement
        placement.check_precision(opts.precision)
        for line in placement.describe():
            _log(opts.progress, line)
        spec = WorkSpec(output=run.store.url, storage_options=opts.storage_options, ctx=ctx, formats=opts.formats,
                        image_size=opts.image_size, crop=opts.crop, max_pixels=opts.max_pixels,
                        multiple_of=run.factor, image_column=opts.image_column, batch_size=opts.batch_size,
                        decode_threads=placement.decode_threads, allow_external_refs=opts.allow_external_refs,
                        extensions=opts.extensions, niceness=placement.decode_niceness)
        budget = FailureBudget(opts.max_failed_units, len(todo))
        t_run = time.perf_counter()
        with _stop_signals(), worker_pool(run.gq, spec, placement, opts.precision, opts.latents, res) as pool:
            reporter = ProgressReporter(todo, enabled=opts.progress)
            try:
                run_stats = run_units(pool, iter(todo), budget=budget, max_attempts=opts.max_attempts,
                                      on_progress=_progress_logger(reporter, lease, pool),
                                      progress_every_s=reporter.tick_s)
            except FailureBudgetExceeded as e:
                run_stats, done.pipeline_error = e.stats, e
            except NoWorkersError as e:
                done.pipeline_error = e
            except Interrupted as e:
                run_stats, done.interrupted = e.stats, True
            except (LeaseLostError, ValueError, TypeError):
                raise
            except Exception as e:  # the cluster or the driver's side of it broke (a raylet gone, ...)
                done.pipeline_error = e
            done.pipeline_s = time.perf_counter() - t_run
            reporter.close(run_stats)
            try:
                for st in pool.stats():
                    done.hist += st["hist"]
                    stage["oom_halvings"] = stage.get("oom_halvings", 0) + st.get("oom_halvings", 0)
            except Exception:  # workers gone at the end: this run's usage statistics lack their histograms
                pass
    if run_stats is not None:
        done.failed = list(run_stats.failed)
        for o in run_stats.committed:
            done.new_records.append(o["record"])
            stage["read_decode_s"] += o.get("read_s", 0.0)
            stage["model_s"] += o.get("model_s", 0.0)
            stage["write_s"] += o.get("write_s", 0.0)
        stage["retries"], stage["workers_lost"] = run_stats.retries, run_stats.workers_lost
        stage["already_committed_by_another_run"] = len(run_stats.already)
        done.already = list(run_stats.already)
        stage["driver_bytes_received"] = run_stats.outcome_bytes
    if not done.new_records and done.failed and len(done.failed) == len(todo) and done.pipeline_error is None:
        # nothing committed and every unit failed: systematic (a broken model or store), not bad inputs
        done.pipeline_error = RuntimeError(done.failed[0]["reason"])
    return done


def _throughput(done: _Tokenized, images: int, wall: float, list_s: float, plan_s: float) -> dict[str, Any]:
    """The manifest's and summary's ``throughput``: clocks, images/s, where the workers' time went, faults."""
    stage, pipeline_s, placement = done.stage, done.pipeline_s, done.placement
    busy = {k: stage[k] for k in ("read_decode_s", "model_s", "write_s")}
    busy_total = sum(busy.values()) or 1.0
    return {
        "wall_s": round(wall, 3), "list_s": round(list_s, 3), "plan_s": round(plan_s, 3),
        "pipeline_s": round(pipeline_s, 3), "images": images,
        "images_per_s": round(images / pipeline_s, 2) if pipeline_s > 0 else None,
        "stage_busy_s": {k: round(v, 3) for k, v in busy.items()},
        "time_split": {k: round(v / busy_total, 3) for k, v in busy.items()},
        "model_utilization": (round(stage["model_s"] / (pipeline_s * placement.workers), 3)
                              if pipeline_s > 0 and placement is not None else None),
        "resources": placement.as_dict() if placement is not None else {},
        "driver_bytes_received": stage.get("driver_bytes_received", 0),
        "faults": {k: stage.get(k, 0) for k in ("retries", "workers_lost", "oom_halvings",
                                                "already_committed_by_another_run")},
    }


def _finish(opts: TokenizeOptions, run: _Run, ctx: ShardContext, lease: OutputLease | None, work: _Survey,
            records: dict[str, dict[str, Any]], conv: _Converted, done: _Tokenized, n_todo: int,
            plan_s: float) -> dict[str, Any]:
    """The manifest (written under the lease), then the run's outcome: an exception for an interrupted or stopped
    run, else the summary ``tokenize`` returns."""
    store, plan, progress, c = run.store, run.plan, opts.progress, run.gq.config
    failed = conv.failed + done.failed
    new_records, converted, planned, skipped = done.new_records, conv.converted, work.planned, work.skipped
    all_records = [records[k] for k in sorted(records)]
    tot_in = sum(r["inputs"] for r in all_records)
    tot_ok = sum(r["tokenized"] for r in all_records)
    tot_err = sum(r["errors"] for r in all_records)
    by_kind: dict[str, int] = {}
    for r in all_records:
        for k, v in r.get("errors_by_kind", {}).items():
            by_kind[k] = by_kind.get(k, 0) + v
    run_in = sum(r["inputs"] for r in new_records)
    wall = time.perf_counter() - run.t_start
    throughput = _throughput(done, run_in, wall, plan.list_s, plan_s)
    replanned = work.replanned
    listing_changes = {"folders": len(replanned.changed_dirs), "recut_units": replanned.recut_units,
                       "committed_files_no_longer_listed": replanned.committed_unlisted,
                       "units_read_back": replanned.shards_read}
    manifest = {"format_version": FORMAT_VERSION, "model_fingerprint": ctx.model_fingerprint,
                "codebook_fingerprint": ctx.codebook_fingerprint, "codebook_size": c.codebook_size,
                "group": c.group, "seed": c.seed, "beta": c.beta, "arch": c.arch, "preprocess": run.preprocess,
                "inputs": tot_in, "tokenized": tot_ok, "errors": tot_err,
                "errors_by_kind": dict(sorted(by_kind.items())),
                "units": [manifest_unit_entry(r) for r in all_records], "wids_index": None,
                "throughput": throughput, "codebook_usage": run_usage(done.hist), "listing_changes": listing_changes}
    if failed:
        manifest["failed_units"] = failed
    if lease is not None:
        try:
            manifest["wids_index"] = store.write_wids_index(all_records)
            lease.confirm()  # a run that lost the lease must not overwrite the holder's manifest
            store.write_manifest(manifest)
        except (LeaseLostError, LeaseHeldError):
            raise
        except Exception as e:  # the commit records are the truth: a rerun rebuilds the manifest from them
            raise JobError(f"writing {store.url}/manifest.json failed: {_one_line(e)}. {run.tally.describe()} (the "
                           f"manifest is rebuilt from units/ by the rerun)") from e
    else:  # nothing to write: the manifest on storage is current
        manifest["wids_index"] = store.layout.wids_index if store.wids_index_bytes(all_records) is not None else None
        _log(progress, "nothing to do: every planned unit is committed and manifest.json is current (nothing was "
                       "written)")
    if done.interrupted:
        raise RunInterrupted(f"interrupted: {len(new_records)} units committed in this run ({len(all_records)} of "
                             f"{len(planned)} in the output, {tot_in} inputs); rerun the same command to resume")
    if done.pipeline_error is not None:
        raise JobError(f"the pipeline stopped after committing {len(new_records)} of {n_todo} units: "
                       f"{_one_line(done.pipeline_error)}. {run.tally.describe()}") from done.pipeline_error
    summary = {"output": store.url, "units_planned": len(planned), "units_skipped": skipped,
               "units_committed": len(new_records), "units_converted": len(converted), "units_failed": failed,
               "inputs": tot_in, "tokenized": tot_ok, "errors": tot_err, "errors_by_kind": manifest["errors_by_kind"],
               "this_run": {"inputs": run_in, "tokenized": sum(r["tokenized"] for r in new_records),
                            "errors": sum(r["errors"] for r in new_records)},
               "ignored_files": plan.ignored, **ignored_counts(plan), "listing_changes": manifest["listing_changes"],
               "throughput": throughput, "codebook_usage": manifest["codebook_usage"],
               "model_fingerprint": ctx.model_fingerprint, "codebook_fingerprint": ctx.codebook_fingerprint}
    if failed:
        _log(progress, f"{len(failed)} unit(s) failed after retries (listed in manifest.json failed_units; a rerun "
                       f"retries them): " + "; ".join(f"{f['source']}: {f['reason'][:200]}" for f in failed[:3]))
    _log(progress, f"done: {tot_ok} tokenized + {tot_err} errors = {tot_in} inputs "
                   f"({len(new_records)} units committed, {len(converted)} converted, {skipped} skipped, "
                   f"{len(failed)} failed) in {wall:.1f}s")
    return summary


def _progress_logger(reporter: ProgressReporter, lease: OutputLease | None = None, pool: Any = None):
    """The scheduler's progress callback: the lease check, then the progress line (gq_pipeline.progress), with the
    samples of units in progress where the pool counts them (the driver placement)."""
    live = getattr(pool, "live", None)

    def log(stats) -> None:
        if lease is not None:
            lease.check()  # every progress tick: a run that lost the output's lease stops handing out units
        reporter.update(stats, live() if live is not None else (0, 0))
    return log
