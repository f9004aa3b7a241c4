"""The progress line of ``gq tokenize``: images done of the total, images/s, ETA, errors so far, units committed.

Fed by the scheduler's :class:`~gq_pipeline.scheduler.RunStats` (one outcome per committed unit, whose ``inputs`` are
the unit's samples: image rows plus error rows, nothing else) and, where the pool can tell, the samples finished in
units still in progress (the driver placement's :meth:`UnitProcessor.live_counts`), so a run of one large unit does
not sit at 0 until its commit.

On a terminal the line is rewritten in place (``\\r``) at most every ``tty_every_s``; into a file or a pipe (CI logs,
``nohup``) a plain line is written every ``every_s`` seconds (``GQ_PROGRESS_INTERVAL``, default 10), so logs stay
readable. Rendering is a pure function,
:func:`render`, so what the line says is tested without a terminal.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TextIO

__all__ = ["Snapshot", "render", "format_duration", "ProgressReporter", "unit_size"]


@dataclass(frozen=True)
class Snapshot:
    """What the run has done so far. ``images_total`` is None while some unit's size is unknown (a tar or Parquet
    unit not yet read); ``images_known`` is then the lower bound known so far."""

    images_done: int
    images_total: int | None
    images_known: int
    errors: int
    units_committed: int
    units_total: int
    elapsed_s: float
    units_failed: int = 0
    retries: int = 0
    workers_lost: int = 0


def format_duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``; ``--`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def eta_seconds(snap: Snapshot) -> float | None:
    """Time left at the run's average rate: by images when their total is known, else by units (rougher)."""
    if snap.images_total is not None and snap.images_done >= snap.images_total:
        return 0.0
    if snap.elapsed_s <= 0:
        return None
    if snap.images_total is not None:
        if snap.images_done <= 0:
            return None
        return max(0.0, (snap.images_total - snap.images_done) * snap.elapsed_s / snap.images_done)
    finished = snap.units_committed + snap.units_failed
    if finished <= 0:
        return None
    return max(0, snap.units_total - finished) * snap.elapsed_s / finished


def render(snap: Snapshot) -> str:
    """One progress line, e.g. ``120/341 images (35%) | 12.3 img/s | ETA 18s | 2 errors | 1/3 units committed``."""
    if snap.images_total is not None:
        pct = 100.0 * snap.images_done / snap.images_total if snap.images_total else 100.0
        images = f"{snap.images_done}/{snap.images_total} images ({pct:.0f}%)"
    else:  # tar/Parquet units not read yet: their sizes are only known once they are
        images = f"{snap.images_done}/{snap.images_known}+ images"
    rate = snap.images_done / snap.elapsed_s if snap.elapsed_s > 0 else 0.0
    parts = [images, f"{rate:.1f} img/s", f"ETA {format_duration(eta_seconds(snap))}",
             f"{snap.errors} error{'' if snap.errors == 1 else 's'}",
             f"{snap.units_committed}/{snap.units_total} units committed"]
    extra = [f"{n} {what}" for n, what in ((snap.units_failed, "units failed"), (snap.retries, "retried"),
                                           (snap.workers_lost, "workers lost")) if n]
    return " | ".join(parts) + (f" ({', '.join(extra)})" if extra else "")


def unit_size(unit: dict[str, Any]) -> int | None:
    """Samples a planned unit holds, when the plan knows it: a folder unit's files, an input list's rows; None for a
    tar or Parquet file (known once read)."""
    if unit.get("kind") == "files":
        return len(unit.get("files") or ())
    if unit.get("kind") == "list":
        return int(unit.get("count") or 0)
    return None


class ProgressReporter:
    """Turns run statistics into progress lines on ``stream`` (stderr by default). Call :meth:`update` as often as
    convenient (it throttles itself) and :meth:`close` once, which writes the final line."""

    def __init__(self, units: Iterable[dict[str, Any]], *, enabled: bool = True, stream: TextIO | None = None,
                 tty: bool | None = None, every_s: float | None = None, tty_every_s: float = 0.5,
                 prefix: str = "[gq tokenize] ",
                 clock: Callable[[], float] = time.monotonic):
        self.sizes = {u["unit_id"]: unit_size(u) for u in units}
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        if every_s is None:  # GQ_PROGRESS_INTERVAL: seconds between plain lines in logs (default 10)
            every_s = float(os.environ.get("GQ_PROGRESS_INTERVAL", "10"))
        self.every_s = tty_every_s if tty else every_s
        self.prefix = prefix
        self.clock = clock
        self.t0 = clock()
        self._last_write: float | None = None
        self._shown = 0  # images shown last: never goes back (a unit's count moves from in-flight to committed)
        self._open_line = False

    @property
    def tick_s(self) -> float:
        """How often the caller should offer an update (the scheduler's ``progress_every_s``)."""
        return min(1.0, self.every_s)

    def snapshot(self, stats: Any, live: tuple[int, int] = (0, 0)) -> Snapshot:
        """A :class:`Snapshot` of ``stats`` (a ``RunStats``) plus ``live`` = (samples, errors) of units in progress."""
        committed = list(stats.committed) if stats is not None else []
        done_ids = {o.get("unit_id") for o in committed}
        failed_ids = {f.get("unit_id") for f in (stats.failed if stats is not None else [])}
        images = sum(int(o.get("inputs") or 0) for o in committed)
        errors = sum(int((o.get("record") or {}).get("errors") or 0) for o in committed)
        for r in (stats.already if stats is not None else []):  # committed by another run meanwhile: done too
            done_ids.add(r.get("unit_id"))
            images += int(r.get("inputs") or 0)
            errors += int(r.get("errors") or 0)
        # failed units leave the total: their images are not coming (the line says how many units failed)
        known = images + sum(n or 0 for uid, n in self.sizes.items() if uid not in done_ids | failed_ids)
        unknown = any(n is None for uid, n in self.sizes.items() if uid not in done_ids | failed_ids)
        images += int(live[0])
        errors += int(live[1])
        self._shown = images = max(self._shown, images)
        return Snapshot(images_done=images, images_total=None if unknown else known, images_known=known,
                        errors=errors, units_committed=len(done_ids), units_total=len(self.sizes),
                        elapsed_s=self.clock() - self.t0, units_failed=len(failed_ids),
                        retries=int(getattr(stats, "retries", 0) or 0),
                        workers_lost=int(getattr(stats, "workers_lost", 0) or 0))

    def update(self, stats: Any, live: tuple[int, int] = (0, 0), force: bool = False) -> str | None:
        """Write a line if one is due (or ``force``); returns what was written, without the prefix."""
        if not self.enabled:
            return None
        now = self.clock()
        if not force and self._last_write is not None and now - self._last_write < self.every_s:
            return None
        if not force and self._last_write is None and now - self.t0 < self.every_s:
            return None  # nothing worth a line in the first moments (and short runs stay quiet until the end)
        self._last_write = now
        line = render(self.snapshot(stats, live))
        if self.tty:
            self.stream.write(f"\r{self.prefix}{line}\x1b[K")
            self._open_line = True
        else:
            self.stream.write(f"{self.prefix}{line}\n")
        self.stream.flush()
        return line

    def close(self, stats: Any) -> str | None:
        """The final line (what was done, at the run's average rate), ending the in-place line on a terminal."""
        self._shown = 0  # the final count is the committed one, exactly (no in-flight units are left)
        line = self.update(stats, force=True)
        if self.tty and self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False
        return line
