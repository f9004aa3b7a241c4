"""Inputs on the workers: read a unit's samples (Ray read tasks), and what planning and reading share.

A *unit* (:class:`Unit`) is the smallest thing that is committed or redone: one WebDataset tar, one Parquet file, a
run of image files of one directory, or a run of rows of an ``--input-list`` (read back from the plan persisted under
the output, :mod:`gq_pipeline.plan_store`). The driver cuts inputs into units (:mod:`gq_pipeline.planning`); this
module turns a unit's bytes into :class:`RawSample` records. It also holds what both halves need: ``Unit``,
:func:`get_fs` and :func:`to_url` (the URL spelling keys and unit ids are made of), the extension tables
(:func:`image_extensions`, :func:`file_extension`), the Parquet image column (:func:`find_image_column`) and the one
reading of which tar members form a sample (:func:`group_tar_members`, which the training data's tar index uses too).
Planning imports this module, never the reverse, so a read task loads no listing machinery.

Reading never lets one file or sample fail its unit: a name that is not UTF-8, a symlink loop, a FIFO, a Parquet
file without an image column, a tar member that is a link or named ``..``, a tar cut anywhere (inside a header too)
and a Parquet path reference outside the file's own tree each become error records. Listed names are read one by
one by name, never through fsspec's glob expansion (``br[1].jpg`` is a file name), remote reads with a timeout
(``READ_TIMEOUT_S``).
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import gzip
import os
import posixpath
import stat
import tarfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import fsspec

from gq_model.storage import is_local_fs, url_to_fs
from gq_pipeline.storage_errors import StorageReadError, TaggedFile, open_from_store
from gq_pipeline.records import (IMAGE_EXTENSIONS, PARQUET_EXTENSIONS, RESERVED_COLUMNS, TAR_EXTENSIONS, SampleError,
                                 is_utf8, make_key, make_unit_id, printable)

__all__ = ["Unit", "RawSample", "UnitInfo", "UnitReadError", "iter_samples", "get_fs", "to_url", "find_image_column",
           "image_extensions", "file_extension", "in_process_reads", "TarGroup", "group_tar_members", "image_member"]

_IMAGE_COLUMN_NAMES = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes")
_FILE_CHUNK = 16  # files fetched at once (concurrent GETs on object stores)
READ_TIMEOUT_S = 300.0  # one remote read that answers nothing for this long fails its unit (retried), never hangs it


class UnitReadError(Exception):
    """The unit could not be read for a reason that may go away (network, permissions): it is not committed, so a
    rerun retries it. Format problems (a corrupt tar) are *not* this: they become ``read`` error records."""


_IN_PROCESS: contextvars.ContextVar[bool] = contextvars.ContextVar("gq_in_process_listing", default=False)


@contextlib.contextmanager
def in_process_reads() -> Iterator[None]:
    """Within this block :func:`get_fs` allows ``memory://``: the caller reads every file in this process
    (``planning.list_input_files(in_process=True)``: training data, ``gq eval``)."""
    token = _IN_PROCESS.set(True)
    try:
        yield
    finally:
        _IN_PROCESS.reset(token)


def get_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for a URL; ``memory://`` is refused because Ray workers cannot see the driver's memory."""
    if (url.startswith("memory://") or url.startswith("memory:")) and not _IN_PROCESS.get():
        raise ValueError(f"{url}: memory:// filesystems live inside one process, and the Ray workers that read and "
                         f"write run in other processes; use a local path, file://, s3://, gs:// or http(s)://")
    return url_to_fs(url, storage_options)


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Canonical URL with protocol (``file:///abs/p``, ``s3://b/k``): the identity used in keys and unit ids."""
    return fs.unstrip_protocol(path)


def file_extension(name: str) -> str:
    """The extension gq classifies a file by: ``tar.gz`` and the shard extensions whole, else the last suffix."""
    low = name.lower()
    for ext in TAR_EXTENSIONS + PARQUET_EXTENSIONS:
        if low.endswith("." + ext):
            return ext
    return low.rsplit(".", 1)[-1] if "." in low else ""


@dataclass(frozen=True)
class Unit:
    """One work unit. ``source`` is the tar/parquet URL, or the directory URL of a ``files`` unit whose ``files``
    are names inside it; ``prefix`` is that directory relative to the input root (only makes keys readable).

    A ``list`` unit is ``count`` image rows of an input list from row ``start`` (``source`` is the list's URL): its
    URLs are row group ``group`` of the persisted plan file ``part`` and hash to ``digest``
    (:mod:`gq_pipeline.plan_store`)."""

    kind: str
    source: str
    files: tuple[str, ...] = ()
    prefix: str = ""
    unit_id: str = field(default="", compare=False)
    start: int = 0
    count: int = 0
    digest: str = ""
    part: str = ""
    group: int = 0

    def __post_init__(self):
        if not self.unit_id:
            object.__setattr__(self, "unit_id", make_unit_id(self.description()))

    def description(self) -> dict[str, Any]:
        if self.kind == "list":  # the rows' content, not where the list lives: ids survive a moved or copied list
            return {"v": 1, "kind": "list", "start": self.start, "count": self.count, "sha256": self.digest}
        d: dict[str, Any] = {"v": 1, "kind": self.kind, "source": self.source}
        if self.kind == "files":
            d["files"] = list(self.files)
        return d

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind, "source": self.source, "files": list(self.files), "prefix": self.prefix,
             "unit_id": self.unit_id}
        if self.kind == "list":
            d |= {"start": self.start, "count": self.count, "digest": self.digest, "part": self.part,
                  "group": self.group}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Unit":
        return cls(kind=d["kind"], source=d["source"], files=tuple(d.get("files", ())), prefix=d.get("prefix", ""),
                   unit_id=d.get("unit_id", ""), start=d.get("start", 0), count=d.get("count", 0),
                   digest=d.get("digest", ""), part=d.get("part", ""), group=d.get("group", 0))

    @property
    def expected_inputs(self) -> int | None:
        """Known before reading for file and list units; tars and parquet files report their count when read."""
        if self.kind == "files":
            return len(self.files)
        return self.count if self.kind == "list" else None


def image_extensions(extra: tuple[str, ...] | list[str] | None = None) -> tuple[str, ...]:
    """:data:`IMAGE_EXTENSIONS` plus ``extra`` (``--extensions``; leading dots and case ignored)."""
    out = list(IMAGE_EXTENSIONS)
    for e in extra or ():
        e = str(e).strip().lstrip(".").lower()
        if not e or "/" in e:
            raise ValueError(f"--extensions: {e!r} is not a file extension")
        if e in TAR_EXTENSIONS + PARQUET_EXTENSIONS:
            raise ValueError(f"--extensions: .{e} files are read as shards, not as images")
        if e not in out:
            out.append(e)
    return tuple(out)




# ---------------------------------------------------------------------------------------------------- reading


@dataclass
class RawSample:
    """One input sample before decoding: image bytes (or an error), plus pass-through values."""

    idx: int
    key: str
    member: str | None
    source: str = ""  # the file's URL for plain files, the tar/parquet URL otherwise
    data: bytes | None = None
    extra: dict[str, Any] | None = None
    error: SampleError | None = None


@dataclass
class UnitInfo:
    """What a read task learns about its unit besides samples (sent to the driver with the unit's end row)."""

    passthrough_schema: bytes | None = None  # serialized pyarrow schema of parquet pass-through columns
    image_column: str | None = None


def iter_samples(unit: Unit, info: UnitInfo, storage_options: dict | None = None,
                 image_column: str | None = None, *, allow_external_refs: tuple[str, ...] | list[str] = (),
                 extensions: tuple[str, ...] | list[str] | None = None) -> Iterator[RawSample]:
    """Every sample of ``unit`` in a deterministic order with consecutive ``idx`` from 0.

    ``allow_external_refs``: URL prefixes a Parquet ``path`` reference may reach besides the Parquet file's own
    directory tree (local, HTTP) or bucket (object stores); ``("*",)`` allows any. ``extensions``: image extensions
    besides the default ones (chooses a tar sample's image member). Raises :class:`UnitReadError` for failures that
    make the unit retryable.
    """
    if unit.kind == "files":
        yield from _iter_files(unit, storage_options)
    elif unit.kind == "tar":
        yield from _iter_tar(unit, storage_options, image_extensions(extensions))
    elif unit.kind == "parquet":
        yield from _iter_parquet(unit, info, storage_options, image_column, tuple(allow_external_refs))
    elif unit.kind == "list":
        yield from _iter_list(unit, storage_options)
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


class NotRegularFile(OSError):
    """A listed name that is a FIFO, socket or device: reading it would block or never end."""


# Errors that the same file gives on every run: recorded for that file instead of failing (and retrying) its unit.
_PERMANENT_ERRNOS = frozenset({errno.ELOOP, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ENXIO})


def _cat_each(fs: fsspec.AbstractFileSystem, paths: list[str], what: str) -> dict[str, Any]:
    """Each path's bytes, or the exception reading it raised.

    Every path is read by its name with ``cat_file``, never through ``fs.cat``, which glob-expands names holding
    ``[``, ``*`` or ``?`` (``br[1].jpg`` is a file, not a pattern). Local files are opened non-blocking and must be
    regular files (a FIFO named ``x.jpg`` gives :class:`NotRegularFile` instead of blocking); remote reads run
    concurrently, each bounded by ``READ_TIMEOUT_S`` (a ``TimeoutError``). A failure of the request as a whole is
    transient: :class:`UnitReadError`."""
    try:
        if is_local_fs(fs):
            return {p: _read_local(p) for p in paths}
        if getattr(fs, "async_impl", False) and hasattr(fs, "_cat_file"):
            return _cat_async(fs, paths)
        return _cat_threads(fs, paths)
    except Exception as e:
        raise UnitReadError(f"{what}: {type(e).__name__}: {e}") from e


def _read_local(path: str) -> bytes | BaseException:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        return e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return NotRegularFile(errno.ENXIO, "not a regular file (a FIFO, socket or device)", path)
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            return f.read()
    except OSError as e:
        return e
    finally:
        if fd >= 0:
            os.close(fd)


def _cat_async(fs, paths: list[str]) -> dict[str, Any]:
    async def all_of_them():
        gate = asyncio.Semaphore(_FILE_CHUNK)

        async def one(p):
            async with gate:
                try:
                    return await asyncio.wait_for(fs._cat_file(p), READ_TIMEOUT_S)
                except asyncio.TimeoutError:
                    return TimeoutError(f"no answer within {READ_TIMEOUT_S:g} s")
                except Exception as e:
                    return e

        return await asyncio.gather(*(one(p) for p in paths))

    from fsspec.asyn import sync

    return dict(zip(paths, sync(fs.loop, all_of_them)))


def _cat_threads(fs, paths: list[str]) -> dict[str, Any]:
    pool = ThreadPoolExecutor(max(1, min(_FILE_CHUNK, len(paths))), thread_name_prefix="gq-read")
    try:
        futures = {p: pool.submit(fs.cat_file, p) for p in paths}
        deadline = time.monotonic() + READ_TIMEOUT_S
        out: dict[str, Any] = {}
        for p, fut in futures.items():
            try:
                out[p] = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                out[p] = TimeoutError(f"no answer within {READ_TIMEOUT_S:g} s")
            except Exception as e:
                out[p] = e
        return out
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _file_outcome(data: Any, where: str, missing: str) -> bytes | SampleError:
    """A read answer as the sample's bytes or its error record; raises :class:`UnitReadError` when a rerun may read
    it (network, permissions, timeouts). ``missing`` is the message for a file that does not exist."""
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if data is None or isinstance(data, FileNotFoundError):
        return SampleError("read", missing)
    if isinstance(data, NotRegularFile):
        return SampleError("unsupported", f"{where}: not a regular file (a FIFO, socket or device)")
    if isinstance(data, OSError) and data.errno in _PERMANENT_ERRNOS:
        return SampleError("read", f"{where}: {os.strerror(data.errno)}")
    raise UnitReadError(f"reading {where}: {type(data).__name__}: {data}")


def _not_utf8(name: str) -> SampleError:
    return SampleError("unsupported", f"file name {printable(name)!r} is not valid UTF-8: keys, sources and "
                                      f"error files are UTF-8 text; rename the file to tokenize it")


def _iter_files(unit: Unit, storage_options: dict | None) -> Iterator[RawSample]:
    fs, dir_path = get_fs(unit.source, storage_options)
    base = unit.source.rstrip("/")
    for start in range(0, len(unit.files), _FILE_CHUNK):
        names = unit.files[start:start + _FILE_CHUNK]
        paths = [posixpath.join(dir_path, n) for n in names]
        got = _cat_each(fs, [p for n, p in zip(names, paths) if is_utf8(n)], f"reading {base}")
        for i, (name, p) in enumerate(zip(names, paths)):
            readable = f"{unit.prefix}/{name}" if unit.prefix else name
            key = make_key(f"{base}/{name}", readable)
            s = RawSample(start + i, key, None, printable(f"{base}/{name}"))
            if not is_utf8(name):
                s.error = _not_utf8(name)
            else:
                outcome = _file_outcome(got.get(p), f"{base}/{name}", f"{name}: file disappeared after listing")
                if isinstance(outcome, SampleError):
                    s.error = outcome
                else:
                    s.data = outcome
            yield s


def _list_unit_urls(unit: Unit, storage_options: dict | None) -> list[str]:
    """A list unit's URLs: its row group of the persisted plan, checked against the unit's count and digest (a plan
    file that changed since planning must not pass another set of files under this unit's id)."""
    import pyarrow.parquet as pq

    from gq_pipeline.plan_store import unit_digest

    fs, path = get_fs(unit.part, storage_options)
    try:
        with fs.open(path, "rb") as f:
            urls = pq.ParquetFile(f).read_row_group(unit.group, columns=["url"]).column(0).to_pylist()
    except Exception as e:
        raise UnitReadError(f"reading the plan of {unit.source} rows {unit.start}+{unit.count} ({unit.part} row "
                            f"group {unit.group}): {type(e).__name__}: {e}") from e
    if len(urls) != unit.count or unit_digest(urls) != unit.digest:
        raise UnitReadError(f"{unit.part} row group {unit.group} no longer holds the {unit.count} URLs planned for "
                            f"rows {unit.start}+ of {unit.source}; rerun with --relist to plan the list again")
    return urls


def _iter_list(unit: Unit, storage_options: dict | None) -> Iterator[RawSample]:
    """Every row of a list unit, in list order: the file's bytes, or a ``read`` error record when it does not exist
    (as a folder's file that disappeared). Other failures (network, permissions) fail the unit, to be retried."""
    urls = _list_unit_urls(unit, storage_options)
    here = unit.source.rsplit("/", 1)[0] + "/"  # keys read as the path relative to the list where they can
    by_proto: dict[str, fsspec.AbstractFileSystem] = {}
    for start in range(0, len(urls), _FILE_CHUNK):
        chunk = urls[start:start + _FILE_CHUNK]
        groups: dict[str, list[tuple[int, str]]] = {}
        for i, url in enumerate(chunk):
            proto = url.split("://", 1)[0]
            if proto not in by_proto:
                by_proto[proto] = get_fs(url, storage_options)[0]
            groups.setdefault(proto, []).append((i, by_proto[proto]._strip_protocol(url)))
        got: list[Any] = [None] * len(chunk)
        for proto, items in groups.items():
            answers = _cat_each(by_proto[proto], [p for _, p in items], f"reading rows of {unit.source}")
            for i, p in items:
                got[i] = answers[p]
        for i, (url, data) in enumerate(zip(chunk, got)):
            readable = url[len(here):] if url.startswith(here) else url.split("://", 1)[-1]
            s = RawSample(start + i, make_key(url, readable), None, url)
            outcome = _file_outcome(data, f"{url} (row {unit.start + start + i} of {unit.source})",
                                    f"{url}: the listed file does not exist")
            if isinstance(outcome, SampleError):
                s.error = outcome
            else:
                s.data = outcome
            yield s


_TAR_FORMAT_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename, extension = the rest (lowercased)."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(d, stem) if d else stem), ext.lower()


class _EndMarkerWatch:
    """Remembers the last 512-byte header block ``tarfile`` read: Python's ``tarfile`` takes a short or missing
    header for the end of the archive, so an archive cut at or inside a header would lose its tail silently. Only a
    block of zeros (the end-of-archive marker) is a real end."""

    def __init__(self):
        self.last: bytes | None = None

    def tarinfo(self) -> type:
        watch = self

        class WatchedTarInfo(tarfile.TarInfo):
            @classmethod
            def frombuf(cls, buf, encoding, errors):
                watch.last = bytes(buf)
                return super().frombuf(buf, encoding, errors)

        return WatchedTarInfo

    @property
    def ended_cleanly(self) -> bool:
        return self.last is not None and len(self.last) == tarfile.BLOCKSIZE and not self.last.strip(b"\0")


_LINK = object()  # a link member's place in a sample: streamed tars cannot resolve it, so the sample is recorded


@dataclass
class TarGroup:
    """One WebDataset sample of a tar: its key prefix and ``{extension: take(member)}``; or, with ``bad_name``
    set, a member whose name no sample key can be made from (``..``, ``.``, empty), which must become a record.
    ``final`` marks the group completed by the end of the archive (the caller may first check that end was real)."""

    prefix: str
    members: dict[str, Any]
    bad_name: str | None = None
    final: bool = False


def group_tar_members(tar: tarfile.TarFile, take: Callable[[tarfile.TarInfo], Any]) -> Iterator[TarGroup]:
    """The one reading of "which members of a tar form a sample", for the tokenizer and the training data alike.

    WebDataset's rule: consecutive members sharing the path up to the first dot of the basename are one sample;
    a repeated extension starts a new sample (the same key twice). Folders, hidden names and names without an
    extension are skipped. ``take(member)`` is called while ``tar`` is positioned on the member, so a streamed
    tar (``mode="r|*"``) can read its bytes there; a random-access indexer can keep ``member.offset_data``."""
    current: str | None = None
    members: dict[str, Any] = {}
    for m in tar:
        if m.isdir():
            continue
        base = posixpath.basename(m.name.rstrip("/"))
        if base in ("..", ".") or not base:
            if current is not None:
                yield TarGroup(current, members)
                current, members = None, {}
            yield TarGroup("", {}, bad_name=m.name)
            continue
        prefix, ext = _split_member(m.name)
        if base.startswith(".") or not ext:
            continue
        if prefix != current or ext in members:
            if current is not None:
                yield TarGroup(current, members)
            current, members = prefix, {}
        members[ext] = take(m)
    if current is not None:
        yield TarGroup(current, members, final=True)


def image_member(members: dict[str, Any], image_exts: tuple[str, ...] = IMAGE_EXTENSIONS) -> str | None:
    """The extension of a sample's image: the first of ``image_exts`` present (``x.jpg`` over ``x.seg.png``)."""
    return next((e for e in image_exts if e in members), None)


def _iter_tar(unit: Unit, storage_options: dict | None,
              image_exts: tuple[str, ...] = IMAGE_EXTENSIONS) -> Iterator[RawSample]:
    fs, path = get_fs(unit.source, storage_options)
    tar_stem = posixpath.basename(path).split(".", 1)[0]
    seen: dict[str, int] = {}
    idx = 0

    def new_sample(prefix: str, member: str) -> RawSample:
        nonlocal idx
        n = seen.get(prefix, 0)
        seen[prefix] = n + 1
        identity = f"{unit.source}#{prefix}" + (f"#{n + 1}" if n else "")
        s = RawSample(idx, make_key(identity, f"{tar_stem}/{prefix}" + (f"_{n + 1}" if n else "")),
                      printable(member), unit.source)
        idx += 1
        return s

    def emit(prefix: str, members: dict[str, Any]) -> RawSample:
        s = new_sample(prefix, prefix)
        links = sorted(e for e, v in members.items() if v is _LINK)
        if not is_utf8(prefix):
            s.error = _not_utf8(prefix)
            return s
        if links:
            s.error = SampleError("unsupported", f"members {', '.join(prefix + '.' + e for e in links)} are links "
                                                 f"(symlink or hardlink), which a streamed tar cannot follow")
            return s
        image_ext = image_member(members, image_exts)
        extra: dict[str, Any] = {}
        if "txt" in members:
            extra["txt"] = members["txt"].decode("utf-8", errors="replace")
        if "json" in members:
            extra["json"] = members["json"].decode("utf-8", errors="replace")
        if "cls" in members:
            try:
                extra["cls"] = int(members["cls"].decode("ascii", errors="replace").strip())
            except ValueError:
                extra["cls"] = None
        s.extra = extra
        if image_ext is None:
            s.error = SampleError("unsupported", f"sample has no image member (members: {sorted(members)})")
        else:
            s.data = members[image_ext]
        return s

    def unreadable(message: str) -> RawSample:
        s = RawSample(idx, make_key(f"{unit.source}#__unreadable__", f"{tar_stem}/unreadable"), "__unreadable__",
                      unit.source)
        s.error = SampleError("read", message)
        return s

    try:
        f = fs.open(path, "rb")
    except FileNotFoundError as e:
        raise UnitReadError(f"{unit.source}: {e}") from e
    except Exception as e:
        raise UnitReadError(f"opening {unit.source}: {type(e).__name__}: {e}") from e
    watch = _EndMarkerWatch()
    last: TarGroup | None = None  # emitted only once the archive is known to have ended cleanly

    def take(m: tarfile.TarInfo) -> Any:
        if not m.isfile():  # symlink, hardlink, FIFO or device member
            return _LINK
        fobj = tar.extractfile(m)
        return fobj.read() if fobj is not None else b""

    try:
        with f, tarfile.open(fileobj=f, mode="r|*", tarinfo=watch.tarinfo()) as tar:
            for group in group_tar_members(tar, take):
                if group.bad_name is not None:
                    s = new_sample(f"__badname__/{group.bad_name}", group.bad_name)
                    s.error = SampleError("unsupported", f"tar member name {printable(group.bad_name)!r} is not a "
                                                         f"file name a sample can be keyed by")
                    yield s
                elif group.final:
                    last = group
                else:
                    yield emit(group.prefix, group.members)
    except _TAR_FORMAT_ERRORS as e:
        # Corrupt or truncated tar: keep what was read, account for the rest with one deterministic error record.
        # (The half-read sample is part of the rest.)
        yield unreadable(f"tar is corrupt or truncated after {idx} samples: {type(e).__name__}: {e}")
        return
    except Exception as e:
        raise UnitReadError(f"reading {unit.source}: {type(e).__name__}: {e}") from e
    if not watch.ended_cleanly:  # cut at or inside a header: tarfile stopped as if the archive had ended
        got = "no header block" if watch.last is None or not watch.last else \
            f"a {len(watch.last)}-byte header block" if len(watch.last) < tarfile.BLOCKSIZE else "no end marker"
        yield unreadable(f"tar is truncated after {idx} samples: it ends with {got} instead of the end-of-archive "
                         f"marker (the last sample, if any, may be incomplete and is part of this record)")
        return
    if last is not None:
        yield emit(last.prefix, last.members)


def find_image_column(schema, requested: str | None = None) -> str:
    """The image column of a Parquet schema: ``requested`` if given, else a conventional name (``image``, ``jpg``,
    ...), else the first binary column, else the first struct column with a binary ``bytes`` field (HF style)."""
    import pyarrow as pa

    names = list(schema.names)
    if requested:
        if requested not in names:
            raise ValueError(f"--image-column {requested!r} is not a column (columns: {names})")
        return requested

    def is_image_type(t) -> bool:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return True
        return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0

    for n in _IMAGE_COLUMN_NAMES:
        if n in names and is_image_type(schema.field(n).type):
            return n
    for n in names:
        if is_image_type(schema.field(n).type):
            return n
    raise ValueError(f"no image column found (columns: {names}); pass --image-column")


_BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2")


def _resolve_image_path(base_dir: str, path: str, allowed: tuple[str, ...] = ()) -> str:
    """An HF-style ``path`` field as a URL: a URL or absolute path as is, a relative one next to the Parquet file
    (``base_dir``, its directory URL). Raises ``SampleError("refused")`` unless the result lies in the Parquet
    file's own directory tree (local files and HTTP; symlinks resolved) or bucket (object stores), or under one of
    ``allowed`` (``"*"``: anywhere): an untrusted dataset must not make every worker read ``/etc/...``, ``../``
    or an internal URL."""
    if "://" in path:
        url = path
    elif path.startswith("/"):
        url = "file://" + path if base_dir.startswith("file://") else path
    else:
        url = f"{base_dir}/{path}"
    url = _normalise_url(url)
    if "*" in allowed or any(url.startswith(_normalise_url(a)) for a in allowed if a):
        return url
    home = _normalise_url(base_dir).rstrip("/")
    proto = home.split("://", 1)[0] if "://" in home else "file"
    if proto in _BUCKET_PROTOCOLS:
        home = home.split("://", 1)[0] + "://" + home.split("://", 1)[1].split("/", 1)[0]
    inside = url.startswith(home + "/")
    if inside and url.startswith("file://"):  # a symlink inside the tree may point anywhere
        real_home = os.path.realpath(home[len("file://"):])
        real = os.path.realpath(url[len("file://"):])
        inside = real.startswith(real_home.rstrip("/") + "/")
    if not inside:
        raise SampleError("refused", f"the row's image path {printable(path)!r} leads outside "
                                     f"{'the bucket' if proto in _BUCKET_PROTOCOLS else 'the directory'} of its "
                                     f"Parquet file ({home}/); pass --allow-external-refs (optionally with the "
                                     f"allowed URL prefixes) to read it")
    return url


def _normalise_url(url: str) -> str:
    """``scheme://host/a/b/../c`` -> ``scheme://host/a/c`` (``..`` never climbs above the host or bucket)."""
    if "://" not in url:
        url = "file://" + os.path.abspath(url)
    scheme, rest = url.split("://", 1)
    if scheme == "file":
        return "file://" + posixpath.normpath("/" + rest.lstrip("/"))
    host, _, tail = rest.partition("/")
    tail, sep, query = tail.partition("?")
    norm = posixpath.normpath("/" + tail) if tail else "/"
    return f"{scheme}://{host}{norm}" + (sep + query if sep else "")


def _read_referenced_images(by_path: dict[str, list[RawSample]], storage_options: dict | None) -> None:
    """Fill ``data`` (or a ``read`` error) of rows whose image is a file reference, one batch per filesystem."""
    by_fs: dict[int, tuple[fsspec.AbstractFileSystem, dict[str, str]]] = {}
    for url in by_path:
        fs, p = get_fs(url, storage_options)
        by_fs.setdefault(id(fs), (fs, {}))[1][p] = url
    for fs, paths in by_fs.values():
        got = _cat_each(fs, list(paths), "reading referenced images")
        for p, url in paths.items():
            outcome = _file_outcome(got[p], f"the row's image path {url}", f"the row's image path {url} does not exist")
            for s in by_path[url]:
                if isinstance(outcome, SampleError):
                    s.error = outcome
                else:
                    s.data = outcome


def _iter_parquet(unit: Unit, info: UnitInfo, storage_options: dict | None, image_column: str | None,
                  allow_external_refs: tuple[str, ...] = ()) -> Iterator[RawSample]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = get_fs(unit.source, storage_options)
    stem = posixpath.basename(path).rsplit(".", 1)[0]
    try:
        f = TaggedFile(open_from_store(fs, path))  # the store's failures come out as StorageReadError (by type)
        pf = pq.ParquetFile(f)
    except FileNotFoundError as e:
        raise UnitReadError(f"{unit.source}: {e}") from e
    except StorageReadError as e:  # the store failed: transient, the unit is retried
        raise UnitReadError(f"opening {unit.source}: {e}") from e
    except (pa.ArrowException, OSError) as e:  # the bytes are not Parquet: the same on every run, one record
        s = RawSample(0, make_key(f"{unit.source}#__unreadable__", f"{stem}/unreadable"), "__unreadable__",
                      unit.source)
        s.error = SampleError("read", f"not a readable Parquet file: {type(e).__name__}: {e}")
        yield s
        return
    schema = pf.schema_arrow
    try:
        col = find_image_column(schema, image_column)
    except ValueError as e:  # the same on every run: a record for the file, not a retried unit
        with f:
            s = RawSample(0, make_key(f"{unit.source}#__unreadable__", f"{stem}/unreadable"), "__unreadable__",
                          unit.source)
            s.error = SampleError("unsupported", f"{pf.metadata.num_rows} rows not read: {e}")
            yield s
            return
    info.image_column = col
    passthrough = [n for n in schema.names if n != col]
    renamed = {n: ("input_" + n if n in RESERVED_COLUMNS else n) for n in passthrough}
    info.passthrough_schema = pa.schema([schema.field(n).with_name(renamed[n]) for n in passthrough]).serialize() \
        .to_pybytes()
    idx = 0
    base_dir = unit.source.rsplit("/", 1)[0]
    with f:
        try:
            for batch in pf.iter_batches(batch_size=64):
                images = batch.column(col).to_pylist()
                others = {renamed[n]: batch.column(n).to_pylist() for n in passthrough}
                samples, by_path = [], {}
                for j, v in enumerate(images):
                    member = f"row={idx}"
                    s = RawSample(idx, make_key(f"{unit.source}#{member}", f"{stem}/{member}"), member, unit.source)
                    s.extra = {n: vals[j] for n, vals in others.items()}
                    referenced = False
                    if isinstance(v, dict):
                        path_hint = v.get("path")
                        v = v.get("bytes")
                        if v is None and path_hint:  # HF Image feature stored by reference: read the file
                            referenced = True
                            try:
                                ref = _resolve_image_path(base_dir, path_hint, allow_external_refs)
                                by_path.setdefault(ref, []).append(s)
                            except SampleError as e:
                                s.error = e
                        elif v is None:
                            s.error = SampleError("empty", "row has neither image bytes nor a path")
                    if s.error is None and not referenced:
                        if v is None:
                            s.error = SampleError("empty", f"image column {col!r} is null")
                        elif not isinstance(v, (bytes, bytearray)):
                            s.error = SampleError("unsupported", f"image column {col!r} holds {type(v).__name__}")
                        else:
                            s.data = bytes(v)
                    idx += 1
                    samples.append(s)
                if by_path:
                    _read_referenced_images(by_path, storage_options)
                yield from samples
        except StorageReadError as e:
            raise UnitReadError(f"reading {unit.source}: {e}") from e
        except (pa.ArrowException, OSError) as e:  # damaged data pages: the rows before were read, the rest is one record
            s = RawSample(idx, make_key(f"{unit.source}#__unreadable__", f"{stem}/unreadable"), "__unreadable__",
                          unit.source)
            s.error = SampleError("read", f"Parquet file is corrupt after {idx} rows: {type(e).__name__}: {e}")
            yield s
            return
