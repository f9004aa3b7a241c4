"""Add a format to a committed unit from the shard it already has: Parquet -> WebDataset tar, tar -> Parquet.

A rerun with another ``--format`` (``parquet`` then ``webdataset``, or ``parquet`` then ``both``) finds units whose
records lack the asked format. Their tokens, sizes, keys and pass-through data are all in the committed shard, so the
missing shard is rebuilt from it, with no model call and no read of the inputs, by the same code a fresh run writes
shards with (:func:`gq_pipeline.writers.build_shards`): the bytes are a fresh run's bytes.

Commit discipline is that of :mod:`gq_pipeline.commit`: the new shard is staged under ``.staging/<attempt>/``; the
record is then replaced, by a compare-and-swap on the version read at the start, with one that lists every format
the unit has (the commit point: nothing is ever removed from a record); then the staged file is published. A crash
before the replace leaves a staging folder that the next run or ``gq gc`` removes; a crash after it leaves a staged
file that the roll-forward publishes (it is in the record, with its sha256).

What cannot be converted is tokenized again (the caller's fallback), for a reason this module states:

* ``--latents`` asked for a unit committed without them: latents come from the model;
* tar -> Parquet of a Parquet input's unit whose tar holds its other columns: the tar keeps them as JSON (binary
  values left out, types lost), so the Parquet columns cannot be rebuilt;
* tar -> Parquet of a unit whose samples carry a ``.json`` member: the tar holds it parsed, and the Parquet ``json``
  column is the original text;
* a committed shard that is missing or whose bytes do not match its record.

(One case is not detectable: a tar input's ``.cls`` member that was not an integer leaves no ``.cls`` in the output
tar, and a null ``cls`` in a fresh run's Parquet; the Parquet rebuilt from the tar then has no ``cls`` column if no
sample of the unit had a valid one.)
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gq_model.storage import read_versioned, replace_if_match
from gq_pipeline.commit import discard_unit, publish_unit, record_bytes, stage_files
from gq_pipeline.manifest import OutputStore
from gq_pipeline.schema import schema_from_json
from gq_pipeline.shards import token_tar_groups
from gq_pipeline.writers import SHARD_FORMATS, TOKEN_SCHEMA, ShardContext, UnitFiles, build_shards

__all__ = ["ConversionImpossible", "missing_formats", "why_not_convertible", "convert_unit", "CONVERTED",
           "NEEDS_MODEL", "UNCHANGED"]

CONVERTED, NEEDS_MODEL, UNCHANGED = "converted", "needs_model", "unchanged"
_FIXED = ("key", "source", "member", "tokens", "token_shape", "width", "height", "latent", "latent_shape")
_TAR_PASSTHROUGH = ("txt", "json", "cls")


class ConversionImpossible(Exception):
    """This unit's missing format cannot be rebuilt from its committed shard (the message says why)."""


def missing_formats(record: dict[str, Any], formats) -> list[str]:
    have = set(record.get("formats", ()))
    return [f for f in SHARD_FORMATS if f in formats and f not in have]


def why_not_convertible(record: dict[str, Any], latents: bool) -> str | None:
    """Why a unit that lacks a format must go through the model again, when the record alone tells (else None)."""
    if latents and not record.get("latents"):
        return "--latents asked, but its committed shards hold no latents (they come from the model)"
    if record.get("tokenized") and not any(s.get("format") in SHARD_FORMATS for s in record.get("shards", ())):
        return "its record names no token shard to convert from"
    return None


def _rows_table(cols: dict[str, list]) -> pa.Table:
    """Rows in the worker's row layout (``TOKEN_SCHEMA`` fields the shard writers read)."""
    fields = [TOKEN_SCHEMA.field(n) for n in cols]
    return pa.table({n: pa.array(v, type=f.type) for (n, v), f in zip(cols.items(), fields)})


def _list_rows(col: pa.ChunkedArray, dtype) -> list[bytes]:
    arr = col.combine_chunks()
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    ends = np.cumsum(lengths)
    return [flat[e - n:e].tobytes() for n, e in zip(lengths, ends)]


def _shapes(col: pa.ChunkedArray) -> list[list[int]]:
    return [list(v) for v in col.to_pylist()]


def rows_from_parquet(data: bytes, unit_kind: str, ctx: ShardContext) -> pa.Table:
    """A committed Parquet token shard back to the rows the shard writers take (lossless: every value is there)."""
    t = pq.read_table(pa.BufferReader(data))
    n = t.num_rows
    shapes = _shapes(t.column("token_shape"))
    cols: dict[str, list] = {
        "key": t.column("key").to_pylist(), "source": t.column("source").to_pylist(),
        "member": [m or "" for m in t.column("member").to_pylist()],
        "width": t.column("width").to_pylist(), "height": t.column("height").to_pylist(),
        "tokens": _list_rows(t.column("tokens"), ctx.token_numpy),
        "tg": [s[0] for s in shapes], "th": [s[1] for s in shapes], "tw": [s[2] for s in shapes]}
    others = [c for c in t.column_names if c not in _FIXED]
    values = {c: t.column(c).to_pylist() for c in others}
    extras = []
    for i in range(n):
        if unit_kind == "parquet":  # a Parquet input's other columns: every one, nulls included (as read)
            e = {c: values[c][i] for c in others}
        else:  # a tar's pass-through members: only those the sample had
            e = {c: values[c][i] for c in others if c in _TAR_PASSTHROUGH and values[c][i] is not None}
        extras.append(pickle.dumps(e, protocol=5) if e else b"")
    cols["extra"] = extras
    if ctx.latents:
        lshapes = _shapes(t.column("latent_shape"))
        cols["latent"] = _list_rows(t.column("latent"), np.float16)
        cols["lc"], cols["lh"], cols["lw"] = ([s[k] for s in lshapes] for k in range(3))
    return _rows_table(cols)


def rows_from_tar(data: bytes, unit_kind: str, ctx: ShardContext) -> pa.Table:
    """A committed tar shard back to rows; :class:`ConversionImpossible` when the tar does not hold what the
    Parquet shard would (see the module doc)."""
    samples = {key: parts for _, key, parts in token_tar_groups(io.BytesIO(data))}
    cols: dict[str, list] = {k: [] for k in ("key", "source", "member", "width", "height", "tokens", "tg", "th",
                                             "tw", "extra")}
    if ctx.latents:
        cols.update(latent=[], lc=[], lh=[], lw=[])
    for key, parts in samples.items():
        meta = json.loads(parts["json"])
        if unit_kind == "parquet" and meta.get("columns"):
            raise ConversionImpossible("its tar keeps the Parquet input's other columns as JSON (binary values "
                                       "left out, types lost), so their Parquet columns cannot be rebuilt")
        if "json" in meta:
            raise ConversionImpossible("its samples' .json members are stored parsed in the tar, and the Parquet "
                                       "json column is their original text")
        tokens = np.load(io.BytesIO(parts["tokens.npy"]), allow_pickle=False)
        if tokens.dtype != np.dtype(ctx.token_numpy) or tokens.ndim != 3:
            raise ConversionImpossible(f"its tar's tokens are {tokens.dtype} {tokens.shape}, not this model's")
        e: dict[str, Any] = {}
        if "txt" in parts:
            e["txt"] = parts["txt"].decode("utf-8")
        if "cls" in parts:
            e["cls"] = int(parts["cls"].decode("ascii"))
        cols["key"].append(key)
        cols["source"].append(meta["source"])
        cols["member"].append(meta.get("member") or "")
        cols["width"].append(meta["width"])
        cols["height"].append(meta["height"])
        cols["tokens"].append(np.ascontiguousarray(tokens).tobytes())
        for c, v in zip(("tg", "th", "tw"), tokens.shape):
            cols[c].append(int(v))
        cols["extra"].append(pickle.dumps(e, protocol=5) if e else b"")
        if ctx.latents:
            lat = np.load(io.BytesIO(parts["latent.npy"]), allow_pickle=False).astype(np.float16, copy=False)
            cols["latent"].append(np.ascontiguousarray(lat).tobytes())
            for c, v in zip(("lc", "lh", "lw"), lat.shape):
                cols[c].append(int(v))
    return _rows_table(cols)


def _read_shard(store: OutputStore, entry: dict[str, Any]) -> bytes:
    try:
        data = store.fs.cat_file(store.path(entry["path"]))
    except FileNotFoundError:
        raise ConversionImpossible(f"its committed shard {entry['path']} is missing") from None
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ConversionImpossible(f"its committed shard {entry['path']} does not match the sha256 its record names")
    return data


def convert_unit(store: OutputStore, ctx: ShardContext, unit_id: str, formats) -> dict[str, Any]:
    """Write ``unit_id``'s shards for the ``formats`` its record lacks from the shard it has, then replace its
    record with one listing every format. Returns ``{"unit_id", "status", "record", "reason"}``: ``converted``;
    ``unchanged`` (the record has them now, or another run replaced it first: ``record`` is the current one);
    ``needs_model`` (impossible, ``reason`` says why: tokenize it again). Storage errors propagate."""
    path = store.path(store.layout.record(unit_id))
    got = read_versioned(store.fs, path)
    if got is None:
        return {"unit_id": unit_id, "status": NEEDS_MODEL, "record": None, "reason": "its record is gone"}
    blob, version = got
    try:
        record = json.loads(blob)
    except ValueError:
        return {"unit_id": unit_id, "status": NEEDS_MODEL, "record": None, "reason": "its record is damaged"}
    add = missing_formats(record, formats)
    if not add:
        return {"unit_id": unit_id, "status": UNCHANGED, "record": record, "reason": None}
    why = why_not_convertible(record, False)
    out = {"unit_id": unit_id, "status": NEEDS_MODEL, "record": record, "reason": why}
    if why:
        return out
    # The shard was written with the record's own settings: rebuild it with those, not this run's.
    # Its Parquet shard gets the columns the record declares (the output's one schema), as a fresh run's would.
    declared = schema_from_json(record["passthrough_schema"]) if record.get("passthrough_schema") else None
    wctx = replace(ctx, preprocess=record.get("preprocess", ctx.preprocess), latents=bool(record.get("latents")),
                   passthrough_schema=declared if declared is not None else ctx.passthrough_schema)
    shards = {s["format"]: s for s in record.get("shards", ())}
    built: list[tuple[str, bytes, dict[str, Any]]] = []
    if record.get("tokenized"):
        try:
            if "parquet" in shards:
                rows = rows_from_parquet(_read_shard(store, shards["parquet"]), record["kind"], wctx)
            else:
                rows = rows_from_tar(_read_shard(store, shards["webdataset"]), record["kind"], wctx)
        except ConversionImpossible as e:
            out["reason"] = str(e)
            return out
        if rows.num_rows != record["tokenized"]:
            out["reason"] = f"its committed shard holds {rows.num_rows} rows, its record {record['tokenized']}"
            return out
        built = build_shards(wctx, unit_id, record["kind"], add, rows, None)
    new = dict(record)
    new["shards"] = sorted(list(record.get("shards", ())) + [e for _, _, e in built],
                           key=lambda s: SHARD_FORMATS.index(s["format"]) if s["format"] in SHARD_FORMATS else 9)
    new["formats"] = sorted(set(record.get("formats", ())) | set(add))
    staged = stage_files(store, UnitFiles(unit_id, [(rel, data) for rel, data, _ in built], new, None))
    # The commit point. If it raises, the staging folder stays: whether or not the replace landed, the next run's
    # roll-forward (or gq gc) publishes or removes it by what the record then says.
    replaced = replace_if_match(store.fs, path, record_bytes(new), version)
    if replaced is None:  # another writer changed the record since we read it: theirs stands
        discard_unit(store, staged)
        return {"unit_id": unit_id, "status": UNCHANGED, "record": store.read_record(unit_id), "reason": None}
    publish_unit(store, staged)
    return {"unit_id": unit_id, "status": CONVERTED, "record": new, "reason": None, "added": add}
