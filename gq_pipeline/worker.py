"""One unit, end to end, on the machine that runs the model: read, decode, tokenize, write shards, commit.

This is the data plane. A unit's images are read and decoded on the worker's own node by a local pool of decode
threads (PIL releases the GIL while decoding and resizing), its tokens are computed in mini-batches by the worker's
``ModelRunner``, and its shards and commit record are written from there. What leaves the worker is one small dict
per unit (status, commit record, timings): decoded pixels and token rows never cross the object store or the driver,
so the driver's work is O(units), not O(rows) (docs/architecture.md, "Pipeline").

The same :class:`UnitProcessor` serves both placements: inside a Ray actor (:class:`UnitWorkerActor`, one per GPU or
per CPU node) and in the driver process itself on a single CPU-only machine.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from gq_pipeline.commit import CompleteUnit, commit_staged, stage_unit
from gq_pipeline.manifest import OutputStore
from gq_pipeline.records import ROW_OK
from gq_pipeline.sources import Unit, UnitInfo, UnitReadError, iter_samples
from gq_pipeline.stages import ModelRunner, decode_sample, lower_thread_priority, rows_to_table
from gq_pipeline.writers import ShardContext

__all__ = ["WorkSpec", "UnitProcessor", "UnitWorkerActor", "UnitOutcome"]

COMMITTED, FAILED, ALREADY = "committed", "failed", "already_committed"


class UnitCancelled(Exception):
    """The run is stopping; this unit is left uncommitted."""


@dataclass(frozen=True)
class WorkSpec:
    """Everything a worker needs besides the model; the same for every unit of a run."""

    output: str
    storage_options: dict | None
    ctx: ShardContext
    formats: tuple[str, ...]
    image_size: int
    crop: str
    max_pixels: int
    multiple_of: int
    image_column: str | None
    batch_size: int
    decode_threads: int = 2
    niceness: int = 0  # CPU-only: decode threads yield to the model's threads
    allow_external_refs: tuple[str, ...] = ()  # Parquet path references beyond the file's tree ("*": any)
    extensions: tuple[str, ...] = ()  # image extensions besides the default ones

    @property
    def decode_cfg(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "crop": self.crop, "max_pixels": self.max_pixels,
                "multiple_of": self.multiple_of, "policy": self.ctx.preprocess.get("policy", "gq")}


UnitOutcome = dict  # {"unit_id", "status", "record", "error", "inputs", "read_s", "model_s", "write_s", "node"}


class UnitProcessor:
    """Turns unit descriptions into committed units. Thread-safe: several units may be in progress at once (their
    decoding overlaps), while the model runs one batch at a time under a lock."""

    def __init__(self, spec: WorkSpec, runner: ModelRunner):
        self.spec = spec
        self.runner = runner
        self.store = OutputStore(spec.output, spec.storage_options)
        self._model_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, spec.decode_threads), thread_name_prefix="gq-decode",
                                        initializer=lower_thread_priority, initargs=(spec.niceness,))
        self.hist = np.zeros(spec.ctx.codebook_size, dtype=np.int64)
        self.units_done = 0
        self._live: dict[str, list] = {}  # unit id -> its rows so far, for live_counts (progress between commits)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Make units in progress stop at their next sample or batch (uncommitted; a rerun redoes them)."""
        self._cancelled.set()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------------ one unit
    def process(self, unit_dict: dict[str, Any]) -> UnitOutcome:
        """Read, tokenize and commit one unit. A read that fails for a transient reason, or a model that fails on
        every image of a batch, gives a ``failed`` outcome (the driver decides whether to retry elsewhere); one bad
        sample only ever becomes that sample's error record."""
        unit = Unit.from_dict(unit_dict)
        out: UnitOutcome = {"unit_id": unit.unit_id, "source": unit.source, "status": FAILED, "record": None,
                            "error": None, "inputs": 0, "read_s": 0.0, "model_s": 0.0, "write_s": 0.0}
        try:
            return self._process(unit, out, unit_dict.get("formats"))
        finally:
            with self._stats_lock:
                self._live.pop(unit.unit_id, None)

    def live_counts(self) -> tuple[int, int]:
        """(samples finished, of which errors) in units still in progress: a progress line's count between commits.
        A sample is finished once it is an error row or has its tokens."""
        with self._stats_lock:
            units = [list(rows) for rows in self._live.values()]
        done = errors = 0
        for rows in units:
            for r in rows:
                if r["kind"] != ROW_OK:
                    done, errors = done + 1, errors + 1
                elif "tokens" in r:
                    done += 1
        return done, errors

    def _process(self, unit: Unit, out: UnitOutcome, formats: Any = None) -> UnitOutcome:
        try:
            done = self.tokenize_unit(unit)
        except (UnitReadError, UnitCancelled) as e:
            out["error"] = str(e)
            return out
        except RuntimeError as e:  # the model fails on every image of a batch: systematic, not one sample's fault
            out["error"] = f"{type(e).__name__}: {e}"[:3000]
            return out
        except Exception as e:  # a bug or an unexpected library error: fail the unit, keep the job alive
            out["error"] = f"unexpected {type(e).__name__} while reading/tokenizing: {e}"[:3000]
            return out
        out.update(read_s=done.info["read_s"], model_s=done.model_s, inputs=done.rows.num_rows)
        t1 = time.perf_counter()
        # A unit committed before in other formats is redone with all of them (its record keeps every format it has)
        formats = tuple(formats or self.spec.formats)
        staged = stage_unit(self.store, self.spec.ctx, formats, done)
        created = commit_staged(self.store, staged)
        out["write_s"] = time.perf_counter() - t1
        if not created:  # another run committed this unit first: its record stands, ours is discarded
            out.update(status=ALREADY, record=self.store.read_record(unit.unit_id))
            return out
        out.update(status=COMMITTED, record=staged.record)
        with self._stats_lock:
            if staged.hist is not None:
                self.hist += staged.hist
            self.units_done += 1
        return out

    def tokenize_unit(self, unit: Unit) -> CompleteUnit:
        """Read and tokenize every sample of ``unit`` (decoding on the pool, the model in mini-batches): the rows
        ``commit_unit`` takes, in sample order. Raises ``UnitReadError`` (transient), ``UnitCancelled``, or
        ``RuntimeError`` when the model fails on a whole batch."""
        t0 = time.perf_counter()
        info = UnitInfo()
        rows: list[dict[str, Any]] = []
        with self._stats_lock:
            self._live[unit.unit_id] = rows
        waiting: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        inflight: deque = deque()
        prefetch = 2 * self.spec.batch_size
        model_s = 0.0
        cfg = self.spec.decode_cfg
        try:
            for s in iter_samples(unit, info, self.spec.storage_options, self.spec.image_column,
                                  allow_external_refs=self.spec.allow_external_refs, extensions=self.spec.extensions):
                if self._cancelled.is_set():
                    raise UnitCancelled("the run was interrupted")
                inflight.append(self._pool.submit(decode_sample, unit.unit_id, s, cfg))
                if len(inflight) >= prefetch:
                    model_s += self._take(inflight.popleft().result(), rows, waiting)
            while inflight:
                model_s += self._take(inflight.popleft().result(), rows, waiting)
            for group in list(waiting.values()):
                model_s += self._tokenize(group)
        finally:
            for f in inflight:
                f.cancel()
        read_s = time.perf_counter() - t0 - model_s
        return CompleteUnit(unit, rows_to_table(rows), {"read_s": read_s, "passthrough_schema": info.passthrough_schema,
                                                        "image_column": info.image_column}, model_s)

    def _take(self, row: dict[str, Any], rows: list, waiting: dict) -> float:
        """Keep ``row`` (rows stay in sample order); run the model once a shape group holds a full batch."""
        rows.append(row)
        if row["kind"] != ROW_OK or row.get("img") is None:
            return 0.0
        group = waiting.setdefault(row["img"].shape, [])
        group.append(row)
        if len(group) < self.runner.batch_size:
            return 0.0
        del waiting[row["img"].shape]
        return self._tokenize(group)

    def _tokenize(self, group: list[dict[str, Any]]) -> float:
        if self._cancelled.is_set():
            raise UnitCancelled("the run was interrupted")
        with self._model_lock:
            return self.runner.tokenize(group)

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            return {"hist": self.hist.copy(), "units": self.units_done, "batch_size": self.runner.batch_size,
                    "oom_halvings": self.runner.oom_halvings}


class UnitWorkerActor:
    """A Ray actor holding one model (on its GPU, or on its node's CPUs) and a decode pool.

    Created with ``max_restarts=0``: a constructor that fails (a bad node, a driver mismatch) kills only this actor;
    the driver sees it on the actor's first call and starts a replacement elsewhere, within a budget. ``max_concurrency``
    lets the next unit decode while the current one is on the model.
    """

    def __init__(self, payload_ref: list, spec: WorkSpec, *, use_gpu: bool, cpu_threads: int, precision: str,
                 latents: bool, warmup: bool = True):
        import ray

        payload = ray.get(payload_ref[0])
        runner = ModelRunner.from_payload(payload, use_gpu=use_gpu, cpu_threads=cpu_threads,
                                          batch_size=spec.batch_size, precision=precision, latents=latents,
                                          warmup_size=spec.image_size if warmup else None)
        self.proc = UnitProcessor(spec, runner)
        self.node = ray.get_runtime_context().get_node_id()

    def ready(self) -> str:
        return self.node

    def process(self, unit_dict: dict[str, Any]) -> UnitOutcome:
        out = self.proc.process(unit_dict)
        out["node"] = self.node
        return out

    def stats(self) -> dict[str, Any]:
        return self.proc.stats()
