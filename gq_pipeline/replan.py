"""Reconcile a fresh folder listing with the units an output already committed.

A folder's units are its sorted listing cut into runs of ``unit_size`` files, so a unit's identity depends on its
neighbours: one image added to a folder (or a new ``--unit-size``) shifts every later unit boundary, and a naive
rerun would tokenize already-committed files a second time under new unit ids. This module makes reruns safe
against any change of the listing:

* the common case costs one set lookup per committed unit: when every committed unit of a folder is still one of
  the planned units, the plan stands as it is;
* otherwise ("stale" units exist for that folder), the files each committed unit covered are recovered exactly —
  from the record's first/last/count when the current listing still hashes to its unit id (nothing was inserted or
  removed inside its range), else from the ``source`` columns of its own shards — and only the folder's files that
  no committed unit covered are cut into new units.

Cutting the uncovered files into runs of ``unit_size`` reproduces the original units whenever the listing did not
change (removing whole full-size runs from a sorted list keeps the remaining runs aligned), so a rerun after a crash
still rewrites the same shard names and bytes. Files that were committed and have since disappeared keep their
tokens; they are counted and reported, never dropped silently.
"""
from __future__ import annotations

import bisect
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from gq_pipeline.sources import Unit

__all__ = ["Reconciled", "reconcile_with_committed"]

log = logging.getLogger(__name__)


@dataclass
class Reconciled:
    units: list[Unit]
    changed_dirs: list[str] = field(default_factory=list)  # folders whose committed units no longer match the plan
    recut_units: int = 0  # units of those folders cut from files no committed unit covers
    committed_unlisted: int = 0  # files inside committed units that the current listing no longer has
    shards_read: int = 0  # committed units whose exact file list had to be read back from their shards

    def describe(self) -> str:
        if not self.changed_dirs:
            return ""
        first = self.changed_dirs[0]
        more = f" and {len(self.changed_dirs) - 1} more" if len(self.changed_dirs) > 1 else ""
        gone = (f"; {self.committed_unlisted} committed files are no longer listed (their tokens are kept)"
                if self.committed_unlisted else "")
        return (f"the listing of {first}{more} changed since its units were committed (files added or removed, or "
                f"another --unit-size): {self.recut_units} new units hold the files no committed unit covers{gone}")


def reconcile_with_committed(units: list[Unit], records: dict[str, dict[str, Any]], unit_size: int,
                             read_committed_sources: Callable[[dict[str, Any]], Iterable[str]]) -> Reconciled:
    """Return the units to consider for this run (committed ones included where the plan still holds).

    ``read_committed_sources(record)`` yields the ``source`` URL of every sample (tokenized or error) of a committed
    unit; it is called only for units whose range changed in place.
    """
    planned_ids = {u.unit_id for u in units}
    planned_dirs: dict[str, list[Unit]] = defaultdict(list)
    for u in units:
        if u.kind == "files":
            planned_dirs[u.source].append(u)
    committed_by_dir: dict[str, list[dict[str, Any]]] = defaultdict(list)
    stale_dirs = set()
    for rec in records.values():
        if rec.get("kind") != "files" or rec.get("source") not in planned_dirs:
            continue  # tar/parquet units are whole files; other folders are not part of this run's inputs
        committed_by_dir[rec["source"]].append(rec)
        if rec["unit_id"] not in planned_ids:
            stale_dirs.add(rec["source"])
    result = Reconciled(units=[u for u in units if u.kind != "files" or u.source not in stale_dirs])
    for d in sorted(stale_dirs):
        dir_units = planned_dirs[d]
        prefix = dir_units[0].prefix
        names = sorted(n for u in dir_units for n in u.files)
        listed = set(names)
        covered: set[str] = set()
        for rec in committed_by_dir[d]:
            span = rec.get("files") or {}
            lo = bisect.bisect_left(names, span.get("first", ""))
            hi = bisect.bisect_right(names, span.get("last", ""))
            in_range = tuple(names[lo:hi])
            if in_range and len(in_range) == span.get("count") and Unit("files", d, in_range).unit_id == rec["unit_id"]:
                covered.update(in_range)
                continue
            base = d.rstrip("/") + "/"
            try:
                exact = {s[len(base):] for s in read_committed_sources(rec) if s.startswith(base)}
            except Exception as e:
                raise RuntimeError(f"the listing of {d} changed inside committed unit {rec['unit_id']}, and its "
                                   f"shards could not be read back to tell its files apart ({type(e).__name__}: "
                                   f"{e}); the output is damaged: restore the unit's shards or use a new --output"
                                   ) from e
            result.shards_read += 1
            if len(exact) != rec.get("inputs", len(exact)):
                raise RuntimeError(f"committed unit {rec['unit_id']} of {d} records {rec.get('inputs')} inputs but "
                                   f"its shards name {len(exact)} files; the output is damaged")
            covered.update(exact)
            result.committed_unlisted += len(exact - listed)
        todo = [n for n in names if n not in covered]
        new = [Unit("files", d, tuple(todo[i:i + unit_size]), prefix) for i in range(0, len(todo), unit_size)]
        result.units.extend(new)
        result.recut_units += len(new)
        result.changed_dirs.append(d)
    result.units.sort(key=lambda u: (u.source, u.files[:1]))
    if result.changed_dirs:
        log.warning(result.describe())
    return result
