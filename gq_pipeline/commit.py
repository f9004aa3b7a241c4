"""Commit one finished unit: stage its shards and error file, create its commit record, publish (docs/token-format.md).

This is the single place where a unit becomes "done"; whoever produced the unit's rows (a worker that tokenized
it, or a plugin sink) calls :func:`commit_unit` with them. The steps, and why in this order:

1. every file is written under ``.gq/staging/<attempt>/`` (:mod:`gq_pipeline.commitset`), where no plain reader of
   the output looks, so a crash here leaves nothing visible;
2. the record ``.gq/units/<unit_id>.json`` is created: the commit point (``OutputStore.commit``);
3. the staged files are published to their final names. A crash here leaves a committed unit whose files a
   roll-forward publishes (next run, ``gq gc``); gq's readers read the staged copy meanwhile.

If the record already exists (another run committed this unit first), this try's staged files are discarded and
the existing record is returned: the unit is counted once, with the other run's bytes.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gq_pipeline.commitset import new_attempt, publish, remove_tree, staged_relpath
from gq_pipeline.manifest import OutputStore
from gq_pipeline.records import ERROR_KINDS, FORMAT_VERSION
from gq_pipeline.schema import schema_to_json
from gq_pipeline.sources import Unit
from gq_pipeline.writers import (ShardContext, build_error_table, build_token_table, parquet_bytes,
                                 split_rows, tar_bytes)

__all__ = ["CompleteUnit", "commit_unit", "stage_unit", "commit_staged", "publish_unit", "StagedUnit", "build_shards",
           "record_bytes", "SHARD_FORMATS"]



@dataclass
class CompleteUnit:
    unit: Unit
    rows: pa.Table  # sample rows (ok + error), sorted by idx, one per index
    info: dict[str, Any]
    model_s: float


@dataclass
class StagedUnit:
    """A unit whose files are staged and whose record is built but not yet created."""

    attempt: str
    files: list[str]  # final relpaths, each staged under .gq/staging/<attempt>/
    record: dict[str, Any]
    hist: np.ndarray | None


def _row_groups(data: bytes) -> list[int]:
    """Rows per row group of Parquet bytes, from their own footer (recorded so that readers need not read it)."""
    md = pq.read_metadata(pa.BufferReader(data))
    return [md.row_group(i).num_rows for i in range(md.num_row_groups)]


def _token_shapes(ok: pa.Table) -> list[list[int]]:
    """``[[G, h, w, count], ...]`` of a unit's token grids (one entry unless ``--crop none``), sorted."""
    shapes = Counter(zip(*(ok.column(c).to_pylist() for c in ("tg", "th", "tw"))))
    return [[int(g), int(h), int(w), int(n)] for (g, h, w), n in sorted(shapes.items())]


SHARD_FORMATS = ("parquet", "webdataset")  # the order of a record's ``shards``


def build_shards(store: OutputStore, ctx: ShardContext, unit_id: str, unit_kind: str, formats, ok: pa.Table,
                 passthrough_schema: pa.Schema | None) -> list[tuple[str, bytes, dict[str, Any]]]:
    """``(relpath, bytes, record shard entry)`` of each requested format's token shard of one unit's ``ok`` rows.

    The one place shard bytes and their record entries are made: a unit's first commit and a later format
    conversion (:mod:`gq_pipeline.convert`) both call it, so a shard written from the other format's shard is the
    file a fresh run writes."""
    n_ok = ok.num_rows
    shapes = _token_shapes(ok)
    out = []
    for fmt in SHARD_FORMATS:
        if fmt not in formats:
            continue
        rel = store.shard_relpath(fmt, unit_id, ctx.model_fingerprint)
        if fmt == "parquet":
            table = build_token_table(ok, ctx, unit_id, passthrough_schema)
            data = parquet_bytes(table)
            entry = {"format": "parquet", "path": rel, "rows": n_ok, "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest(), "row_groups": _row_groups(data),
                     "columns": table.column_names, "token_shapes": shapes}
        else:
            data = tar_bytes(ok, ctx, parquet_input=unit_kind == "parquet")
            entry = {"format": "webdataset", "path": rel, "rows": n_ok, "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest(), "row_groups": [n_ok], "token_shapes": shapes}
        out.append((rel, data, entry))
    return out


def record_bytes(record: dict[str, Any]) -> bytes:
    """A commit record as stored (``OutputStore.commit`` writes the same bytes)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")


def stage_unit(store: OutputStore, ctx: ShardContext, formats: tuple[str, ...], done: CompleteUnit) -> StagedUnit:
    """Steps 1 and the record's content: write the unit's files under a fresh staging folder."""
    unit = done.unit
    fp = ctx.model_fingerprint
    attempt = new_attempt(unit.unit_id)
    if done.rows is not None:
        ok, err = split_rows(done.rows)
    else:
        ok = err = None
    n_ok = ok.num_rows if ok is not None else 0
    n_err = err.num_rows if err is not None else 0
    shards = []
    files: list[str] = []
    passthrough_schema = None
    if done.info.get("passthrough_schema"):
        passthrough_schema = pa.ipc.read_schema(pa.py_buffer(done.info["passthrough_schema"]))

    def stage(rel: str, data: bytes) -> None:
        if store.local:
            store.fs.makedirs(posixpath.dirname(store.path(staged_relpath(attempt, rel))), exist_ok=True)
        store.put(staged_relpath(attempt, rel), data)
        files.append(rel)

    hist = None
    if n_ok:
        for rel, data, entry in build_shards(store, ctx, unit.unit_id, unit.kind, formats, ok, passthrough_schema):
            stage(rel, data)
            shards.append(entry)
        flat = np.frombuffer(b"".join(ok.column("tokens").to_pylist()), dtype=ctx.token_numpy)
        hist = np.bincount(flat.astype(np.int64), minlength=ctx.codebook_size)
    errors_file = errors_sha = None
    by_kind: dict[str, int] = {}
    if n_err:
        by_kind = dict(sorted(Counter(err.column("error").to_pylist()).items()))
        data = parquet_bytes(build_error_table(err, ctx, unit.unit_id))
        errors_file = store.shard_relpath("errors", unit.unit_id, fp)
        errors_sha = hashlib.sha256(data).hexdigest()
        stage(errors_file, data)
    unknown = set(by_kind) - set(ERROR_KINDS)
    if unknown:  # a bug upstream (SampleError checks its kind): never commit a record readers cannot interpret
        raise RuntimeError(f"unit {unit.unit_id}: error kinds {sorted(unknown)} are not in ERROR_KINDS")
    record = {"format_version": FORMAT_VERSION, "unit_id": unit.unit_id, "kind": unit.kind, "source": unit.source,
              "inputs": n_ok + n_err, "tokenized": n_ok, "errors": n_err, "errors_by_kind": by_kind,
              "shards": shards, "errors_file": errors_file, "errors_sha256": errors_sha, "formats": sorted(formats),
              "latents": ctx.latents, "model_fingerprint": fp, "codebook_fingerprint": ctx.codebook_fingerprint,
              "codebook_size": ctx.codebook_size, "preprocess": ctx.preprocess}
    if ctx.passthrough_schema is not None:  # the output's one schema (gq_pipeline.schema), declared by every record
        record["passthrough_schema"] = schema_to_json(ctx.passthrough_schema)
    if unit.kind == "files":
        record["files"] = {"count": len(unit.files), "first": unit.files[0], "last": unit.files[-1]}
    if done.info.get("image_column"):
        record["image_column"] = done.info["image_column"]
    return StagedUnit(attempt, files, record, hist)


def publish_unit(store: OutputStore, staged: StagedUnit) -> None:
    """Step 3: move the staged files to their final names, then drop the staging folder."""
    for rel in staged.files:
        publish(store.fs, store.path(staged_relpath(staged.attempt, rel)), store.path(rel))
    remove_tree(store.fs, store.path(staged_relpath(staged.attempt, "")).rstrip("/"))


def discard_unit(store: OutputStore, staged: StagedUnit) -> None:
    remove_tree(store.fs, store.path(staged_relpath(staged.attempt, "")).rstrip("/"))


def commit_staged(store: OutputStore, staged: StagedUnit) -> bool:
    """Steps 2 and 3: create the record (the commit point), then publish. False when another run had created a
    different record of this unit first (``OutputStore.commit`` creates records conditionally): that one stands,
    this try's staged files are discarded and nothing of it is visible, and the caller must not count the unit.

    A byte-identical record is an earlier attempt of this same unit (a worker that died after its record, before
    publishing): names and bytes are deterministic, so this try publishes its files and the unit counts once, in
    place of the attempt whose outcome was lost."""
    if not store.commit(staged.record) and (store.read_record(staged.record["unit_id"])
                                            != json.loads(json.dumps(staged.record))):
        discard_unit(store, staged)
        return False
    publish_unit(store, staged)
    return True


def commit_unit(store: OutputStore, ctx: ShardContext, formats: tuple[str, ...], done: CompleteUnit
                ) -> tuple[dict[str, Any], np.ndarray | None]:
    """Stage a complete unit's files, create its commit record, publish the files.

    Returns (record, token histogram of this unit). When another run had already created the record, this try's
    files are discarded and (that record, None) is returned, so the other run's tokens are not counted twice."""
    staged = stage_unit(store, ctx, formats, done)
    if not commit_staged(store, staged):
        return json.loads(store.fs.cat_file(store.path(store.layout.record(done.unit.unit_id)))), None
    return staged.record, staged.hist
