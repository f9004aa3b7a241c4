"""The driver's loop: hand units to workers, collect one small outcome per unit, retry, and keep a failure budget.

Units arrive as a stream (the plan is never copied into the object store) and go one per call to a worker, so a
retry redoes exactly one unit. Workers are either Ray actors (:class:`ActorPool`: one per GPU, or per CPU node) or
threads of this process around the driver's own model (:class:`LocalPool`); the loop is the same.

Faults are budgeted, not fatal:

* a unit whose worker *dies* (node removed, spot preemption, OOM-killed process) is requeued and redone on another
  worker, in the same run; the dead worker is replaced, so the pool is elastic;
* a worker whose *set-up* fails (a bad node, a missing driver) is replaced too; only when no worker at all can
  start is the job stopped, with the set-up error;
* a unit that *fails* (a transient read error, a model that fails on every image of a batch, a write that fails)
  is retried up to ``max_attempts`` times, then recorded as failed with its error, and the job goes on (the CLI
  exits 3 at the end); ``max_failed_units`` stops a job whose failures run away.
"""
from __future__ import annotations

import pickle
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

__all__ = ["FailureBudget", "LocalPool", "ActorPool", "run_units", "RunStats", "WorkerLost", "NoWorkersError",
           "FailureBudgetExceeded", "Interrupted"]


class WorkerLost(Exception):
    """The worker running a unit died; the unit did not fail and is redone elsewhere."""


class NoWorkersError(RuntimeError):
    """No model worker could be started (every set-up failed, or none was placed in time)."""


class FailureBudgetExceeded(RuntimeError):
    """More units failed than ``--max-failed-units`` allows; ``stats`` holds what the run did until it stopped."""

    def __init__(self, message: str, stats: "RunStats"):
        super().__init__(message)
        self.stats = stats


class Interrupted(Exception):
    """The run was stopped by Ctrl-C or SIGTERM; ``stats`` holds what was committed until then."""

    def __init__(self, stats: "RunStats"):
        super().__init__("interrupted")
        self.stats = stats


class FailureBudget:
    """``--max-failed-units``: an absolute count (``"20"``) or a fraction of the planned units (``"0.05"``, ``"5%"``).

    ``None`` takes the default: 5 % of the planned units, at least 10, so a single bad shard never stops a job but a
    broken model or store does after a bounded amount of work.
    """

    def __init__(self, spec: str | int | float | None, planned: int | None):
        self.spec = spec
        if spec is None or spec == "":
            self.limit = max(10, int(0.05 * (planned or 0)))
            return
        text = str(spec).strip()
        try:
            if text.endswith("%"):
                frac = float(text[:-1]) / 100.0
            elif isinstance(spec, float) or "." in text:
                frac = float(text)
            else:
                frac = None
                self.limit = int(text)
        except ValueError:
            raise ValueError(f"--max-failed-units must be a count (20) or a fraction (0.05 or 5%), got {spec!r}") \
                from None
        if frac is not None:
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"--max-failed-units fraction must be within [0, 1], got {spec!r}")
            self.limit = int(frac * (planned or 0))
        if self.limit < 0:
            raise ValueError(f"--max-failed-units must not be negative, got {spec!r}")

    def exceeded(self, failed: int) -> bool:
        return failed > self.limit


@dataclass
class RunStats:
    committed: list[dict[str, Any]] = field(default_factory=list)  # outcomes of committed units
    failed: list[dict[str, str]] = field(default_factory=list)  # {"unit_id", "source", "reason", "attempts"}
    already: list[dict[str, Any]] = field(default_factory=list)  # records of units another run committed first
    retries: int = 0
    workers_lost: int = 0
    images: int = 0
    outcome_bytes: int = 0  # pickled size of every outcome the driver received: what crosses to the driver


# ------------------------------------------------------------------------------------------------------- pools

class LocalPool:
    """Units processed by threads of this process (the driver placement): ``concurrency`` units in flight, so the
    next unit decodes while the current one is on the model."""

    def __init__(self, process: Callable[[dict], dict], concurrency: int = 2, cancel: Callable[[], None] = None,
                 stats: Callable[[], dict] | None = None, live: Callable[[], tuple[int, int]] | None = None):
        self._process = process
        self._cancel = cancel
        self._stats = stats
        self._live = live
        self._ex = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="gq-unit")
        self._inflight: dict[Any, tuple[dict, int]] = {}
        self.concurrency = concurrency

    def has_capacity(self) -> bool:
        return len(self._inflight) < self.concurrency

    def inflight(self) -> int:
        return len(self._inflight)

    def submit(self, unit: dict, attempt: int) -> None:
        self._inflight[self._ex.submit(self._process, unit)] = (unit, attempt)

    def wait(self, timeout: float) -> list[tuple[dict, int, Any]]:
        if not self._inflight:
            return []
        done, _ = futures_wait(list(self._inflight), timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        for f in done:
            unit, attempt = self._inflight.pop(f)
            try:
                out.append((unit, attempt, f.result()))
            except Exception as e:
                out.append((unit, attempt, _failed(unit, e)))
        return out

    def stats(self) -> list[dict[str, Any]]:
        """The processor's accumulated statistics, in the shape ``ActorPool.stats`` gives them."""
        return [self._stats()] if self._stats is not None else []

    def live(self) -> tuple[int, int]:
        """(samples finished, errors) in units still in progress (0, 0 unless the processor counts them)."""
        return self._live() if self._live is not None else (0, 0)

    def close(self) -> None:
        """Stop: queued units never start, running ones are cancelled at their next sample or batch."""
        if self._inflight and self._cancel is not None:
            self._cancel()
        self._ex.shutdown(wait=True, cancel_futures=True)


def _failed(unit: dict, e: BaseException) -> dict:
    return {"unit_id": unit.get("unit_id"), "source": unit.get("source"), "status": "failed", "record": None,
            "error": f"{type(e).__name__}: {e}"[:3000]}


@dataclass
class _Actor:
    handle: Any
    ready_ref: Any
    ready: bool = False
    inflight: int = 0
    node: str | None = None


class ActorPool:
    """An elastic pool of Ray actors built by ``make_actor()``: ``size`` are kept alive (dead ones are replaced),
    each runs up to ``per_actor`` units at once. Actors that cannot be placed yet simply wait (an autoscaler adds
    nodes for them); the job fails only when no actor is left, or fewer than ``min_ready`` have been ready for
    ``start_timeout_s``. Between ``min_ready`` and ``size`` the pool is elastic: preempted actors are replaced when
    resources return, and work goes on with those alive.
    Replacements stop after ``max_start_failures`` failed set-ups, so a node that breaks every actor placed on it
    cannot keep the pool restarting them while the healthy actors carry on."""

    def __init__(self, make_actor: Callable[[], Any], size: int, *, per_actor: int = 2, min_ready: int = 1,
                 start_timeout_s: float = 900.0, max_start_failures: int | None = None):
        import ray

        self._ray = ray
        self._make = make_actor
        self.size = max(1, int(size))
        self.min_ready = max(1, min(int(min_ready), self.size))
        self.per_actor = max(1, int(per_actor))
        self.start_timeout_s = start_timeout_s
        self.max_start_failures = max_start_failures if max_start_failures is not None else max(3, 2 * self.size)
        self._actors: dict[Any, _Actor] = {}  # ready_ref -> actor
        self._calls: dict[Any, tuple[_Actor, dict, int]] = {}
        self.start_failures = 0
        self.started = 0
        self.last_start_error: str | None = None
        self._since_ready = time.monotonic()
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> None:
        handle = self._make()
        ref = handle.ready.remote()
        self._actors[ref] = _Actor(handle, ref)

    def _ready_actors(self) -> list[_Actor]:
        return [a for a in self._actors.values() if a.ready]

    def has_capacity(self) -> bool:
        return any(a.inflight < self.per_actor for a in self._ready_actors())

    def inflight(self) -> int:
        return len(self._calls)

    def submit(self, unit: dict, attempt: int) -> None:
        actor = min((a for a in self._ready_actors() if a.inflight < self.per_actor), key=lambda a: a.inflight)
        actor.inflight += 1
        self._calls[actor.handle.process.remote(unit)] = (actor, unit, attempt)

    def _retire(self, actor: _Actor) -> None:
        """Forget a dead actor, kill it for good measure, and start a replacement, unless set-ups have failed
        ``max_start_failures`` times already (a node that breaks every actor placed on it must not keep the pool
        busy restarting them: the live actors carry on)."""
        if self._actors.pop(actor.ready_ref, None) is None:
            return
        try:
            self._ray.kill(actor.handle, no_restart=True)
        except Exception:
            pass
        if self.start_failures < self.max_start_failures:
            self._spawn()

    def wait(self, timeout: float) -> list[tuple[dict, int, Any]]:
        from ray.exceptions import (ActorUnavailableError, GetTimeoutError, ObjectLostError, OwnerDiedError,
                                    RayActorError, RayTaskError, WorkerCrashedError)

        lost_errors = (RayActorError, ActorUnavailableError, WorkerCrashedError, ObjectLostError, OwnerDiedError)
        pending_ready = [ref for ref, a in self._actors.items() if not a.ready]
        refs = list(self._calls) + pending_ready
        out: list[tuple[dict, int, Any]] = []
        if not refs:
            self._check_alive()
            return out
        done, _ = self._ray.wait(refs, num_returns=1, timeout=timeout)
        if done:
            done, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            if ref in self._actors:  # an actor's set-up finished, one way or the other
                actor = self._actors[ref]
                try:
                    actor.node = self._ray.get(ref)
                    actor.ready = True
                    self.started += 1
                    self._since_ready = time.monotonic()
                except Exception as e:
                    self.start_failures += 1
                    self.last_start_error = _short_error(e)
                    self._retire(actor)
                continue
            actor, unit, attempt = self._calls.pop(ref)
            actor.inflight -= 1
            try:
                out.append((unit, attempt, self._ray.get(ref)))
            except lost_errors as e:
                self._retire(actor)
                out.append((unit, attempt, WorkerLost(_short_error(e))))
            except (RayTaskError, GetTimeoutError, Exception) as e:  # the call itself raised (a failed write, ...)
                out.append((unit, attempt, _failed(unit, e)))
        self._check_alive()
        return out

    def _check_alive(self) -> None:
        ready = len(self._ready_actors())
        if ready >= self.min_ready:
            self._since_ready = time.monotonic()
            return
        if not self._actors:
            raise NoWorkersError(f"no model worker could start ({self.start_failures} set-up failures); last "
                                 f"error: {self.last_start_error}")
        if time.monotonic() - self._since_ready > self.start_timeout_s:
            raise NoWorkersError(f"only {ready} model worker(s) ready, fewer than the {self.min_ready} asked for "
                                 f"(--min-workers), for {self.start_timeout_s:.0f}s: the cluster lacks the resources "
                                 f"asked for (GPUs/CPUs per worker), or nodes are still joining; last set-up error: "
                                 f"{self.last_start_error}")

    def stats(self) -> list[dict[str, Any]]:
        """Each live actor's accumulated statistics (token histogram, OOM halvings)."""
        refs = [a.handle.stats.remote() for a in self._ready_actors()]
        out = []
        for ref in refs:
            try:
                out.append(self._ray.get(ref, timeout=60))
            except Exception:
                pass  # a worker lost at the very end: its histogram is missing from this run's usage statistics
        return out

    def close(self) -> None:
        for a in list(self._actors.values()):
            try:
                self._ray.kill(a.handle, no_restart=True)
            except Exception:
                pass
        self._actors.clear()


def _short_error(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text[-1500:]}"


# ------------------------------------------------------------------------------------------------------- the loop

def run_units(pool, units: Iterable[dict], *, budget: FailureBudget, max_attempts: int = 3, max_lost: int = 5,
              on_progress: Callable[[RunStats], None] | None = None, progress_every_s: float = 10.0) -> RunStats:
    """Drive ``units`` through ``pool`` until every unit is committed or failed. Raises
    :class:`FailureBudgetExceeded` (after letting in-flight units finish) when too many fail, and
    :class:`Interrupted` at once on Ctrl-C / SIGTERM (``KeyboardInterrupt`` in this thread)."""
    stats = RunStats()
    it: Iterator[dict] = iter(units)
    retry: deque[tuple[dict, int]] = deque()
    lost_counts: dict[str, int] = {}
    try:
        _loop(pool, it, retry, lost_counts, stats, budget, max_attempts, max_lost, on_progress, progress_every_s)
    except KeyboardInterrupt:
        # Do not wait for the units in flight (a unit can take minutes): they are not committed, and a rerun redoes
        # them. The caller writes the manifest of what was committed.
        raise Interrupted(stats) from None
    return stats


def _loop(pool, it, retry, lost_counts, stats, budget, max_attempts, max_lost, on_progress, progress_every_s):
    exhausted = False
    stop_reason: str | None = None
    last = time.monotonic()
    while True:
        while stop_reason is None and pool.has_capacity():
            if retry:
                unit, attempt = retry.popleft()
            elif not exhausted:
                unit = next(it, None)
                if unit is None:
                    exhausted = True
                    continue
                attempt = 0
            else:
                break
            pool.submit(unit, attempt)
        if pool.inflight() == 0 and (stop_reason is not None or (exhausted and not retry)):
            break
        for unit, attempt, outcome in pool.wait(timeout=1.0):
            uid = unit["unit_id"]
            if isinstance(outcome, dict):
                stats.outcome_bytes += len(pickle.dumps(outcome, protocol=5))
            if isinstance(outcome, WorkerLost):
                stats.workers_lost += 1
                lost_counts[uid] = lost_counts.get(uid, 0) + 1
                if lost_counts[uid] <= max_lost:
                    retry.append((unit, attempt))
                    continue
                outcome = {"status": "failed", "error": f"its worker died {lost_counts[uid]} times: {outcome}"}
                attempt = max_attempts  # a unit that kills its workers is not tried again
            status = outcome.get("status")
            if status == "committed":
                stats.committed.append(outcome)
                stats.images += int(outcome.get("inputs") or 0)
            elif status == "already_committed":
                if outcome.get("record"):
                    stats.already.append(outcome["record"])
            else:
                if attempt + 1 < max_attempts:
                    stats.retries += 1
                    retry.append((unit, attempt + 1))
                    continue
                stats.failed.append({"unit_id": uid, "source": unit.get("source", ""),
                                     "reason": str(outcome.get("error"))[:3000],
                                     "attempts": min(attempt + 1, max_attempts)})
                if budget.exceeded(len(stats.failed)) and stop_reason is None:
                    stop_reason = (f"{len(stats.failed)} units failed, more than --max-failed-units allows "
                                   f"({budget.limit}); last: {stats.failed[-1]['reason'][:500]}")
        now = time.monotonic()
        if on_progress is not None and now - last >= progress_every_s:
            last = now
            on_progress(stats)
    if stop_reason is not None:
        raise FailureBudgetExceeded(stop_reason, stats)
