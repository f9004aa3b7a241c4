"""One Parquet schema per output: the union of the pass-through columns of all its inputs (docs/token-format.md).

Units are committed independently and in parallel, so the union must be known before the first unit is written:

* image files and input-list rows have no pass-through columns;
* a WebDataset tar contributes the fixed set ``txt`` (string), ``json`` (string), ``cls`` (int64) — the members gq
  passes through — whether or not its samples have them (knowing which they have would need a scan of every tar);
* a Parquet file contributes its columns other than the image column, read from its footer at planning (one small
  read per Parquet input still to tokenize, 16 at a time), renamed ``input_<name>`` where they collide with ours.

Every token shard of the output is then written with all of these columns, null where a sample's input had none, so
``polars.read_parquet('OUT/parquet/*.parquet')``, HF ``load_dataset('OUT/parquet')`` and DuckDB read the folder
without options. The union is recorded in every commit record and the manifest (``passthrough_schema``). A rerun
whose inputs add columns the committed shards lack is refused (their files would need rewriting); one with fewer
keeps the committed schema, so a crash-rerun writes the same bytes.
"""
from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

import pyarrow as pa

from gq_pipeline.records import RESERVED_COLUMNS
from gq_pipeline.storage_errors import StorageReadError, TaggedFile, open_from_store

__all__ = ["TAR_PASSTHROUGH", "schema_to_json", "schema_from_json", "parquet_passthrough", "run_passthrough",
           "output_passthrough", "SchemaConflictError"]

# The members a WebDataset tar's samples pass through (gq_pipeline.sources._iter_tar), as Parquet columns.
TAR_PASSTHROUGH = pa.schema([("txt", pa.string()), ("json", pa.string()), ("cls", pa.int64())])
FOOTER_THREADS = 16


class SchemaConflictError(ValueError):
    """The run's pass-through columns cannot share one schema with each other or with the committed shards."""


def schema_to_json(schema: pa.Schema) -> dict[str, Any]:
    """JSON-able form: readable ``columns`` (name, Arrow type) and the exact schema (Arrow IPC, base64)."""
    return {"columns": [{"name": f.name, "type": str(f.type)} for f in schema],
            "arrow": base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")}


def schema_from_json(blob: dict[str, Any]) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(blob["arrow"])))


def _unify(schemas: list[pa.Schema], what: str) -> pa.Schema:
    """Union by name, first appearance first; a column whose types differ takes their common supertype."""
    if not schemas:
        return pa.schema([])
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise SchemaConflictError(f"{what}: pass-through columns with incompatible types ({e}); one output has "
                                  f"one schema, so tokenize these inputs into separate outputs") from None


def parquet_passthrough(schema: pa.Schema, image_column: str | None) -> pa.Schema | None:
    """A Parquet input's pass-through columns as the token shards store them, or None when it has no image column
    (it becomes an error record, contributing nothing)."""
    from gq_pipeline.sources import find_image_column

    try:
        col = find_image_column(schema, image_column)
    except ValueError:
        return None
    fields = [schema.field(n) for n in schema.names if n != col]
    return pa.schema([f.with_name("input_" + f.name if f.name in RESERVED_COLUMNS else f.name).remove_metadata()
                      for f in fields])


def _footer_schema(url: str, storage_options: dict | None) -> pa.Schema | None:
    import pyarrow.parquet as pq

    from gq_pipeline.sources import get_fs

    fs, path = get_fs(url, storage_options)
    try:
        with TaggedFile(open_from_store(fs, path)) as f:  # the store's failures come out as StorageReadError
            return pq.read_schema(f)
    except FileNotFoundError:  # gone since listing: its unit fails as before (UnitReadError), contributing nothing
        return None
    except StorageReadError as e:
        raise OSError(f"{url}: cannot read the Parquet footer while planning the output's schema "
                      f"({type(e).__name__}: {e}); nothing was tokenized, rerun when the store answers") from e
    except (pa.ArrowException, OSError):
        return None  # not Parquet / damaged footer: its unit becomes one `read` error record, no columns to lose


def run_passthrough(units: Iterable[Any], image_column: str | None, storage_options: dict | None) -> pa.Schema:
    """The union of the pass-through columns of ``units`` (``gq_pipeline.sources.Unit``): tar units add
    :data:`TAR_PASSTHROUGH`, Parquet units their footer's columns (read in parallel, in source order)."""
    units = list(units)
    schemas: list[pa.Schema] = []
    if any(u.kind == "tar" for u in units):
        schemas.append(TAR_PASSTHROUGH)
    parquet = sorted({u.source for u in units if u.kind == "parquet"})
    if parquet:
        with ThreadPoolExecutor(min(FOOTER_THREADS, len(parquet)), thread_name_prefix="gq-footer") as pool:
            footers = list(pool.map(lambda u: _footer_schema(u, storage_options), parquet))
        for footer in footers:
            if footer is not None:
                got = parquet_passthrough(footer, image_column)
                if got is not None and len(got):
                    schemas.append(got)
    return _unify(schemas, "the inputs of this run")


def output_passthrough(committed: pa.Schema | None, run: pa.Schema, url: str, has_records: bool) -> pa.Schema:
    """The schema this run writes: the committed one when the output has one and this run's columns fit into it
    (same names; types that cast to the committed ones), else this run's when the output is new. Refuses a run
    that would add columns to, or change types in, an output with committed shards."""
    if committed is None:
        if has_records and len(run):
            raise SchemaConflictError(
                f"{url} holds shards that declare no pass-through schema (written by a gq older than format version "
                f"2, or by GQShardSink), and this run's inputs have pass-through columns "
                f"({', '.join(run.names)}); write to a new --output")
        return run
    added = [n for n in run.names if n not in committed.names]
    changed = [n for n in run.names if n in committed.names and not _fits(run.field(n).type,
                                                                         committed.field(n).type)]
    if added or changed:
        what = []
        if added:
            what.append(f"adds column(s) {', '.join(added)}")
        if changed:
            what.append("changes the type of " + ", ".join(
                f"{n} ({committed.field(n).type} -> {run.field(n).type})" for n in changed))
        raise SchemaConflictError(
            f"this run {' and '.join(what)}, but the shards already committed under {url} have the pass-through "
            f"columns [{', '.join(f'{f.name}: {f.type}' for f in committed) or 'none'}]. Every Parquet shard of an "
            f"output has the same columns (so directory readers need no options), and committed shards are not "
            f"rewritten: tokenize these inputs into a new --output")
    return committed


def _fits(have: pa.DataType, into: pa.DataType) -> bool:
    if have == into or pa.types.is_null(have):
        return True
    try:
        return pa.unify_schemas([pa.schema([("c", into)]), pa.schema([("c", have)])],
                                promote_options="permissive").field("c").type == into
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False
