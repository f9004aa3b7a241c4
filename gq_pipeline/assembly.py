"""Driver side: regroup streamed rows into whole units, then write and commit each finished unit.

Ray Data does not keep a unit's rows together after the actor pool (batches mix units and arrive in any order), so
the driver keeps one small buffer per unit in flight (tokens only: ~2 KB per 256² image; images never reach the
driver). A unit is complete when its ``end`` row has arrived and it holds that many distinct sample indices;
duplicates from task or actor retries are dropped by index. ``commit_unit`` then writes the shards, the error file
and, last, the commit record.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gq_pipeline.commit import CompleteUnit, commit_unit
from gq_pipeline.records import ROW_END
from gq_pipeline.sources import Unit

__all__ = ["UnitAssembler", "CompleteUnit", "FailedUnit", "commit_unit"]


@dataclass
class _Buffer:
    tables: list[pa.Table] = field(default_factory=list)
    rows: int = 0  # rows received, retries' duplicates included
    expected: int | None = None
    info: dict[str, Any] | None = None
    failure: str | None = None
    model_s: float = 0.0


@dataclass
class FailedUnit:
    unit: Unit
    reason: str


class UnitAssembler:
    """Collects rows per unit; ``add`` returns the units that became complete (or failed) with this batch."""

    def __init__(self, units: dict[str, Unit]):
        self.units = units
        self.buffers: dict[str, _Buffer] = {}

    @property
    def buffered_bytes(self) -> int:
        return sum(t.nbytes for b in self.buffers.values() for t in b.tables)

    def add(self, table: pa.Table) -> list[CompleteUnit | FailedUnit]:
        """Vectorized per batch: the cost is per unit present in the batch, not per row."""
        if table.num_rows == 0:
            return []
        is_end = pc.equal(table.column("kind"), ROW_END).to_numpy(zero_copy_only=False)
        encoded = pc.dictionary_encode(table.column("unit")).combine_chunks()
        names = encoded.dictionary.to_pylist()
        if len(names) == 1:
            parts = [(names[0], table, bool(is_end.any()))]
        else:  # zero-copy slices of each unit's run (after one stable sort if units interleave)
            codes = encoded.indices.to_numpy(zero_copy_only=False)
            cuts = np.flatnonzero(np.diff(codes)) + 1
            if len(cuts) != len(names) - 1:
                order = np.argsort(codes, kind="stable")
                table, codes, is_end = table.take(pa.array(order)), codes[order], is_end[order]
                cuts = np.flatnonzero(np.diff(codes)) + 1
            starts = np.concatenate([[0], cuts, [len(codes)]])
            parts = [(names[codes[a]], table.slice(a, b - a), bool(is_end[a:b].any()))
                     for a, b in zip(starts[:-1], starts[1:])]
        done: list[CompleteUnit | FailedUnit] = []
        for uid, rows, has_end in parts:
            result = self._add_unit_rows(uid, rows, has_end)
            if result is not None:
                done.append(result)
        return done

    def _add_unit_rows(self, uid: str, rows: pa.Table, has_end: bool) -> CompleteUnit | FailedUnit | None:
        if uid not in self.units:  # a stale retry of a unit already handled
            return None
        buf = self.buffers.get(uid)
        if buf is None:
            buf = self.buffers[uid] = _Buffer()
        if has_end:
            end_mask = pc.equal(rows.column("kind"), ROW_END)
            end = rows.filter(end_mask).slice(0, 1).to_pylist()[0]
            buf.expected = int(end["n"])
            buf.info = pickle.loads(end["info"]) if end["info"] else {}
            buf.failure = end["error"] or None
            rows = rows.filter(pc.invert(end_mask))
        if rows.num_rows:
            buf.tables.append(rows)
            buf.rows += rows.num_rows
        unit = self.units[uid]
        if buf.failure:
            self._forget(uid)
            return FailedUnit(unit, buf.failure)
        if buf.expected is None or buf.rows < buf.expected:
            return None
        all_rows = None
        if buf.tables:
            all_rows = pa.concat_tables(buf.tables)
            buf.model_s = float(pc.sum(all_rows.column("model_s")).as_py() or 0.0)
            all_rows = all_rows.take(pc.sort_indices(all_rows, sort_keys=[("idx", "ascending")]))
            idx = all_rows.column("idx").to_numpy()
            keep = np.ones(len(idx), dtype=bool)
            keep[1:] = idx[1:] != idx[:-1]
            if not keep.all():  # duplicates from task/actor retries: keep the first of each index
                all_rows = all_rows.filter(pa.array(keep))
                idx = idx[keep]
            if len(idx) < buf.expected:  # duplicates made the count look complete: wait for the rest
                buf.tables, buf.rows = [all_rows], len(idx)
                return None
            if len(idx) != buf.expected or idx[0] != 0 or idx[-1] != buf.expected - 1:
                self._forget(uid)
                return FailedUnit(unit, f"sample indices are not 0..{buf.expected - 1}")
        self._forget(uid)
        if unit.expected_inputs is not None and buf.expected != unit.expected_inputs:
            return FailedUnit(unit, f"read {buf.expected} samples but the unit lists {unit.expected_inputs} files")
        return CompleteUnit(unit, all_rows, buf.info or {}, buf.model_s)

    def _forget(self, uid: str) -> None:
        self.buffers.pop(uid, None)
        self.units.pop(uid, None)

    def leftovers(self) -> list[FailedUnit]:
        """Units that never completed (the stream ended early): reported as failed, not committed."""
        out = []
        for uid, buf in self.buffers.items():
            out.append(FailedUnit(self.units[uid], f"incomplete: {buf.rows} of "
                                                   f"{buf.expected if buf.expected is not None else '?'} samples"))
        return out
