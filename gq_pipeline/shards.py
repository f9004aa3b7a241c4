"""Find, validate and read the token shards written by ``gq tokenize`` (docs/token-format.md).

Everything that touches shard *files* lives here, so that ``TokenDataset``, ``gq decode`` and ``gq inspect`` agree on
what a shard set is: which files belong to it (never temporaries), how many samples each holds (Parquet footers,
the wids index), which codebook made them (refuse a mix: the same integer means a different codeword in
another codebook), and how a run of rows becomes sample dicts (uint16 widened to int64, never sign-extended).

An output written by ``gq tokenize`` is read through its *commit set*: the records ``.gq/units/*.json`` (with the
manifest as a cache; version-1 outputs keep both at the root, :mod:`gq_pipeline.layout`) name exactly the committed
shards with their row counts, row groups, columns and token shapes, so listing costs one listing of the records
folder and one read of the manifest, no footer per shard, and a file no
record covers (a crash leftover, a planted copy) is never read. Folders without records (shards written by another
tool, a glob, a list of files) are described from metadata instead (Parquet footers, ``index.json``). Either way a
dataset can be split into exact sample ranges before any token is decoded.

File systems are re-created from ``(protocol, storage_options)`` in each process, never pickled or inherited through
``fork``: an s3fs instance copied into a DataLoader worker keeps a dead event loop and hangs.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gq_model.storage import is_local_protocol, options_for
from gq_pipeline import layout as _layout
from gq_pipeline.commitset import read_records, staged_files
from gq_pipeline.records import FORMAT_VERSION as _WRITTEN_FORMAT_VERSION
from gq_pipeline.records import READABLE_FORMAT_VERSIONS as _READABLE

__all__ = ["ShardError", "FingerprintMismatchError", "FSRef", "Shard", "ShardSet", "list_shards", "read_manifest",
           "read_error_tables", "read_parquet_rows", "iter_tar_rows", "tokens_to_int64", "FORMAT_VERSION",
           "BlockReader", "ShardCache", "is_transient", "row_token_shapes", "take_tar_rows"]

FORMAT_VERSION = str(_WRITTEN_FORMAT_VERSION)  # as stored in the gq.format_version metadata string
READABLE_VERSIONS = tuple(str(v) for v in _READABLE)
TOKEN_COLUMNS = ("tokens", "token_shape", "latent", "latent_shape")
_MODEL_FP = re.compile(r"^(?P<unit>.+)-(?P<fp>[0-9a-f]{16})$")


class ShardError(ValueError):
    """A shard (named in the message) cannot be read or does not follow the token format."""


class FingerprintMismatchError(ShardError):
    """The shards were made with different codebooks: their token ids are not comparable."""


# ---------------------------------------------------------------------------------------------- file systems
@dataclass(frozen=True)
class FSRef:
    """A picklable handle on an fsspec file system: the instance is looked up per process (fsspec caches per pid)."""

    protocol: str
    storage_options: tuple = ()

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.filesystem(self.protocol, **dict(self.storage_options))

    def url(self, path: str) -> str:
        return path if is_local_protocol(self.protocol) else f"{self.protocol}://{path}"

    def open(self, path: str, mode: str = "rb"):
        return self.fs.open(path, mode)


def _fsref(url: str, storage_options: dict | None) -> tuple[FSRef, str]:
    options = options_for(url, storage_options)
    fs, path = fsspec.core.url_to_fs(os.fspath(url), **options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return FSRef(protocol, tuple(sorted(options.items()))), path


def _is_temporary(path: str) -> bool:
    return ".tmp" in posixpath.basename(path) or "/_tmp/" in path or path.startswith("_tmp/")


# ---------------------------------------------------------------------------------------------- data model
@dataclass
class Shard:
    """One shard file and what its metadata says. ``row_groups`` holds rows per Parquet row group ((n,) for a tar)."""

    path: str
    format: str  # "parquet" | "webdataset"
    num_rows: int
    row_groups: tuple[int, ...]
    codebook_fingerprint: str | None = None
    model_fingerprint: str | None = None
    codebook_size: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    columns: tuple[str, ...] = ()
    token_shapes: tuple[tuple[int, int, int, int], ...] = ()  # (G, h, w, samples), when a commit record gives them

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


@dataclass
class ShardSet:
    """The shards under one URL, in name order, with the output root (where manifest.json and errors/ live)."""

    fsref: FSRef
    format: str
    shards: list[Shard]
    root: str | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)  # (url, message) of unreadable shards (strict=False)
    error_files: list[str] | None = None  # the committed error files (None: not read through a commit set)
    committed: bool = False  # True when listed from commit records
    # The output's declared pass-through columns (manifest/records "passthrough_schema", format version 2): every
    # Parquet shard has them, with nulls where an input had none. None when not declared (version 1, other tools).
    passthrough_schema: pa.Schema | None = None
    layout: Any = None  # gq_pipeline.layout.Layout of the output, when read through a commit set

    @property
    def num_samples(self) -> int:
        return sum(s.num_rows for s in self.shards)

    def url(self, shard: Shard) -> str:
        return self.fsref.url(shard.path)

    def fingerprint_groups(self) -> dict[str | None, list[Shard]]:
        groups: dict[str | None, list[Shard]] = {}
        for s in self.shards:
            groups.setdefault(s.codebook_fingerprint, []).append(s)
        return groups

    @property
    def fingerprint(self) -> str | None:
        """The one codebook fingerprint of the set (validated), or None when the shards do not record it."""
        return self.check_fingerprints()

    @property
    def codebook_size(self) -> int | None:
        sizes = {s.codebook_size for s in self.shards if s.codebook_size}
        return max(sizes) if sizes else None

    def check_fingerprints(self) -> str | None:
        """Raise :class:`FingerprintMismatchError` unless every shard comes from one codebook."""
        groups = self.fingerprint_groups()
        known = {k: v for k, v in groups.items() if k is not None}
        if len(known) > 1:
            desc = "; ".join(f"{fp}: {len(v)} shard(s), e.g. {self.url(v[0])}" for fp, v in sorted(known.items()))
            raise FingerprintMismatchError(
                f"the shards under this URL were made with {len(known)} different codebooks ({desc}). Token ids from "
                "different codebooks mean different codewords; read each codebook's shards as a separate dataset")
        if None in groups and known:
            bad = groups[None]
            raise FingerprintMismatchError(
                f"{len(bad)} shard(s) record no codebook fingerprint (e.g. {self.url(bad[0])}) while the others use "
                f"{next(iter(known))}; cannot prove they share one codebook")
        if None in groups:
            models = {s.model_fingerprint for s in self.shards}
            if len(models) > 1:
                raise FingerprintMismatchError(
                    "cannot verify that these shards share one codebook: they come from "
                    f"{len(models)} models ({', '.join(sorted(str(m) for m in models))}) and no manifest.json or "
                    "Parquet metadata gives their codebook fingerprints")
            return None
        return next(iter(known), None)

    def digest(self) -> str:
        """Identity of the shard set for resume checks: names and row layout, not the location (copies resume)."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.name}:{','.join(map(str, s.row_groups))};".encode())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- listing
def list_shards(url: str | list[str], format: str = "auto", storage_options: dict | None = None,
                strict: bool = True, footer_cache=None) -> ShardSet:
    """List and describe the shards under ``url`` (an output root, its ``parquet``/``webdataset`` folder, a glob, a
    file, ``index.json``, or a list of files). ``format`` is ``auto`` (Parquet when both exist), ``parquet`` or
    ``webdataset``. With ``strict=False`` unreadable shards go to ``problems`` instead of raising (for inspect).
    ``footer_cache``: a :class:`~gq_pipeline.footer_cache.FooterCache` through which Parquet footers are read (once
    per node) when no commit record describes the shards."""
    def describe_parquet(ref, paths, strict):
        if footer_cache is None:
            return _describe_parquet(ref, paths, strict)
        return footer_cache.describe(ref, paths, strict, _describe_parquet)

    if format not in ("auto", "parquet", "webdataset", "wds"):
        raise ValueError(f"format must be auto, parquet or webdataset, got {format!r}")
    format = "webdataset" if format == "wds" else format
    urls = [url] if isinstance(url, (str, os.PathLike)) else list(url)
    if not urls:
        raise FileNotFoundError("no shard URL given")
    fsref, first = _fsref(urls[0], storage_options)
    fs = fsref.fs
    if len(urls) == 1:
        committed = _from_commit_set(fsref, first, format, strict, describe_parquet)
        if committed is not None:
            return committed
    paths: list[str] = []
    root = None
    index_path = None
    for u in urls:
        ref, path = _fsref(u, storage_options)
        if ref.protocol != fsref.protocol:
            raise ValueError(f"all shard URLs must use one file system, got {fsref.protocol} and {ref.protocol}")
        found, fmt, r, idx = _discover(fs, path, format, u)
        format = fmt if format == "auto" else format
        if fmt != format:
            raise ValueError(f"{u}: holds {fmt} shards, expected {format}")
        paths += found
        root = root or r
        index_path = index_path or idx
    paths = sorted(dict.fromkeys(paths))
    if not paths:
        raise FileNotFoundError(f"no token shards (*.parquet or webdataset *.tar) under {', '.join(map(str, urls))}")
    if format == "parquet":
        shards, problems = describe_parquet(fsref, paths, strict)
    else:
        shards, problems = _describe_tars(fsref, paths, root, index_path, strict)
    return ShardSet(fsref, format, shards, root, problems)


def _from_commit_set(fsref: FSRef, path: str, format: str, strict: bool,
                     describe_parquet=None) -> ShardSet | None:
    """The committed shards of a gq output, when ``path`` is its root or its ``parquet/``/``webdataset/`` folder and
    it has ``units/``; else None (the caller lists files). Footers are read only for Parquet shards whose record
    predates row groups in records."""
    fs = fsref.fs
    path = path.rstrip("/")
    if any(c in path for c in "*?[") or path.endswith((".parquet", ".tar", ".json")):
        return None
    folder = posixpath.basename(path)
    root = _root_of(path)
    if folder in ("parquet", "webdataset"):
        if format not in ("auto", folder):
            raise ValueError(f"{fsref.url(path)}: holds {folder} shards, expected {format}")
        format = folder
    try:
        if not fs.isdir(path):
            return None
        manifest, lay, meta = _manifest_and_layout(fsref, root)
        if lay is None:
            return None
        records = read_records(fs, root, manifest or {}, layout=lay)
    except FileNotFoundError:
        return None
    if records is None:
        return None
    manifest = manifest or {}
    if format == "auto":
        have = {s["format"] for r in records.values() for s in r.get("shards", ())}
        format = "parquet" if "parquet" in have or not have else "webdataset"
    # Files of committed units that a crash left staged (record written, not yet published): read the staged copy.
    staged = {}
    has_staging = meta is None or posixpath.basename(lay.staging) in meta  # the .gq listing said (saves 3 requests)
    for attempt, rels in (staged_files(fs, root, lay) if has_staging else {}).items():
        for rel in rels:
            staged.setdefault((_layout.attempt_unit(attempt), rel), posixpath.join(root, lay.staged(attempt, rel)))

    def where(uid: str, rel: str) -> str:
        final = posixpath.join(root, rel)
        if (uid, rel) in staged and not fs.exists(final):
            return staged[(uid, rel)]
        return final

    shards: list[Shard] = []
    problems: list[tuple[str, str]] = []
    footer_paths: list[str] = []
    error_files: list[str] = []
    for uid in sorted(records):
        rec = records[uid]
        if rec.get("errors_file"):
            error_files.append(where(uid, rec["errors_file"]))
        entry = next((e for e in rec.get("shards", ()) if e["format"] == format and e.get("rows")), None)
        if entry is None:
            continue
        shard_path = where(uid, entry["path"])
        version = str(rec.get("format_version", manifest.get("format_version", FORMAT_VERSION)))
        if version not in READABLE_VERSIONS:
            err = ShardError(f"{fsref.url(shard_path)}: token format version {version} is not supported by this "
                             f"reader (versions {', '.join(READABLE_VERSIONS)}); upgrade gq")
            if strict:
                raise err
            problems.append((fsref.url(shard_path), str(err)))
            continue
        if format == "parquet" and not (entry.get("row_groups") and entry.get("columns")):
            footer_paths.append(shard_path)  # a record written before row groups were recorded
            continue
        model_fp = rec.get("model_fingerprint", manifest.get("model_fingerprint"))
        cb_fp = rec.get("codebook_fingerprint", manifest.get("codebook_fingerprint"))
        size = rec.get("codebook_size", manifest.get("codebook_size"))
        meta = {"gq.format_version": version, "gq.unit_id": uid}
        for k, v in (("gq.model_fingerprint", model_fp), ("gq.codebook_fingerprint", cb_fp),
                     ("gq.codebook_size", size)):
            if v is not None:
                meta[k] = str(v)
        if rec.get("preprocess") is not None:
            meta["gq.preprocess"] = json.dumps(rec["preprocess"], sort_keys=True)
        groups = tuple(int(n) for n in entry.get("row_groups") or (entry["rows"],))
        if sum(groups) != int(entry["rows"]):
            raise ShardError(f"{fsref.url(shard_path)}: commit record {uid} says {entry['rows']} rows but row groups "
                             f"{list(groups)}; the record is damaged")
        shards.append(Shard(shard_path, format, int(entry["rows"]), groups, cb_fp, model_fp,
                            int(size) if size else None, meta, tuple(entry.get("columns") or ()),
                            tuple(tuple(int(v) for v in t) for t in entry.get("token_shapes") or ())))
    if footer_paths:
        more, bad = (describe_parquet or _describe_parquet)(fsref, footer_paths, strict)
        shards += more
        problems += bad
    if not shards and not problems:
        raise FileNotFoundError(f"no committed {format} shards under {fsref.url(root)} ({len(records)} commit "
                                f"record(s) in units/)")
    shards.sort(key=lambda s: s.name)
    return ShardSet(fsref, format, shards, root, problems, error_files=sorted(error_files), committed=True,
                    passthrough_schema=declared_passthrough(records, manifest), layout=lay)


def declared_passthrough(records: dict[str, dict[str, Any]], manifest: dict | None) -> pa.Schema | None:
    """The output's one pass-through schema (format version 2 records it once per output, in the manifest and in
    every record), or None when the records do not declare one."""
    from gq_pipeline.schema import schema_from_json

    blob = (manifest or {}).get("passthrough_schema")
    if blob is None:
        blob = next((r["passthrough_schema"] for r in records.values() if r.get("passthrough_schema") is not None),
                    None)
    return schema_from_json(blob) if blob is not None else None


def _manifest_and_layout(fsref: FSRef, root: str) -> tuple[dict | None, Any, set[str] | None]:
    """(manifest or None, layout or None, names in ``.gq/`` or None) of the output at ``root``. One listing of
    ``.gq/`` tells a current output, whether it has a manifest and whether anything is staged; else the layout is
    detected from the root (version 1)."""
    fs = fsref.fs
    try:
        meta = {posixpath.basename(p.rstrip("/")) for p in fs.ls(posixpath.join(root, _layout.META), detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        meta = set()
    cur = _layout.CURRENT
    if posixpath.basename(cur.units) in meta or posixpath.basename(cur.manifest) in meta:
        m = _read_json(fsref, posixpath.join(root, cur.manifest)) if posixpath.basename(cur.manifest) in meta else None
        return m, cur, meta
    lay = _layout.detect(fs, root)
    if lay is None or lay is cur:
        return None, lay, meta
    return _read_json(fsref, posixpath.join(root, lay.manifest)), lay, None


def _root_of(directory: str) -> str:
    """The output root for a folder of shards: the parent of ``parquet/`` or ``webdataset/``, else the folder."""
    return posixpath.dirname(directory) if posixpath.basename(directory) in ("parquet", "webdataset") else directory


def _index_next_to(fs, directory: str) -> str | None:
    """The wids index for a folder of tars: ``<root>/.gq/webdataset-index.json`` (gq's layout; version 1 kept it at
    the root) or an ``index.json`` inside the folder (older gq versions, other tools)."""
    candidates = [posixpath.join(directory, "index.json")]
    if posixpath.basename(directory) == _layout.WEBDATASET:
        parent = posixpath.dirname(directory)
        candidates[:0] = [posixpath.join(parent, lay.wids_index) for lay in (_layout.V2, _layout.V1)]
    return next((c for c in candidates if fs.exists(c)), None)


def _discover(fs, path: str, format: str, url) -> tuple[list[str], str, str | None, str | None]:
    """(shard paths, format, output root, index.json path) for one URL."""
    path = path.rstrip("/")
    if any(c in path for c in "*?["):
        found = sorted(p for p in fs.glob(path) if not _is_temporary(p))
        if not found:
            return [], format, None, None
        fmt = _format_of(found, url)
        d = posixpath.dirname(found[0])
        return found, fmt, _root_of(d), _index_next_to(fs, d) if fmt == "webdataset" else None
    if fs.isfile(path):
        d = posixpath.dirname(path)
        if path.endswith(".json"):  # a wids index
            idx = json.loads(fs.cat_file(path))
            found = [posixpath.normpath(posixpath.join(d, e["url"])) for e in idx.get("shardlist", [])]
            return found, "webdataset", _root_of(d), path
        fmt = _format_of([path], url)
        return [path], fmt, _root_of(d), _index_next_to(fs, d) if fmt == "webdataset" else None
    if not fs.isdir(path):
        raise FileNotFoundError(f"{url}: no such file or directory")
    names = {posixpath.basename(p.rstrip("/")): p for p in fs.ls(path, detail=False)}
    for sub, fmt in (("parquet", "parquet"), ("webdataset", "webdataset")):
        if sub in names and format in ("auto", fmt) and fs.isdir(names[sub]):
            found = _children(fs, names[sub], ".parquet" if fmt == "parquet" else ".tar")
            if found:
                return found, fmt, path, _index_next_to(fs, names[sub]) if fmt == "webdataset" else None
    for ext, fmt in ((".parquet", "parquet"), (".tar", "webdataset")):
        if format in ("auto", fmt):
            found = _children(fs, path, ext)
            if found:
                return found, fmt, _root_of(path), _index_next_to(fs, path) if fmt == "webdataset" else None
    raise FileNotFoundError(f"no token shards ({'*.parquet or *.tar' if format == 'auto' else format}) under {url}")


def _children(fs, path: str, ext: str) -> list[str]:
    return sorted(p for p in fs.ls(path, detail=False) if p.endswith(ext) and not _is_temporary(p))


def _format_of(paths: list[str], url) -> str:
    kinds = {"parquet" if p.endswith(".parquet") else "webdataset" if p.endswith(".tar") else None for p in paths}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"{url}: expected only .parquet or only .tar shard files")
    return kinds.pop()


def _map(fn, items: list, remote: bool) -> list:
    if remote and len(items) > 4:
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(fn, items))
    return [fn(x) for x in items]


def _describe_parquet(fsref: FSRef, paths: list[str], strict: bool) -> tuple[list[Shard], list]:
    def one(path):
        try:
            with fsref.open(path) as f:
                md = pq.ParquetFile(f).metadata
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for damaged files
            return ShardError(f"{fsref.url(path)}: not a readable Parquet file ({type(e).__name__}: {e}); "
                              "the file is truncated or corrupted")
        meta = {k.decode(): v.decode() for k, v in (md.metadata or {}).items() if k.startswith(b"gq.")}
        columns = tuple(md.schema.to_arrow_schema().names)
        err = _check_meta(fsref.url(path), meta, columns)
        if err:
            return err
        return Shard(path, "parquet", md.num_rows, tuple(md.row_group(i).num_rows for i in range(md.num_row_groups)),
                     meta.get("gq.codebook_fingerprint"), meta.get("gq.model_fingerprint"),
                     int(meta["gq.codebook_size"]) if meta.get("gq.codebook_size") else None, meta, columns)

    return _collect(_map(one, paths, not is_local_protocol(fsref.protocol)), strict)


def _check_meta(url: str, meta: dict, columns: tuple) -> ShardError | None:
    if "gq.format_version" not in meta:
        return ShardError(f"{url}: not a gq token shard (no gq.format_version in the Parquet schema metadata)")
    if meta["gq.format_version"] not in READABLE_VERSIONS:
        return ShardError(f"{url}: token format version {meta['gq.format_version']} is not supported by this "
                          f"reader (versions {', '.join(READABLE_VERSIONS)}); upgrade gq")
    if "tokens" not in columns:
        return ShardError(f"{url}: no 'tokens' column")
    return None


def _collect(results: list, strict: bool) -> tuple[list[Shard], list]:
    shards, problems = [], []
    for r in results:
        if isinstance(r, ShardError):
            if strict:
                raise r
            problems.append((str(r).split(": ", 1)[0], str(r)))
        else:
            shards.append(r)
    return shards, problems


def _describe_tars(fsref: FSRef, paths: list[str], root: str | None, index_path: str | None,
                   strict: bool) -> tuple[list[Shard], list]:
    """Tars carry no metadata of their own: counts come from index.json (else a header scan), the codebook from
    manifest.json (same model fingerprint) or the sibling Parquet shard of the same unit."""
    fs = fsref.fs
    counts: dict[str, int] = {}
    if index_path:
        idx = json.loads(fs.cat_file(index_path))
        base = posixpath.dirname(index_path)
        counts = {posixpath.normpath(posixpath.join(base, e["url"])): int(e["nsamples"]) for e in idx["shardlist"]}
    manifest = read_manifest(fsref, root) if root else None

    def one(path):
        stem = posixpath.basename(path)[: -len(".tar")]
        m = _MODEL_FP.match(stem)
        model_fp = m.group("fp") if m else None
        n = counts.get(path)
        if n is None:
            try:
                n = sum(1 for _ in _iter_tar_groups(fsref, path, skip_data=True))
            except ShardError as e:
                return e
        cb_fp, size, meta = None, None, {}
        if manifest and model_fp and manifest.get("model_fingerprint") == model_fp:
            cb_fp, size = manifest.get("codebook_fingerprint"), manifest.get("codebook_size")
        elif root:
            sibling = posixpath.join(root, "parquet", stem + ".parquet")
            if fs.exists(sibling):
                try:
                    with fsref.open(sibling) as f:
                        raw = pq.ParquetFile(f).metadata.metadata or {}
                    meta = {k.decode(): v.decode() for k, v in raw.items() if k.startswith(b"gq.")}
                    cb_fp, size = meta.get("gq.codebook_fingerprint"), meta.get("gq.codebook_size")
                except Exception:  # noqa: BLE001 - a damaged sibling only loses the fingerprint
                    pass
        return Shard(path, "webdataset", n, (n,), cb_fp, model_fp, int(size) if size else None, meta)

    shards, problems = _collect(_map(one, paths, not is_local_protocol(fsref.protocol)), strict)
    if shards and all(s.codebook_fingerprint is None for s in shards) and \
            len({s.model_fingerprint for s in shards}) == 1:
        warnings.warn("these WebDataset shards record no codebook fingerprint (no manifest.json or Parquet sibling); "
                      "they come from a single model, so they are read without a codebook check", stacklevel=3)
    return shards, problems


def read_manifest(fsref: FSRef, root: str | None) -> dict | None:
    """The output's manifest (``.gq/manifest.json``, or ``manifest.json`` at the root of a version-1 output), or
    None when absent (e.g. shards copied without it)."""
    if not root:
        return None
    for lay in (_layout.V2, _layout.V1):
        m = _read_json(fsref, posixpath.join(root, lay.manifest))
        if m is not None:
            return m
    return None


def _read_json(fsref: FSRef, path: str) -> dict | None:
    fs = fsref.fs
    try:
        blob = fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    try:
        return json.loads(blob)
    except ValueError as e:
        raise ShardError(f"{fsref.url(path)}: not valid JSON ({e})") from e


def read_error_tables(fsref: FSRef, root: str | None, paths: list[str] | None = None
                      ) -> tuple[pa.Table | None, list[tuple[str, str]]]:
    """All error rows concatenated (None when there are none) and the files that could not be read: those of
    ``paths`` (a commit set's ``error_files``), else every error file under ``root`` (``.gq/errors/*.parquet``, or
    ``errors/`` in a version-1 output)."""
    fs = fsref.fs
    if paths is None:
        if not root:
            return None, []
        folder = next((p for p in (posixpath.join(root, lay.errors) for lay in (_layout.V2, _layout.V1))
                       if fs.isdir(p)), None)
        if folder is None:
            return None, []
        paths = _children(fs, folder, ".parquet")
    tables, problems = [], []
    for p in paths:
        try:
            with fsref.open(p) as f:
                tables.append(pq.read_table(f, columns=["key", "source", "member", "error", "message"]))
        except Exception as e:  # noqa: BLE001
            problems.append((fsref.url(p), f"{fsref.url(p)}: unreadable error table ({type(e).__name__}: {e})"))
    return (pa.concat_tables(tables, promote_options="permissive") if tables else None), problems


# ---------------------------------------------------------------------------------------------- decoding
def tokens_to_int64(arr: np.ndarray, where: str, codebook_size: int | None = None) -> np.ndarray:
    """Widen stored token ids to int64. uint16 is zero-extended (65535 stays 65535); an int16 column written by a
    foreign tool is reinterpreted as uint16, the only meaning a 16-bit id of a 65536-entry codebook can have."""
    if arr.dtype == np.int16:
        arr = arr.view(np.uint16)
    if arr.dtype.kind not in "iu":
        raise ShardError(f"{where}: token ids must be integers, got {arr.dtype}")
    out = arr.astype(np.int64, copy=False)
    if out.size:
        lo, hi = int(out.min()), int(out.max())
        if lo < 0 or (codebook_size and hi >= codebook_size):
            raise ShardError(f"{where}: token id out of range [0, {codebook_size or '?'}): min {lo}, max {hi}")
    return out


def _list_column(table: pa.Table, name: str, shape_name: str, where: str, dtype=None,
                 codebook_size: int | None = None) -> list[np.ndarray]:
    col = table.column(name).combine_chunks()
    if col.null_count:
        raise ShardError(f"{where}: {col.null_count} null value(s) in column {name!r}")
    flat = col.flatten().to_numpy(zero_copy_only=False)
    flat = tokens_to_int64(flat, where, codebook_size) if dtype is None else flat.astype(dtype)
    shapes = table.column(shape_name).to_pylist() if shape_name in table.column_names else None
    n = len(col)
    if pa.types.is_fixed_size_list(col.type):
        rows = flat.reshape(n, col.type.list_size) if n else flat.reshape(0, col.type.list_size)
    else:
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        rows = np.split(flat, np.cumsum(lengths)[:-1]) if n else []
    out = []
    for i in range(n):
        shape = shapes[i] if shapes else None
        r = rows[i]
        if shape is not None:
            if int(np.prod(shape)) != r.size:
                raise ShardError(f"{where}: row {i} has {r.size} values in {name!r} but {shape_name} is {shape}")
            r = r.reshape(shape)
        out.append(r)
    return out


def read_parquet_rows(table: pa.Table, where: str, *, latents: bool = False,
                      codebook_size: int | None = None) -> list[dict[str, Any]]:
    """Sample dicts (``tokens`` int64 [G,h,w], ``key``, pass-through fields, optional ``latent``) from a table slice.
    A null ``member`` (plain image files) becomes "" so the dicts collate with torch's default_collate; a null
    pass-through value (a column of the output's schema that this sample's input had not) stays None, as a tar
    sample without that member gives none, and the dataset's collate keeps it None."""
    tokens = _list_column(table, "tokens", "token_shape", where, codebook_size=codebook_size)
    lat = None
    if latents:
        if "latent" not in table.column_names:
            raise ShardError(f"{where}: no 'latent' column (tokenize with --latents to store latents)")
        lat = _list_column(table, "latent", "latent_shape", where, dtype=np.float32)
    passthrough = [c for c in table.column_names if c not in TOKEN_COLUMNS]
    strings = {c for c in passthrough if c == "member"}
    rows = table.select(passthrough).to_pylist()
    for i, row in enumerate(rows):
        for c in strings:
            if row[c] is None:
                row[c] = ""
        row["tokens"] = torch.from_numpy(tokens[i])
        if lat is not None:
            row["latent"] = torch.from_numpy(lat[i])
    return rows


def token_tar_groups(fileobj, read: Callable[[int], bool] = lambda i: True,
                     stop_after: int | None = None) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """The one reading of a token shard tar (ours: ``<key>.tokens.npy``, ``<key>.json``, ...): ``(index, key,
    {extension: bytes})`` per sample in tar order. Members of samples with ``read(index)`` false are passed over
    without reading their data (``b""``); the scan stops after sample ``stop_after``. Format errors propagate."""
    key, parts, index = None, {}, 0
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            d, base = posixpath.split(member.name)
            if base.startswith("."):
                continue
            stem, _, ext = base.partition(".")
            k = posixpath.join(d, stem) if d else stem
            if k != key:
                if key is not None:
                    yield index, key, parts
                    index += 1
                    if stop_after is not None and index > stop_after:
                        return
                key, parts = k, {}
            parts[ext] = tar.extractfile(member).read() if read(index) else b""
        if key is not None:
            yield index, key, parts


def _iter_tar_groups(fsref: FSRef, path: str, skip_data: bool = False, skip: int = 0,
                     wanted: frozenset[int] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a shard in tar order; the first ``skip`` samples are passed over
    undecoded, and with ``wanted`` only those sample indices are yielded (the scan stops after the last one);
    ``skip_data`` reads no member's data (counting samples)."""
    url = fsref.url(path)

    def keep(i: int) -> bool:
        return i >= skip and (wanted is None or i in wanted)

    try:
        with fsref.open(path) as f:
            read = (lambda i: False) if skip_data else keep
            for index, key, parts in token_tar_groups(f, read, max(wanted) if wanted else None):
                if keep(index):
                    yield key, parts
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ShardError(f"{url}: truncated or corrupted tar ({type(e).__name__}: {e})") from e


def iter_tar_rows(fsref: FSRef, shard: Shard, start: int, stop: int, *, latents: bool = False,
                  codebook_size: int | None = None) -> Iterator[dict[str, Any]]:
    """Sample dicts for samples ``[start, stop)`` of a tar, with the same fields as the Parquet reader."""
    url = fsref.url(shard.path)
    n = start
    for key, parts in _iter_tar_groups(fsref, shard.path, skip=start):
        if n >= stop:
            return
        yield _tar_sample(key, parts, f"{url} (sample {key})", latents, codebook_size)
        n += 1
    if n < stop:
        raise ShardError(f"{url}: ended after {n} samples but {shard.num_rows} were expected (index.json); "
                         "the file is truncated")


def take_tar_rows(fsref: FSRef, shard: Shard, rows: list[int], *, latents: bool = False,
                  codebook_size: int | None = None) -> list[dict[str, Any]]:
    """Sample dicts for the sorted, distinct sample indices ``rows`` of a tar (the others are scanned, not decoded)."""
    url = fsref.url(shard.path)
    if not rows:
        return []
    out = [_tar_sample(key, parts, f"{url} (sample {key})", latents, codebook_size)
           for key, parts in _iter_tar_groups(fsref, shard.path, wanted=frozenset(rows))]
    if len(out) < len(rows):
        raise ShardError(f"{url}: ended before sample {rows[-1]} but {shard.num_rows} samples were expected "
                         "(commit record or index.json); the file is truncated")
    return out


def _npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise ShardError(f"{where}: unreadable .npy ({e})") from e


def _tar_sample(key: str, parts: dict[str, bytes], where: str, latents: bool,
                codebook_size: int | None) -> dict[str, Any]:
    if "tokens.npy" not in parts:
        raise ShardError(f"{where}: no tokens.npy member (an incomplete sample: the file may be truncated)")
    sample: dict[str, Any] = {"key": key}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except ValueError as e:
            raise ShardError(f"{where}: invalid .json member ({e})") from e
        meta.pop("token_shape", None)
        columns = meta.pop("columns", None)  # Parquet inputs: their other columns, as the Parquet shard keeps them
        for k, v in meta.items():
            if k == "json" and not isinstance(v, str):
                v = json.dumps(v)
            sample[k] = "" if v is None and k in ("member", "source") else v
        if isinstance(columns, dict):
            for k, v in columns.items():
                sample[k if k not in sample else f"input_{k}"] = v
    for ext, data in parts.items():
        if ext in ("tokens.npy", "json", "latent.npy"):
            continue
        if ext == "txt":
            sample["txt"] = data.decode("utf-8")
        elif ext == "cls":
            sample["cls"] = int(data.decode().strip())
        else:
            sample[ext] = data
    sample["tokens"] = torch.from_numpy(tokens_to_int64(_npy(parts["tokens.npy"], where), where, codebook_size))
    if latents:
        if "latent.npy" not in parts:
            raise ShardError(f"{where}: no latent.npy member (tokenize with --latents to store latents)")
        sample["latent"] = torch.from_numpy(_npy(parts["latent.npy"], where).astype(np.float32))
    return sample


def row_token_shapes(shardset: ShardSet, shard: Shard) -> np.ndarray:
    """``[rows, 3]`` token shape ``(G, h, w)`` of every sample of ``shard`` in row order, for shape bucketing.

    Free when the commit record gives the shard a single shape; else the ``token_shape`` column alone is read
    (a few bytes per row), or a tar is scanned."""
    if len(shard.token_shapes) == 1:
        return np.tile(np.asarray(shard.token_shapes[0][:3], dtype=np.int64), (shard.num_rows, 1))
    url = shardset.url(shard)
    if shard.format == "parquet":
        try:
            with shardset.fsref.open(shard.path) as f:
                col = pq.read_table(f, columns=["token_shape"]).column("token_shape").combine_chunks()
        except Exception as e:  # noqa: BLE001
            raise ShardError(f"{url}: cannot read the token_shape column ({type(e).__name__}: {e})") from e
        out = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, 3)
    else:
        rows = take_tar_rows(shardset.fsref, shard, list(range(shard.num_rows)), codebook_size=shardset.codebook_size)
        out = np.array([tuple(r["tokens"].shape) for r in rows], dtype=np.int64).reshape(-1, 3)
    if len(out) != shard.num_rows:
        raise ShardError(f"{url}: {len(out)} token shapes for {shard.num_rows} rows")
    return out


def is_transient(exc: BaseException) -> bool:
    """Whether a read failure is worth retrying: connection resets, timeouts, throttling and 5xx answers, not a
    missing object, a denied one or damaged data."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        status = getattr(exc, "status", None) or getattr(exc, "code", None)
        if isinstance(status, int) and (status >= 500 or status in (408, 429)):
            return True
        if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in (
                "ClientOSError", "ClientPayloadError", "ServerDisconnectedError", "ServerTimeoutError",
                "ReadTimeoutError", "EndpointConnectionError", "ConnectionClosedError", "IncompleteRead"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class ShardCache:
    """Whole shard files copied to a local folder, shared by every worker and rank of a node, at most ``max_bytes``
    in all (least recently used files go first; the file just fetched always stays). Copies land under a temporary
    name and are renamed into place, so a reader never sees a partial file; gq shards are immutable (their names
    carry the unit id and model), so a cached copy never goes stale."""

    def __init__(self, directory: str, max_bytes: int | None = None):
        self.directory, self.max_bytes = os.path.abspath(directory), max_bytes
        os.makedirs(self.directory, exist_ok=True)

    def path_for(self, url: str) -> str:
        return os.path.join(self.directory, hashlib.sha256(url.encode()).hexdigest()[:16] + "-" +
                            posixpath.basename(url))

    def fetch(self, fsref: FSRef, remote: str) -> str:
        local = self.path_for(fsref.url(remote))
        if os.path.exists(local):
            os.utime(local)  # recently used
            return local
        tmp = f"{local}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            fsref.fs.get_file(remote, tmp)
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._evict(keep=local)
        return local

    def _evict(self, keep: str) -> None:
        if self.max_bytes is None:
            return
        files = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if ".tmp-" in name or path == keep:
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:  # another process evicted it
                continue
            files.append((st.st_mtime, st.st_size, path))
        total = sum(f[1] for f in files) + os.path.getsize(keep)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            try:
                os.remove(path)  # a reader that has it open keeps reading (POSIX)
            except FileNotFoundError:
                pass
            total -= size


class BlockReader:
    """Reads row ranges of one shard set in one process, keeping the last Parquet file open: consecutive blocks of a
    worker's plan usually come from the same shard, so each shard's footer is fetched once per pass.

    ``columns``: the pass-through fields to keep (None: all); ``key`` and the token columns are always read.
    ``retries``: attempts after a transient failure (with exponential back-off); ``cache``: a :class:`ShardCache` that
    remote shards are copied into and read from."""

    FOOTERS = 256  # Parquet footers kept per process: a shuffled epoch revisits each shard once per row group

    def __init__(self, shardset: ShardSet, latents: bool = False, columns: list[str] | None = None,
                 retries: int = 3, cache: ShardCache | None = None, backoff: float = 0.2):
        self.shardset, self.latents = shardset, latents
        self.columns = None if columns is None else set(columns) | {"key"}
        self.retries, self.cache, self.backoff = int(retries), cache, backoff
        self._open: tuple[str, Any, pq.ParquetFile] | None = None
        self._codebook_size = shardset.codebook_size
        self._footers: dict[str, Any] = {}
        self._group: tuple[str, int, pa.Table] | None = None  # the last row group read (pieces of it follow)
        self._local = FSRef("file")

    def close(self) -> None:
        self._group = None
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def _where(self, shard: Shard) -> tuple[FSRef, str]:
        """Where to read ``shard`` from: its cached copy when a cache is set and the shard is remote."""
        if self.cache is None or is_local_protocol(self.shardset.fsref.protocol):
            return self.shardset.fsref, shard.path
        return self._local, self.cache.fetch(self.shardset.fsref, shard.path)

    def _parquet(self, shard: Shard) -> pq.ParquetFile:
        if self._open is None or self._open[0] != shard.path:
            self.close()
            ref, path = self._where(shard)
            f = ref.open(path)
            try:
                # verifies page CRCs when the writer stored them (write_page_checksum=True): catches bit flips
                pf = pq.ParquetFile(f, page_checksum_verification=True, metadata=self._footers.get(shard.path))
            except Exception as e:  # noqa: BLE001
                f.close()
                raise ShardError(f"{self.shardset.url(shard)}: not a readable Parquet file ({e})") from e
            if len(self._footers) >= self.FOOTERS:
                self._footers.pop(next(iter(self._footers)))
            self._footers[shard.path] = pf.metadata
            self._open = (shard.path, f, pf)
        return self._open[2]

    def _row_group(self, shard: Shard, group: int) -> pa.Table:
        if self._group is not None and self._group[:2] == (shard.path, group):
            return self._group[2]
        columns = [c for c in shard.columns if (self.latents or c not in ("latent", "latent_shape"))
                   and (self.columns is None or c in self.columns or c in TOKEN_COLUMNS)]
        try:
            table = self._parquet(shard).read_row_group(group, columns=columns or None, use_threads=False)
        except ShardError:
            raise
        except Exception as e:  # noqa: BLE001 - damaged pages surface as OSError/ArrowInvalid/...
            self.close()
            raise ShardError(f"{self.shardset.url(shard)} (row group {group}): unreadable ({type(e).__name__}: "
                             f"{e}); the file is truncated or corrupted") from e
        self._group = (shard.path, group, table)
        return table

    def _retrying(self, what: str, fn):
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001
                if attempt == self.retries or not is_transient(e):
                    raise
                self.close()
                warnings.warn(f"{what}: transient read failure ({type(e).__name__}: {e}); retry {attempt + 1} of "
                              f"{self.retries}", stacklevel=3)
                time.sleep(self.backoff * 2 ** attempt)

    def take(self, shard: Shard, group: int, rows: list[int]) -> list[dict[str, Any]]:
        """Samples at the sorted, distinct ``rows`` of row group ``group`` (Parquet) or of the whole tar (0)."""
        return self._retrying(f"{self.shardset.url(shard)} (row group {group})",
                              lambda: self._take(shard, group, rows))

    def _take(self, shard: Shard, group: int, rows: list[int]) -> list[dict[str, Any]]:
        if shard.format == "webdataset":
            ref, path = self._where(shard)
            out = take_tar_rows(ref, replace(shard, path=path), rows, latents=self.latents,
                                codebook_size=self._codebook_size)
            if self.columns is not None:
                keep = self.columns | {"tokens", "latent"}
                out = [{k: v for k, v in r.items() if k in keep} for r in out]
            return out
        table = self._row_group(shard, group)
        if rows and rows[-1] >= table.num_rows:
            raise ShardError(f"{self.shardset.url(shard)} (row group {group}): {table.num_rows} rows, but the "
                             f"listing says row {rows[-1]} exists; the shard changed since it was listed")
        picked = table.slice(rows[0], 1) if len(rows) == 1 else table.take(pa.array(rows, pa.int64()))
        return read_parquet_rows(picked, f"{self.shardset.url(shard)} (row group {group})", latents=self.latents,
                                 codebook_size=self._codebook_size)
