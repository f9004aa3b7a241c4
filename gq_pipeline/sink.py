"""``GQShardSink``: a Ray Data ``Datasink`` that writes ``GQTokenizer`` rows as gq token shards (docs/token-format.md).

``ds.write_parquet`` would store the tokens, but without the ``gq.*`` metadata, error files and manifest that
``TokenDataset``, ``gq inspect`` and ``gq decode`` rely on. This sink turns each write task's rows into one unit and
hands it to :func:`gq_pipeline.commit.commit_unit`, the same code ``gq tokenize`` commits with, so the output is
indistinguishable from a ``gq tokenize`` output.

Atomicity: write tasks commit their units into a staging store, ``OUTPUT/_tmp/sink-<id>/`` (readers never look under
``_tmp/``). Only ``on_write_complete``, on the driver, after every task succeeded, moves the shards into place, then
writes the commit records, the wids index and the manifest. A failed write (a task raising, rows of another model)
removes the staging store and leaves ``OUTPUT`` with no new shard.
"""
from __future__ import annotations

import hashlib
import pickle
import re
import uuid
from collections import Counter
from typing import Any, Iterable

import numpy as np

from gq_model.metrics.codebook_usage import run_usage
from gq_pipeline.commit import commit_unit, create_record
from gq_pipeline.layout import SINK_TMP
from gq_pipeline.manifest import SUBDIRS, IncompatibleOutputError, OutputStore, manifest_unit_entry
from gq_pipeline.plugin import LATENT_COLUMNS, OUTPUT_COLUMNS, GQTokenizer, parse_error
from gq_pipeline.preprocess import preprocess_settings
from gq_pipeline.records import ERROR_KINDS, FORMAT_VERSION, RESERVED_COLUMNS, make_key, make_unit_id
from gq_pipeline.writers import CompleteUnit, ShardContext

try:  # the sink is a Ray Data Datasink; importing this module without Ray gives a clear error at construction
    from ray.data import Datasink as _Base
except ImportError:  # pragma: no cover - Ray is a dependency of gq_pipeline
    _Base = object

__all__ = ["GQShardSink", "SINK_FORMATS", "DuplicateKeyError"]

SINK_FORMATS = {"parquet": ("parquet",), "webdataset": ("webdataset",), "both": ("parquet", "webdataset")}
UNIT_KIND = "datasink"
MODES = ("error", "append")
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
# Pass-through columns that keep their WebDataset meaning (tar members) when their type fits.
_WDS_TYPES = {"txt": "string", "json": "string", "cls": "int64"}
_IMAGE_ID = "__gq_image_id"  # stands in for a Ray tensor image column inside a write task


class DuplicateKeyError(ValueError):
    """Two rows of one write have the same sample key."""


class GQShardSink(_Base):
    """Ray Data Datasink for ``ds.map_batches(GQTokenizer, ...).write_datasink(GQShardSink(...))``.

    ``model``: the ``GQTokenizer`` instance (its model and settings are used as they are) or a model spec as
    ``GQTokenizer`` takes it, with ``image_size`` / ``crop`` / ``precision`` / ``max_pixels`` as the rows were
    tokenized. Rows whose ``gq_model`` is another model's fingerprint are refused (the write fails, nothing is
    published). ``key_column``: the sample key (kept as is when it is ``[A-Za-z0-9_-]``, otherwise made safe by
    ``make_key``); without it keys derive from ``source_column`` (default ``path`` when present), else from the
    image bytes or pixels, else from the tokens. ``mode="error"`` refuses an output that already holds units;
    ``"append"`` adds units to it (same model and settings only). ``rows_per_shard`` is the minimum number of rows
    per write task, i.e. per unit/shard.
    """

    def __init__(self, output: str, model: Any, format: str = "parquet", key_column: str | None = None, *,
                 source_column: str | None = None, image_column: str | None = None, image_size: int = 256,
                 crop: str = "center", precision: str = "fp32", max_pixels: int | None = None,
                 latents: bool = False, rows_per_shard: int = 1000, mode: str = "error",
                 storage_options: dict | None = None, config: str | None = None, preset: str | None = None):
        if format not in SINK_FORMATS:
            raise ValueError(f"format must be one of {sorted(SINK_FORMATS)}, got {format!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if _Base is object:  # pragma: no cover
            raise ImportError("GQShardSink needs ray[data]")
        if isinstance(model, GQTokenizer):
            tok = model
            gq, image_size, crop = tok.model, tok.image_size, tok.crop
            preprocess = dict(tok.preprocess_record)
            latents, image_column = tok.latents, image_column or tok.image_column
        else:
            from gq_model.loading import load_model
            from gq_pipeline.preprocess import DEFAULT_MAX_PIXELS

            gq = load_model(model, config=config, preset=preset, storage_options=storage_options)
            preprocess = preprocess_settings(gq, image_size, crop, precision, max_pixels or DEFAULT_MAX_PIXELS)
        c = gq.config
        self.ctx = ShardContext(model_fingerprint=gq.model_fingerprint, codebook_fingerprint=gq.fingerprint,
                                codebook_size=c.codebook_size, group=c.group, seed=c.seed, beta=c.beta, arch=c.arch,
                                preprocess=preprocess, latents=bool(latents))
        self.downsample_factor = gq.downsample_factor
        self.output, self.storage_options = output, storage_options
        self.formats = SINK_FORMATS[format]
        self.key_column, self.source_column = key_column, source_column
        self.image_column = image_column or "image"
        self.rows_per_shard, self.mode = int(rows_per_shard), mode
        store = OutputStore(output, storage_options)
        self.url, self.local = store.url, store.local
        # Staging names only: a fresh id per sink, so two sinks writing to one output never share a staging store.
        self.staging_rel = f"{SINK_TMP}/sink-{uuid.uuid4().hex[:12]}"
        self.result: dict[str, Any] | None = None  # the manifest summary, set by on_write_complete

    # ------------------------------------------------------------------ Ray Datasink interface
    @property
    def supports_distributed_writes(self) -> bool:
        return not self.local  # a local output is the driver's disk: write tasks run on the driver's node

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def get_name(self) -> str:
        return "GQShardSink"

    def on_write_start(self, schema=None) -> None:
        if schema is not None:
            missing = [c for c in OUTPUT_COLUMNS if c not in schema.names]
            if missing:
                raise ValueError(f"GQShardSink: the rows lack {missing}; tokenize them with GQTokenizer first "
                                 f"(ds.map_batches(GQTokenizer, ...))")
        store = OutputStore(self.output, self.storage_options)
        state = store.load()
        if state.records and self.mode == "error":
            raise FileExistsError(f"{self.url} already holds {len(state.records)} committed units; write to a new "
                                  f"output, or pass mode='append' to add to it")
        store.check_compatible(state, self.ctx)
        store.prepare()

    def write(self, blocks: Iterable[Any], ctx) -> dict[str, Any]:
        """One write task: its rows become one unit, committed into the staging store."""
        import pyarrow as pa
        from ray.data.block import BlockAccessor

        from gq_pipeline.sources import Unit

        tables = [self._normalize(BlockAccessor.for_block(b).to_arrow()) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"record": None, "hist": None, "keys": []}
        table = pa.concat_tables(tables, promote_options="permissive")
        rows, info, keys = self._unit_rows(table)
        unit_id = make_unit_id({"v": 1, "kind": UNIT_KIND,
                                "keys": hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()})
        unit = Unit(kind=UNIT_KIND, source=self.url, unit_id=unit_id)
        staging = OutputStore(f"{self.url}/{self.staging_rel}", self.storage_options)
        if staging.local:  # not prepare(): it would delete the temporaries of concurrent write tasks
            for sub in SUBDIRS:
                staging.fs.makedirs(staging.path(sub), exist_ok=True)
        record, hist = commit_unit(staging, self.ctx, self.formats, CompleteUnit(unit, rows, info, 0.0))
        sparse = None
        if hist is not None:
            nz = np.flatnonzero(hist)
            sparse = (nz.astype(np.int64), hist[nz].astype(np.int64))
        return {"record": record, "hist": sparse, "keys": keys}

    def on_write_complete(self, write_result) -> None:
        returns = [r for r in getattr(write_result, "write_returns", write_result) if r and r.get("record")]
        store = OutputStore(self.output, self.storage_options)
        try:
            seen: Counter = Counter(k for r in returns for k in r["keys"])
            dup = [k for k, n in seen.items() if n > 1]
            if dup:
                raise DuplicateKeyError(f"{len(dup)} sample keys occur in more than one write task (e.g. {dup[:3]}); "
                                        f"give GQShardSink a key_column with unique values")
            for r in sorted(returns, key=lambda r: r["record"]["unit_id"]):
                record = r["record"]
                for rel in [s["path"] for s in record["shards"]] + ([record["errors_file"]]
                                                                   if record["errors_file"] else []):
                    _move(store, f"{self.staging_rel}/{rel}", rel)
                create_record(store, record)
            self.result = self._write_manifest(store, returns)
        finally:
            self._remove_staging(store)

    def on_write_failed(self, error: Exception) -> None:
        self._remove_staging(OutputStore(self.output, self.storage_options))

    # ------------------------------------------------------------------ rows -> unit
    def _normalize(self, table):
        """Ray tensor columns -> plain Arrow, so blocks concatenate: Ray stores a numpy column as a fixed-shape
        tensor in one block and a variable-shaped one in another (e.g. where a row failed). Token columns become
        ``list<>``; a tensor image column (``read_images``) is replaced by its rows' content ids (for keys)."""
        import pyarrow as pa

        from gq_pipeline.plugin import _arrow_cells

        for name in table.column_names:
            col = table.column(name)
            if not isinstance(col.type, pa.ExtensionType):
                continue
            idx = table.column_names.index(name)
            cells = _arrow_cells(col)
            if name in ("tokens", "latent", "token_shape", "latent_shape"):
                dtype = {"tokens": self.ctx.token_numpy, "latent": np.float16}.get(name, np.int32)
                arr = pa.array([None if c is None else np.asarray(c, dtype).reshape(-1) for c in cells],
                               pa.list_(pa.from_numpy_dtype(np.dtype(dtype))))
                table = table.set_column(idx, name, arr)
            elif name == self.image_column:
                table = table.set_column(idx, _IMAGE_ID, pa.array([_content_id(c, None, None) for c in cells],
                                                                   pa.string()))
        return table

    def _unit_rows(self, table) -> tuple[Any, dict[str, Any], list[str]]:
        """A write task's Arrow rows -> (commit_unit's sample rows, unit info, keys), after the refusal checks."""
        import pyarrow as pa

        from gq_pipeline.writers import TOKEN_SCHEMA

        names = table.column_names
        missing = [c for c in OUTPUT_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"GQShardSink: the rows lack {missing}; tokenize them with GQTokenizer first")
        n = table.num_rows
        models = table.column("gq_model").to_pylist()
        other = sorted({m for m in models if m != self.ctx.model_fingerprint}, key=str)
        if other:
            raise IncompatibleOutputError(
                f"GQShardSink: {sum(m != self.ctx.model_fingerprint for m in models)} of {n} rows were tokenized "
                f"by model(s) {other}, but this sink writes tokens of model {self.ctx.model_fingerprint}; refusing "
                f"to mix them")
        errors = table.column("gq_error").to_pylist()
        tokens = _cells(table.column("tokens"))
        shapes = _cells(table.column("token_shape"))
        ok = [e is None for e in errors]
        self._check_grid(shapes, ok)
        tok_dtype = self.ctx.token_numpy
        widths = [int(v) if v is not None else -1 for v in table.column("gq_width").to_pylist()]
        heights = [int(v) if v is not None else -1 for v in table.column("gq_height").to_pylist()]
        keys = self._keys(table, tokens, errors)
        sources = self._sources(table)
        lat = _cells(table.column("latent")) if self.ctx.latents and "latent" in names else None
        lat_shapes = _cells(table.column("latent_shape")) if lat is not None else None
        if self.ctx.latents and lat is None:
            raise ValueError("GQShardSink(latents=True) needs the latent column: GQTokenizer(..., latents=True)")
        pass_names, pass_schema, extras = self._passthrough(table)
        cols: dict[str, list] = {f.name: [] for f in TOKEN_SCHEMA}
        for i in range(n):
            kind_msg = parse_error(errors[i]) if errors[i] is not None else None
            if kind_msg is not None and kind_msg[0] not in ERROR_KINDS:
                kind_msg = ("decode", errors[i])
            t = np.asarray(tokens[i], dtype=tok_dtype) if ok[i] else None
            shp = [int(v) for v in shapes[i]] if ok[i] else [0, 0, 0]
            row = {"unit": "", "idx": i, "kind": "ok" if ok[i] else "error", "key": keys[i], "source": sources[i],
                   "member": "", "width": widths[i], "height": heights[i],
                   "extra": pickle.dumps(extras[i], protocol=5) if extras else b"",
                   "error": kind_msg[0] if kind_msg else "", "message": kind_msg[1] if kind_msg else "", "n": 0,
                   "info": b"", "tokens": t.tobytes() if t is not None else b"", "tg": shp[0], "th": shp[1],
                   "tw": shp[2], "latent": b"", "lc": 0, "lh": 0, "lw": 0, "model_s": 0.0}
            if ok[i] and t.size != int(np.prod(shp)):
                raise ValueError(f"row {i}: {t.size} tokens do not fill token_shape {shp}")
            if lat is not None and ok[i]:
                row["latent"] = np.asarray(lat[i], np.float16).tobytes()
                row["lc"], row["lh"], row["lw"] = (int(v) for v in lat_shapes[i])
            for k, v in row.items():
                cols[k].append(v)
        rows = pa.Table.from_pydict(cols, schema=TOKEN_SCHEMA)
        info = {"passthrough_schema": pass_schema.serialize().to_pybytes() if pass_names else None}
        return rows, info, keys

    def _check_grid(self, shapes: list, ok: list[bool]) -> None:
        """Rows tokenized at another image size than this sink records would make the metadata lie."""
        if self.ctx.preprocess.get("crop") != "center":
            return
        want = self.ctx.preprocess["image_size"] // self.downsample_factor
        for s, good in zip(shapes, ok):
            if good and (int(s[1]), int(s[2])) != (want, want):
                raise IncompatibleOutputError(
                    f"GQShardSink: rows with token grid {int(s[1])}x{int(s[2])}, but this sink records image_size "
                    f"{self.ctx.preprocess['image_size']} (grid {want}x{want}); pass the GQTokenizer itself as the "
                    f"sink's model, or the same image_size")

    def _keys(self, table, tokens: list, errors: list) -> list[str]:
        names = table.column_names
        if self.key_column is not None:
            if self.key_column not in names:
                raise KeyError(f"GQShardSink: no key column {self.key_column!r} (columns: {names})")
            values = table.column(self.key_column).to_pylist()
            if any(v is None for v in values):
                raise ValueError(f"GQShardSink: key column {self.key_column!r} has null values")
            keys = [str(v) if _SAFE_KEY.match(str(v)) else make_key(str(v), str(v)) for v in values]
            dup = [k for k, c in Counter(keys).items() if c > 1]
            if dup:
                raise DuplicateKeyError(f"GQShardSink: key column {self.key_column!r} repeats values, e.g. {dup[:3]}")
            return keys
        source = self._source_name(names)
        if source is not None:
            base = [make_key(str(p), str(p)) for p in table.column(source).to_pylist()]
        else:
            base = [make_key(_content_id(v, tokens[i], errors[i]), "sample")
                    for i, v in enumerate(self._image_values(table))]
        # The same path or content twice in one write: number the repeats (#2, #3 as for repeated tar keys).
        seen: Counter = Counter()
        keys = []
        for k in base:
            seen[k] += 1
            keys.append(k if seen[k] == 1 else f"{k}-{seen[k]}")
        return keys

    def _source_name(self, names: list[str]) -> str | None:
        if self.source_column is not None:
            if self.source_column not in names:
                raise KeyError(f"GQShardSink: no source column {self.source_column!r} (columns: {names})")
            return self.source_column
        return "path" if "path" in names else None

    def _sources(self, table) -> list[str]:
        name = self._source_name(table.column_names)
        if name is None:
            return [""] * table.num_rows
        return ["" if v is None else str(v) for v in table.column(name).to_pylist()]

    def _image_values(self, table) -> list[Any]:
        if _IMAGE_ID in table.column_names:
            return table.column(_IMAGE_ID).to_pylist()
        if self.image_column in table.column_names:
            from gq_pipeline.plugin import _arrow_cells

            return _arrow_cells(table.column(self.image_column))
        return [None] * table.num_rows

    def _passthrough(self, table):
        """Columns that travel into the shards: everything but the image, the key/source columns and ours; Ray
        tensor columns are left out (they are pixels, not metadata)."""
        import pyarrow as pa

        skip = set(OUTPUT_COLUMNS) | set(LATENT_COLUMNS) | {self.image_column, _IMAGE_ID, self.key_column,
                                                            self._source_name(table.column_names)}
        fields = []
        for f in table.schema:
            if f.name in skip or isinstance(f.type, pa.ExtensionType):
                continue
            name = f.name
            if name in RESERVED_COLUMNS and str(f.type) != _WDS_TYPES.get(name):
                name = "input_" + name
            fields.append((f.name, f.with_name(name)))
        if not fields:
            return [], None, []
        schema = pa.schema([f for _, f in fields])
        columns = {new.name: table.column(old).to_pylist() for old, new in fields}
        extras = [{k: v[i] for k, v in columns.items()} for i in range(table.num_rows)]
        return [new.name for _, new in fields], schema, extras

    # ------------------------------------------------------------------ publishing
    def _write_manifest(self, store: OutputStore, returns: list[dict[str, Any]]) -> dict[str, Any]:
        state = store.load()
        records = [state.records[k] for k in sorted(state.records)]
        hist = np.zeros(self.ctx.codebook_size, np.int64)
        for r in returns:
            if r["hist"] is not None:
                hist[r["hist"][0]] += r["hist"][1]
        by_kind: Counter = Counter()
        for r in records:
            by_kind.update(r.get("errors_by_kind", {}))
        c = self.ctx
        wids = store.write_wids_index(records)
        manifest = {"format_version": FORMAT_VERSION, "model_fingerprint": c.model_fingerprint,
                    "codebook_fingerprint": c.codebook_fingerprint, "codebook_size": c.codebook_size,
                    "group": c.group, "seed": c.seed, "beta": c.beta, "arch": c.arch, "preprocess": c.preprocess,
                    "inputs": sum(r["inputs"] for r in records), "tokenized": sum(r["tokenized"] for r in records),
                    "errors": sum(r["errors"] for r in records), "errors_by_kind": dict(sorted(by_kind.items())),
                    "units": [manifest_unit_entry(r) for r in records], "wids_index": wids,
                    "writer": "GQShardSink", "codebook_usage": run_usage(hist),
                    "this_run": {"units": len(returns), "inputs": sum(r["record"]["inputs"] for r in returns)}}
        store.write_manifest(manifest)
        return manifest

    def _remove_staging(self, store: OutputStore) -> None:
        path = store.path(self.staging_rel)
        try:
            if store.fs.exists(path):
                store.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        if store.local:  # leave no empty tmp folder behind
            try:
                store.fs.rmdir(store.path(SINK_TMP))
            except OSError:
                pass


def _move(store: OutputStore, src_rel: str, dst_rel: str) -> None:
    """Publish one staged file: a rename on local disks, a server-side copy then delete on object stores (each
    object appears whole)."""
    import os

    src, dst = store.path(src_rel), store.path(dst_rel)
    if store.local:
        os.makedirs(os.path.dirname(dst), exist_ok=True)  # parquet/, webdataset/ appear with their first shard
        os.replace(src, dst)
    else:
        store.fs.copy(src, dst)
        store.fs.rm_file(src)


def _cells(col) -> list:
    """A tokens/shape column in any form Ray gives it (list<>, Ray tensor extension) -> per-row arrays/None."""
    from gq_pipeline.plugin import _arrow_cells

    return _arrow_cells(col)


def _content_id(image: Any, tokens: Any, error: str | None) -> str:
    """A row's identity when it has no key or path: its image bytes or pixels, else its tokens or error."""
    if isinstance(image, str) and image.startswith("content:"):  # already an id (see GQShardSink._normalize)
        return image
    h = hashlib.sha256()
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray, memoryview)):
        h.update(b"bytes:" + bytes(image))
    elif isinstance(image, str):
        h.update(b"path:" + image.encode())
    elif isinstance(image, np.ndarray):
        h.update(f"array:{image.dtype}:{image.shape}:".encode() + np.ascontiguousarray(image).tobytes())
    elif tokens is not None and error is None:
        h.update(b"tokens:" + np.ascontiguousarray(tokens).tobytes())
    else:
        h.update(b"error:" + str(error).encode())
    return "content:" + h.hexdigest()


