"""Commit one finished unit: its shards, its error file and, last, its commit record (docs/token-format.md).

This is the single place where a unit becomes "done"; whoever produced the unit's rows (a worker that tokenized
it, or a plugin sink) calls :func:`commit_unit` with them.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from gq_pipeline.manifest import OutputStore
from gq_pipeline.records import ERROR_KINDS, FORMAT_VERSION
from gq_pipeline.sources import Unit
from gq_pipeline.writers import (ShardContext, build_error_table, build_token_table, parquet_bytes,
                                 split_rows, tar_bytes)

__all__ = ["CompleteUnit", "commit_unit"]


@dataclass
class CompleteUnit:
    unit: Unit
    rows: pa.Table  # sample rows (ok + error), sorted by idx, one per index
    info: dict[str, Any]
    model_s: float


def commit_unit(store: OutputStore, ctx: ShardContext, formats: tuple[str, ...], done: CompleteUnit
                ) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """Write a complete unit's files, then its commit record. Returns (record, token histogram of this unit), or
    (None, None) when the unit was already committed: records are created conditionally (``OutputStore.commit``),
    the first one stands and the caller must not count the unit as this run's."""
    unit = done.unit
    fp = ctx.model_fingerprint
    if done.rows is not None:
        ok, err = split_rows(done.rows)
    else:
        ok = err = None
    n_ok = ok.num_rows if ok is not None else 0
    n_err = err.num_rows if err is not None else 0
    shards = []
    passthrough_schema = None
    if done.info.get("passthrough_schema"):
        passthrough_schema = pa.ipc.read_schema(pa.py_buffer(done.info["passthrough_schema"]))
    hist = None
    if n_ok:
        if "parquet" in formats:
            data = parquet_bytes(build_token_table(ok, ctx, unit.unit_id, passthrough_schema))
            rel = store.shard_relpath("parquet", unit.unit_id, fp)
            store.put(rel, data)
            shards.append({"format": "parquet", "path": rel, "rows": n_ok, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
        if "webdataset" in formats:
            data = tar_bytes(ok, ctx, parquet_input=unit.kind == "parquet")
            rel = store.shard_relpath("webdataset", unit.unit_id, fp)
            store.put(rel, data)
            shards.append({"format": "webdataset", "path": rel, "rows": n_ok, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
        flat = np.frombuffer(b"".join(ok.column("tokens").to_pylist()), dtype=ctx.token_numpy)
        hist = np.bincount(flat.astype(np.int64), minlength=ctx.codebook_size)
    errors_file = None
    by_kind: dict[str, int] = {}
    if n_err:
        by_kind = dict(sorted(Counter(err.column("error").to_pylist()).items()))
        data = parquet_bytes(build_error_table(err, ctx, unit.unit_id))
        errors_file = store.shard_relpath("errors", unit.unit_id, fp)
        store.put(errors_file, data)
    assert set(by_kind) <= set(ERROR_KINDS), by_kind
    record = {"format_version": FORMAT_VERSION, "unit_id": unit.unit_id, "kind": unit.kind, "source": unit.source,
              "inputs": n_ok + n_err, "tokenized": n_ok, "errors": n_err, "errors_by_kind": by_kind,
              "shards": shards, "errors_file": errors_file, "formats": sorted(formats), "latents": ctx.latents,
              "model_fingerprint": fp, "codebook_fingerprint": ctx.codebook_fingerprint,
              "preprocess": ctx.preprocess}
    if unit.kind == "files":
        record["files"] = {"count": len(unit.files), "first": unit.files[0], "last": unit.files[-1]}
    if done.info.get("image_column"):
        record["image_column"] = done.info["image_column"]
    if not store.commit(record):
        return None, None
    return record, hist
