"""Plans persisted under the output (``.gq/plan/``), so a rerun with the same inputs does not list or read them again.

Only plans that cannot go stale are kept (docs/architecture.md, "Planning"):

* an input list, under ``.gq/plan/lists/<key>/``, where ``key`` hashes the list's URL, its identity (ETag, generation,
  or mtime and size: :func:`gq_pipeline.input_list.open_input_list`), the unit size and the column. A changed list
  has another key, so it is planned afresh; unit ids do not depend on the key (:class:`ListUnits`);
* a brace pattern whose expansion named files only (``s3://b/shards/{00000..99999}.tar``), under
  ``.gq/plan/inputs/<key>.json.gz``: the files it matched. Files named one by one are taken to be immutable, as their
  unit ids (their URLs) already assume.

Folders and globs are listed on every run: they may gain files between runs, and
:func:`gq_pipeline.replan.reconcile_with_committed` picks those up. ``relist=True`` (``--relist``) ignores and
rewrites the persisted plans.

An input list's plan is a copy of its resolved rows in the one format workers read by position: ``part-NNNNN.parquet``
files whose row groups are units (``unit_size`` rows each), next to ``part-NNNNN.json``, the units of that part
(written after it); ``plan.json`` is written last and marks the plan complete. A plan cut short (a crash while
planning) has no ``plan.json`` and is written again; its parts are rewritten with the same bytes.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterator

from gq_pipeline.input_list import InputList, row_kind
from gq_pipeline.layout import CURRENT
from gq_pipeline.records import IMAGE_EXTENSIONS

__all__ = ["ListUnits", "PLAN_DIR", "load_brace_plan", "save_brace_plan", "units_per_part"]

PLAN_DIR = CURRENT.plan  # gq_pipeline.layout: .gq/plan (version 1: _plan)
PLAN_VERSION = 1
_PART_ROWS = 1 << 18  # rows per part file (rounded to whole units)
_PART_UNITS = 4096  # at most this many tar/Parquet units per part, so a list of tars is planned in bounded memory


def units_per_part(unit_size: int) -> int:
    return max(1, _PART_ROWS // unit_size)


def _key(blob: dict[str, Any]) -> str:
    text = json.dumps(blob, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def _put(fs, path: str, data: bytes) -> None:
    from gq_model.storage import put_atomic

    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    put_atomic(fs, path, data)


def unit_digest(urls: list[str]) -> str:
    """The content of a list unit: sha256 of its URLs joined by newlines (checked again by the reader)."""
    return hashlib.sha256("\n".join(urls).encode("utf-8")).hexdigest()


@dataclass
class ListUnits:
    """The units of an input list, generated lazily: iterating it plans (or reads the persisted plan) as it goes,
    holding one batch of rows and one unit at a time, never the list.

    A ``list`` unit is rows ``[start, start + count)`` of the list's image rows; its id hashes ``start``, ``count``
    and the unit's URLs (:meth:`gq_pipeline.sources.Unit.description`), so it is the same whichever run, output or
    copy of the list planned it, and a list that only grew at its end keeps its earlier units. Rows naming tars or
    Parquet files become units of their own, with the ids a folder listing would give them.

    After a complete iteration ``rows``, ``ignored`` and ``ignored_examples`` describe the list; ``reused`` says
    whether a persisted plan was read instead of the list.
    """

    source: InputList
    unit_size: int
    plan_url: str  # the output's plan directory (.gq/plan)
    storage_options: dict | None = None
    relist: bool = False
    rows: int = 0
    ignored: int = 0
    ignored_examples: list[str] = field(default_factory=list)
    reused: bool = False

    @property
    def key(self) -> str:
        return _key({"v": PLAN_VERSION, "list": self.source.url, "identity": self.source.identity,
                     "format": self.source.format, "column": self.source.column, "unit_size": self.unit_size})

    @property
    def dir_url(self) -> str:
        return f"{self.plan_url.rstrip('/')}/lists/{self.key}"

    def __iter__(self) -> Iterator:
        from gq_pipeline.sources import get_fs

        fs, d = get_fs(self.dir_url, self.storage_options)
        self.rows, self.ignored, self.ignored_examples = 0, 0, []
        done = None
        if not self.relist:
            try:
                done = json.loads(fs.cat_file(posixpath.join(d, "plan.json")))
            except FileNotFoundError:
                done = None
        if done is not None:
            self.reused = True
            yield from self._read_back(fs, d, done)
            return
        self.reused = False
        yield from self._plan(fs, d)

    def _read_back(self, fs, d: str, done: dict[str, Any]) -> Iterator:
        from gq_pipeline.sources import Unit

        for i in range(done["parts"]):
            for u in json.loads(fs.cat_file(posixpath.join(d, f"part-{i:05d}.json")))["units"]:
                yield Unit.from_dict(u)
        self.rows, self.ignored = done["rows"], done["ignored"]
        self.ignored_examples = done.get("ignored_examples", [])

    def _plan(self, fs, d: str) -> Iterator:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from gq_model.storage import is_local_fs
        from gq_pipeline.sources import Unit, to_url

        per_part = units_per_part(self.unit_size)
        schema = pa.schema([("url", pa.string())])
        fs.makedirs(d, exist_ok=True)
        part = 0
        state: dict[str, Any] = {}

        def open_part():
            path = posixpath.join(d, f"part-{part:05d}.parquet")
            tmp = f"{path}.tmp-plan" if is_local_fs(fs) else path
            f = fs.open(tmp, "wb")
            state.update(path=path, tmp=tmp, file=f, writer=pq.ParquetWriter(f, schema, compression="zstd"),
                         units=[], groups=0)

        def close_part() -> list:
            units = state["units"]
            if state.get("writer") is not None:
                state["writer"].close()
                state["file"].close()
                if state["tmp"] != state["path"]:
                    fs.mv(state["tmp"], state["path"])
                _put(fs, posixpath.join(d, f"part-{part:05d}.json"),
                     json.dumps({"units": [u.to_dict() for u in units]}).encode("utf-8"))
            state.clear()
            return units

        pending: list[str] = []
        image_rows = 0
        listing = self.source.is_listing

        def flush_unit() -> None:
            nonlocal image_rows
            if state.get("writer") is None:
                open_part()
            urls = pending[:]
            state["writer"].write_table(pa.table({"url": pa.array(urls, pa.string())}, schema=schema),
                                        row_group_size=len(urls))
            part_url = to_url(fs, state["path"])
            state["units"].append(Unit("list", self.source.url, start=image_rows, count=len(urls),
                                       digest=unit_digest(urls), part=part_url, group=state["groups"]))
            state["groups"] += 1
            image_rows += len(urls)
            pending.clear()

        for batch in self.source.batches():
            for url in batch:
                self.rows += 1
                kind = row_kind(url)
                if listing and kind == "image":
                    name = url.rsplit("/", 1)[-1]
                    if name.startswith(".") or url.endswith("/"):
                        continue
                    if name.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
                        self.ignored += 1
                        if len(self.ignored_examples) < 5:
                            self.ignored_examples.append(url)
                        continue
                if kind != "image":
                    if state.get("writer") is None:
                        open_part()
                    state["units"].append(Unit(kind, url))
                    if len(state["units"]) >= max(per_part, _PART_UNITS):
                        yield from close_part()
                        part += 1
                    continue
                pending.append(url)
                if len(pending) == self.unit_size:
                    flush_unit()
                    if state["groups"] == per_part:
                        yield from close_part()
                        part += 1
        if pending:
            flush_unit()
        if state:
            yield from close_part()
            part += 1
        _put(fs, posixpath.join(d, "plan.json"),
             json.dumps({"v": PLAN_VERSION, "list": self.source.url, "identity": self.source.identity,
                         "format": self.source.format, "unit_size": self.unit_size, "parts": part,
                         "rows": self.rows, "image_rows": image_rows, "ignored": self.ignored,
                         "ignored_examples": self.ignored_examples}, indent=1).encode("utf-8"))


# ---------------------------------------------------------------------------------------------------- brace patterns


def _brace_path(plan_url: str, pattern: str) -> str:
    return f"{plan_url.rstrip('/')}/inputs/{_key({'v': PLAN_VERSION, 'input': pattern})}.json.gz"


def load_brace_plan(plan_url: str | None, pattern: str, storage_options: dict | None) -> list[str] | None:
    """The file URLs a brace pattern matched when it was last planned into this output, or None."""
    if not plan_url:
        return None
    from gq_pipeline.sources import get_fs

    fs, path = get_fs(_brace_path(plan_url, pattern), storage_options)
    try:
        blob = json.loads(gzip.decompress(fs.cat_file(path)))
    except FileNotFoundError:
        return None
    return blob["files"] if blob.get("input") == pattern else None


def save_brace_plan(plan_url: str | None, pattern: str, files: list[str], storage_options: dict | None) -> None:
    if not plan_url:
        return
    from gq_pipeline.sources import get_fs

    fs, path = get_fs(_brace_path(plan_url, pattern), storage_options)
    blob = json.dumps({"v": PLAN_VERSION, "input": pattern, "files": files}).encode("utf-8")
    _put(fs, path, gzip.compress(blob, mtime=0))
