"""Commit finished units as Ray tasks, so shard encoding and uploads never run on (or are limited by) the driver.

The driver only assembles units (vectorized, ~10^5 rows/s) and hands each complete unit's table to a ``commit_unit``
task: building a tar is Python-bound (~75 ms per 1000 samples) and would cap a driver that wrote itself at a few
thousand images/s, fewer than one fast GPU produces. Tasks ask for no CPU (they are short and mostly I/O) and at most
``parallel`` run at once, which bounds the driver's memory. With a local ``--output`` they are pinned to the driver's
node, so every file lands on the disk the user named; object-store outputs may be written from any node.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from gq_pipeline.commit import CompleteUnit, commit_unit
from gq_pipeline.manifest import OutputStore
from gq_pipeline.sources import Unit
from gq_pipeline.writers import ShardContext

__all__ = ["Committer", "CommitResult"]


@dataclass
class CommitResult:
    unit: Unit
    record: dict[str, Any] | None
    hist: np.ndarray | None
    write_s: float
    read_s: float
    model_s: float
    error: str | None = None
    created: bool = True  # False: the unit was already committed (another run or an earlier attempt); not ours


def _commit_task(url: str, storage_options: dict | None, ctx: ShardContext, formats: tuple[str, ...],
                 niceness: int, done: CompleteUnit) -> tuple[dict[str, Any], np.ndarray | None, bool, float]:
    from gq_pipeline.stages import lower_priority

    lower_priority(niceness)
    t0 = time.perf_counter()
    record, hist, created = commit_unit(OutputStore(url, storage_options), ctx, formats, done)
    return record, hist, created, time.perf_counter() - t0


class Committer:
    """Bounded pool of in-flight commit tasks; ``submit`` blocks while ``parallel`` are running."""

    def __init__(self, store: OutputStore, storage_options: dict | None, ctx: ShardContext,
                 formats: tuple[str, ...], parallel: int = 8, niceness: int = 0):
        import ray

        self._ray = ray
        options: dict[str, Any] = {"num_cpus": 0, "max_retries": 2}
        if store.local:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self._task = ray.remote(_commit_task).options(**options)
        self._args = (store.url, storage_options, ctx, formats, niceness)
        self._pending: dict[Any, CompleteUnit] = {}
        self.parallel = max(1, int(parallel))

    def submit(self, done: CompleteUnit) -> list[CommitResult]:
        """Start committing ``done``; returns the commits that finished meanwhile (waiting if the pool is full)."""
        finished = self.poll(block=len(self._pending) >= self.parallel)
        self._pending[self._task.remote(*self._args, done)] = done
        return finished

    def poll(self, block: bool = False) -> list[CommitResult]:
        if not self._pending:
            return []
        ready, _ = self._ray.wait(list(self._pending), num_returns=1 if block else len(self._pending),
                                  timeout=None if block else 0)
        out = []
        for ref in ready:
            done = self._pending.pop(ref)
            read_s, model_s = done.info.get("read_s", 0.0), done.model_s
            try:
                record, hist, created, dt = self._ray.get(ref)
            except Exception as e:  # the unit stays uncommitted and is redone by the next run
                out.append(CommitResult(done.unit, None, None, 0.0, read_s, model_s,
                                        f"write failed: {type(e).__name__}: {e}"[:2000]))
                continue
            out.append(CommitResult(done.unit, record, hist, dt, read_s, model_s, created=created))
        return out

    def drain(self) -> list[CommitResult]:
        out = []
        while self._pending:
            out += self.poll(block=True)
        return out
