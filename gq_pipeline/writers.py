"""One finished unit's rows -> its files of docs/token-format.md and its commit record, in memory, byte-for-byte
reproducibly. Nothing here does I/O: :mod:`gq_pipeline.commit` writes what :func:`unit_files` returns.

The rows are plain dicts with the fields of ``TOKEN_SCHEMA`` (made by ``preprocess.decode_sample``, filled with
tokens by the worker's ``ModelRunner``); a unit's rows become one Arrow table with :func:`rows_to_table`. Arrow,
never numpy string arrays, carries image bytes (numpy would strip trailing NUL bytes).

Everything is built in memory (a unit's tokens are ~2 KB per 256² image). No timestamps, hostnames or random ids go
into any file: the same rows give the same bytes, so a unit redone after a crash publishes identical files.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gq_pipeline.layout import CURRENT
from gq_pipeline.records import ERROR_KINDS, FORMAT_VERSION, ROW_ERROR, ROW_OK, tokens_fit_uint16
from gq_pipeline.schema import schema_to_json

if TYPE_CHECKING:
    from gq_pipeline.sources import Unit

__all__ = ["ShardContext", "TOKEN_SCHEMA", "rows_to_table", "CompleteUnit", "UnitFiles", "unit_files", "build_shards",
           "SHARD_FORMATS", "build_token_table", "build_error_table", "parquet_bytes", "tar_bytes", "split_rows"]

# The rows a worker builds for each sample (ok or error), one table per unit: the input of everything below.
_COMMON = [("unit", pa.string()), ("idx", pa.int64()), ("kind", pa.string()), ("key", pa.string()),
           ("source", pa.string()), ("member", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
           ("extra", pa.binary()), ("error", pa.string()), ("message", pa.string()), ("n", pa.int64()),
           ("info", pa.binary())]
TOKEN_SCHEMA = pa.schema(_COMMON + [("tokens", pa.binary()), ("tg", pa.int32()), ("th", pa.int32()),
                                    ("tw", pa.int32()), ("latent", pa.binary()), ("lc", pa.int32()),
                                    ("lh", pa.int32()), ("lw", pa.int32()), ("model_s", pa.float64())])
_DEFAULTS = {"unit": "", "idx": -1, "kind": ROW_OK, "key": "", "source": "", "member": "", "width": -1, "height": -1,
             "extra": b"", "error": "", "message": "", "n": 0, "info": b"", "tokens": b"", "tg": 0, "th": 0, "tw": 0,
             "latent": b"", "lc": 0, "lh": 0, "lw": 0, "model_s": 0.0}


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """A unit's sample rows (``decode_sample`` rows after ``ModelRunner.tokenize``) as one ``TOKEN_SCHEMA`` table."""
    return pa.Table.from_pydict({f.name: [r.get(f.name, _DEFAULTS[f.name]) for r in rows] for f in TOKEN_SCHEMA},
                                schema=TOKEN_SCHEMA)

_TAR_PASSTHROUGH = (("txt", pa.string()), ("json", pa.string()), ("cls", pa.int64()))  # = schema.TAR_PASSTHROUGH


@dataclass
class ShardContext:
    """Per-run facts every shard records (Parquet schema metadata / manifest)."""

    model_fingerprint: str
    codebook_fingerprint: str
    codebook_size: int
    group: int
    seed: int
    beta: float
    arch: str
    preprocess: dict[str, Any]
    latents: bool = False
    extra_metadata: dict[str, str] = field(default_factory=dict)
    # The output's one pass-through schema (gq_pipeline.schema): every token shard gets exactly these columns, null
    # where a sample's input had none. None (GQShardSink) keeps each unit's own columns.
    passthrough_schema: pa.Schema | None = None

    @property
    def token_type(self) -> pa.DataType:
        return pa.uint16() if tokens_fit_uint16(self.codebook_size) else pa.int32()

    @property
    def token_numpy(self):
        return np.uint16 if tokens_fit_uint16(self.codebook_size) else np.int32

    def metadata(self, unit_id: str) -> dict[str, str]:
        return {"gq.format_version": str(FORMAT_VERSION), "gq.model_fingerprint": self.model_fingerprint,
                "gq.codebook_fingerprint": self.codebook_fingerprint, "gq.codebook_size": str(self.codebook_size),
                "gq.group": str(self.group), "gq.seed": str(self.seed), "gq.beta": repr(float(self.beta)),
                "gq.arch": self.arch, "gq.preprocess": json.dumps(self.preprocess, sort_keys=True),
                "gq.unit_id": unit_id, **self.extra_metadata}


def _null_if_empty(values: list[str]) -> list[str | None]:
    return [v if v else None for v in values]


def _list_array(flat: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, type=value_type))


def _extras(rows: pa.Table) -> list[dict[str, Any]]:
    return [pickle.loads(b) if b else {} for b in rows.column("extra").to_pylist()]


def _passthrough_columns(extras: list[dict[str, Any]], passthrough_schema: pa.Schema | None,
                         output_schema: pa.Schema | None = None) -> list[tuple[str, pa.Array]]:
    if output_schema is not None:  # the output's union: every column, null where this unit's inputs have none
        unit = {f.name: f.type for f in passthrough_schema} if passthrough_schema is not None else {}
        lost = [n for n in unit if n not in output_schema.names] or \
            sorted({k for e in extras for k in e if e.get(k) is not None} - set(output_schema.names))
        if lost:  # never drop an input's values silently
            raise ValueError(f"this unit's input has pass-through column(s) {lost} that the output's schema "
                             f"({output_schema.names}) lacks: the file changed since the run was planned; rerun")
        cols = []
        for f in output_schema:
            values = [e.get(f.name) for e in extras]
            try:
                arr = pa.array(values, type=f.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
                if f.name not in unit:
                    raise
                arr = pa.array(values, type=unit[f.name]).cast(f.type)  # e.g. int16 input under an int64 union
            cols.append((f.name, arr))
        return cols
    if passthrough_schema is not None:  # Parquet input: keep the input's own types
        return [(f.name, pa.array([e.get(f.name) for e in extras], type=f.type)) for f in passthrough_schema]
    cols = []
    for name, typ in _TAR_PASSTHROUGH:  # WebDataset input: a column for each member type any sample has
        if any(name in e for e in extras):
            cols.append((name, pa.array([e.get(name) for e in extras], type=typ)))
    return cols


def build_token_table(rows: pa.Table, ctx: ShardContext, unit_id: str,
                      passthrough_schema: pa.Schema | None) -> pa.Table:
    """``ok`` rows (sorted by idx) -> the Parquet token table of docs/token-format.md. ``passthrough_schema`` is the
    unit's own pass-through columns (a Parquet input's); ``ctx.passthrough_schema``, when set, the output's."""
    n = rows.num_rows
    tok_np = ctx.token_numpy
    token_bytes = rows.column("tokens").to_pylist()
    flat = np.frombuffer(b"".join(token_bytes), dtype=tok_np)
    lengths = np.array([len(b) // np.dtype(tok_np).itemsize for b in token_bytes], dtype=np.int64)
    shape = np.stack([rows.column(c).to_numpy() for c in ("tg", "th", "tw")], axis=1).astype(np.int32)
    cols: list[tuple[str, pa.Array]] = [
        ("key", rows.column("key").combine_chunks()),
        ("source", rows.column("source").combine_chunks()),
        ("member", pa.array(_null_if_empty(rows.column("member").to_pylist()), pa.string())),
        ("tokens", _list_array(flat, lengths, ctx.token_type)),
        ("token_shape", _list_array(shape.reshape(-1), np.full(n, 3), pa.int32())),
        ("width", rows.column("width").combine_chunks()),
        ("height", rows.column("height").combine_chunks()),
    ]
    cols += _passthrough_columns(_extras(rows), passthrough_schema, ctx.passthrough_schema)
    if ctx.latents:
        lat_bytes = rows.column("latent").to_pylist()
        lflat = np.frombuffer(b"".join(lat_bytes), dtype=np.float16)
        llen = np.array([len(b) // 2 for b in lat_bytes], dtype=np.int64)
        lshape = np.stack([rows.column(c).to_numpy() for c in ("lc", "lh", "lw")], axis=1).astype(np.int32)
        cols += [("latent", _list_array(lflat, llen, pa.float16())),
                 ("latent_shape", _list_array(lshape.reshape(-1), np.full(n, 3), pa.int32()))]
    table = pa.table(dict(cols))
    return table.replace_schema_metadata(ctx.metadata(unit_id))


def build_error_table(rows: pa.Table, ctx: ShardContext, unit_id: str) -> pa.Table:
    return pa.table({"key": rows.column("key").combine_chunks(),
                     "source": rows.column("source").combine_chunks(),
                     "member": pa.array(_null_if_empty(rows.column("member").to_pylist()), pa.string()),
                     "error": rows.column("error").combine_chunks(),
                     "message": rows.column("message").combine_chunks()}).replace_schema_metadata(ctx.metadata(unit_id))


def parquet_bytes(table: pa.Table) -> bytes:
    """zstd; dictionary encoding only where values repeat (trying it on the token lists costs ~20% of write time
    and never pays off with 65536 codes)."""
    buf = io.BytesIO()
    dictionary = [c for c in ("source", "member", "error") if c in table.column_names]
    pq.write_table(table, buf, compression="zstd", row_group_size=1024, use_dictionary=dictionary)
    return buf.getvalue()


_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _npy(arr: np.ndarray) -> bytes:
    """``np.save`` bytes, with the header cached per (dtype, shape): every sample of a unit has the same one."""
    key = (arr.dtype.str, arr.shape)
    header = _NPY_HEADERS.get(key)
    if header is None:
        buf = io.BytesIO()
        np.save(buf, np.zeros(arr.shape, arr.dtype), allow_pickle=False)
        header = buf.getvalue()[: len(buf.getvalue()) - arr.nbytes]
        if len(_NPY_HEADERS) < 1024:
            _NPY_HEADERS[key] = header
    return header + np.ascontiguousarray(arr).tobytes()


def _header_base_sum() -> int:
    """Checksum of the constant header fields (mode, uid, gid, mtime, blank checksum, type, magic, devs)."""
    return sum(b"0000644\0" + b"0000000\0" * 2 + b"00000000000\0" + b" " * 8 + b"0" + b"ustar\x0000"
               + b"0000000\0" * 2)


_HEADER_BASE_SUM = _header_base_sum()


class _TarBuilder:
    """Minimal deterministic tar writer: ustar headers built directly, PAX via tarfile only for names over 100
    bytes. Why not tarfile for every member: its per-member cost is paid twice per image where a unit commits
    (the measurement: ``benchmarks/bench_tar_writer.py``, docs/benchmarks.md)."""

    def __init__(self):
        self.parts: list[bytes] = []

    def add(self, name: str, data: bytes) -> None:
        raw = name.encode("utf-8")
        if len(raw) > 100:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = \
                    len(data), 0, 0o644, 0, 0, "", ""
                tar.addfile(info, io.BytesIO(data))
            member = buf.getvalue()
            end = len(member)
            while end >= 512 and member[end - 512:end] == bytes(512):  # strip the end-of-archive blocks
                end -= 512
            self.parts.append(member[:end])
            return
        header = bytearray(512)
        header[0:len(raw)] = raw
        header[100:108] = b"0000644\0"
        header[108:116] = b"0000000\0"
        header[116:124] = b"0000000\0"
        header[124:136] = b"%011o\0" % len(data)
        header[136:148] = b"00000000000\0"
        header[148:156] = b" " * 8
        header[156:157] = b"0"
        header[257:265] = b"ustar\x0000"
        header[329:337] = b"0000000\0"
        header[337:345] = b"0000000\0"
        header[148:156] = b"%06o\0 " % (_HEADER_BASE_SUM + sum(raw) + sum(header[124:136]))
        self.parts.append(bytes(header))
        self.parts.append(data)
        pad = -len(data) % 512
        if pad:
            self.parts.append(bytes(pad))

    def getvalue(self) -> bytes:
        body = b"".join(self.parts) + bytes(1024)
        return body + bytes(-len(body) % 10240)  # tar's 10 KiB record size, like tarfile


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def tar_bytes(rows: pa.Table, ctx: ShardContext, parquet_input: bool) -> bytes:
    """``ok`` rows (sorted by idx) -> one WebDataset tar (deterministic headers: mtime 0, uid/gid 0, mode 0644)."""
    tok_np = ctx.token_numpy
    keys = rows.column("key").to_pylist()
    members = rows.column("member").to_pylist()
    sources = rows.column("source").to_pylist()
    widths, heights = rows.column("width").to_pylist(), rows.column("height").to_pylist()
    toks = rows.column("tokens").to_pylist()
    tshape = list(zip(*(rows.column(c).to_pylist() for c in ("tg", "th", "tw"))))
    extras = _extras(rows)
    lat = rows.column("latent").to_pylist() if ctx.latents else None
    lshape = list(zip(*(rows.column(c).to_pylist() for c in ("lc", "lh", "lw")))) if ctx.latents else None
    tar = _TarBuilder()
    add = tar.add
    for i, key in enumerate(keys):
        shape = tuple(int(v) for v in tshape[i])
        add(f"{key}.tokens.npy", _npy(np.frombuffer(toks[i], dtype=tok_np).reshape(shape)))
        meta: dict[str, Any] = {"source": sources[i], "member": members[i] or None, "width": widths[i],
                                "height": heights[i], "token_shape": list(shape)}
        e = extras[i]
        if parquet_input:
            meta["columns"] = {k: _jsonable(v) for k, v in e.items() if not isinstance(v, (bytes, bytearray))}
        elif "json" in e:
            try:
                meta["json"] = json.loads(e["json"])
            except ValueError:
                meta["json"] = e["json"]
        add(f"{key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8"))
        if not parquet_input and e.get("txt") is not None:
            add(f"{key}.txt", e["txt"].encode("utf-8"))
        if not parquet_input and e.get("cls") is not None:
            add(f"{key}.cls", str(int(e["cls"])).encode("ascii"))
        if lat is not None:
            add(f"{key}.latent.npy", _npy(np.frombuffer(lat[i], dtype=np.float16).reshape(lshape[i])))
    return tar.getvalue()


def split_rows(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(ok rows, error rows) of a unit's sample rows."""
    import pyarrow.compute as pc

    kinds = rows.column("kind")
    return rows.filter(pc.equal(kinds, ROW_OK)), rows.filter(pc.equal(kinds, ROW_ERROR))


# ------------------------------------------------------------------------------------------- one unit's output
SHARD_FORMATS = ("parquet", "webdataset")  # the order of a record's ``shards``


@dataclass
class CompleteUnit:
    """A unit with every sample's row: what the worker (or the plugin's sink) hands over to be written."""

    unit: "Unit"
    rows: pa.Table  # sample rows (ok + error, ``TOKEN_SCHEMA``), sorted by idx, one per index
    info: dict[str, Any]
    model_s: float


@dataclass
class UnitFiles:
    """Everything one unit commits, built in memory and not yet written: each file by its final relpath, the
    commit record that vouches for them (sha256 of each), and the unit's token histogram (for usage stats)."""

    unit_id: str
    files: list[tuple[str, bytes]]
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


def build_shards(ctx: ShardContext, unit_id: str, unit_kind: str, formats, ok: pa.Table,
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
        rel = CURRENT.shard(fmt, unit_id, ctx.model_fingerprint)
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


def unit_files(ctx: ShardContext, formats: tuple[str, ...], done: CompleteUnit) -> UnitFiles:
    """A complete unit's token shards (one per format), its error file and its commit record
    (docs/token-format.md, "Commit records")."""
    unit = done.unit
    fp = ctx.model_fingerprint
    ok, err = split_rows(done.rows) if done.rows is not None else (None, None)
    n_ok = ok.num_rows if ok is not None else 0
    n_err = err.num_rows if err is not None else 0
    files: list[tuple[str, bytes]] = []
    shards = []
    passthrough_schema = None
    if done.info.get("passthrough_schema"):
        passthrough_schema = pa.ipc.read_schema(pa.py_buffer(done.info["passthrough_schema"]))
    hist = None
    if n_ok:
        for rel, data, entry in build_shards(ctx, unit.unit_id, unit.kind, formats, ok, passthrough_schema):
            files.append((rel, data))
            shards.append(entry)
        flat = np.frombuffer(b"".join(ok.column("tokens").to_pylist()), dtype=ctx.token_numpy)
        hist = np.bincount(flat.astype(np.int64), minlength=ctx.codebook_size)
    errors_file = errors_sha = None
    by_kind: dict[str, int] = {}
    if n_err:
        by_kind = dict(sorted(Counter(err.column("error").to_pylist()).items()))
        data = parquet_bytes(build_error_table(err, ctx, unit.unit_id))
        errors_file = CURRENT.shard("errors", unit.unit_id, fp)
        errors_sha = hashlib.sha256(data).hexdigest()
        files.append((errors_file, data))
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
    return UnitFiles(unit.unit_id, files, record, hist)
