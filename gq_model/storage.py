"""fsspec storage options, given once for a whole run and picked per URL.

A run can touch several stores at once: images on ``gs://``, shards written to ``s3://``, a model bundle over
``https://``. One flat options dict (``{"endpoint_url": ...}``) cannot serve them all, since each fsspec backend
takes its own keyword arguments (s3fs's ``key`` is an error to gcsfs). So ``storage_options`` is either

- a flat dict, given to every remote URL (the common case: one store), or
- a dict keyed by protocol, ``{"s3": {...}, "gs": {...}}``, whose entry for a URL's protocol is used (aliases such as
  ``gcs``/``gs`` and ``s3a``/``s3`` find each other's entry; a protocol without an entry gets no options).

Local paths never get options: a local file system rejects S3 keywords.

It is the one home of atomic writes (:func:`write_atomic` for local files, :func:`put_atomic` for any fsspec URL:
temporary name, fsync, rename, fsync of the folder, so a crash never leaves a zero-length or partial file under the
final name) and of :func:`is_local_fs`.

It also holds the conditional writes that let one writer own an output (``gq_pipeline.lease``) and make commit
records first-writer-wins: :func:`create_exclusive`, :func:`read_versioned`, :func:`replace_if_match` and
:func:`delete_if_match`, with what each store guarantees (local disk, S3, GCS; other stores best effort).
"""
from __future__ import annotations

import errno
import hashlib
import os
import uuid
import warnings
from typing import Any, BinaryIO, Callable, Mapping

import fsspec

__all__ = ["options_for", "url_to_fs", "check_storage_options", "parse_storage_options", "is_local_fs",
           "is_local_protocol", "is_local_url", "write_atomic", "put_atomic", "create_exclusive", "read_versioned", "replace_if_match",
           "delete_if_match", "conditional_support"]

_LOCAL = ("file", "local")
# Spellings fsspec registers for one backend: an entry under any of them serves the others.
_ALIASES = ({"gs", "gcs"}, {"s3", "s3a"}, {"http", "https"}, {"az", "abfs", "abfss"})


def _protocol(url: str) -> str:
    first = url.split("::", 1)[0]
    return first.split("://", 1)[0].lower() if "://" in first else "file"


def _is_per_protocol(options: Mapping[str, Any]) -> bool:
    known = fsspec.available_protocols()
    return bool(options) and all(k in known and isinstance(v, Mapping) for k, v in options.items())


def check_storage_options(options: Any, name: str = "--storage-options") -> dict[str, Any] | None:
    """``options`` if it is a storage-options value gq can use, else a ``ValueError`` that names ``name``.

    Without this check a JSON string or list failed deep inside fsspec with an ``AttributeError``, and
    ``{"s3": 5}`` reached s3fs as a keyword ``s3=5``: neither message said which option was wrong."""
    if options is None:
        return None
    if not isinstance(options, Mapping):
        raise ValueError(f"{name} must be a JSON object of fsspec options, e.g. '{{\"endpoint_url\": "
                         f"\"http://host:9000\"}}' or '{{\"s3\": {{...}}, \"gs\": {{...}}}}'; got "
                         f"{type(options).__name__} {options!r:.100}")
    bad = [k for k in options if not isinstance(k, str)]
    if bad:
        raise ValueError(f"{name}: option names must be strings, got {bad[0]!r}")
    known = fsspec.available_protocols()
    protocols = [k for k in options if k in known or k in ("s3", "s3a", "gs", "gcs")]
    for k in protocols:
        if not isinstance(options[k], Mapping):
            raise ValueError(f"the entry for protocol {k!r} in {name} must be a JSON object of that file "
                             f"system's options, got {type(options[k]).__name__} {options[k]!r:.100}")
    flat = [k for k in options if k not in protocols]
    if protocols and flat:
        raise ValueError(f"{name} mixes per-protocol entries ({', '.join(sorted(protocols))}) with flat options "
                         f"({', '.join(sorted(flat))}): put every option under its protocol, or give only flat "
                         f"options")
    return dict(options)


def parse_storage_options(text: str) -> dict[str, Any]:
    """``--storage-options JSON`` for argparse (``type=``): malformed JSON, or JSON that is not an object of options,
    is a usage error naming the option (argparse exits 2)."""
    import argparse
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r:.100}") from None
    try:
        return check_storage_options(value, "the value")  # argparse prefixes "argument --storage-options: "
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def options_for(url: str | os.PathLike, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fsspec keyword arguments for ``url`` out of a run's ``storage_options`` (flat or per protocol)."""
    proto = _protocol(os.fspath(url))
    if proto in _LOCAL or not storage_options:
        return {}
    check_storage_options(storage_options, "storage_options")
    if not _is_per_protocol(storage_options):
        return dict(storage_options)
    names = next((group for group in _ALIASES if proto in group), {proto})
    for name in sorted(names, key=lambda n: n != proto):  # the URL's own spelling first
        if name in storage_options:
            return dict(storage_options[name])
    return {}


def url_to_fs(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None):
    """``fsspec.core.url_to_fs`` with the options that belong to ``url``."""
    return fsspec.core.url_to_fs(os.fspath(url), **options_for(url, storage_options))



# ---------------------------------------------------------------------------------------------- conditional writes
#
# A "version" names one state of an object, so that a later write or delete can say "only if it is still this one":
# the ETag on S3, the generation on GCS, the SHA-256 of the bytes on local disk. Each function below is atomic where
# the store makes it so:
#
# - local disk: create is a hard link of a complete temporary file (fails if the name exists; falls back to
#   O_CREAT|O_EXCL where the file system has no hard links). Read-compare-replace and read-compare-delete hold an
#   fcntl lock on the parent directory, so processes on this machine (and NFS clients, as far as the server's locks
#   go) serialize; without fcntl (Windows) there is a race window of one read plus one rename.
# - S3 (s3fs): ``If-None-Match: *`` on create, ``If-Match: <ETag>`` on replace and delete (AWS S3 honours all three
#   since 2024-25; an S3-compatible store that ignores the headers silently degrades to last-writer-wins, which the
#   lease's heartbeat then notices as a lost lease).
# - GCS (gcsfs): ``ifGenerationMatch=0`` on create, ``ifGenerationMatch=<generation>`` on replace and delete.
# - anything else, and an S3-compatible store that answers NotImplemented to these headers: best effort (an existence
#   check before the write, a comparison before the replace or delete), with a warning.


def is_local_protocol(protocol: str | tuple | list) -> bool:
    """True for fsspec's local file system protocols (``file``, ``local``), given one name or fsspec's tuple."""
    protos = protocol if isinstance(protocol, (tuple, list)) else (protocol,)
    return any(p in _LOCAL for p in protos)


def is_local_url(url: str | os.PathLike) -> bool:
    """True for a plain path or a ``file://`` URL (no fsspec file system needed to tell)."""
    return _protocol(os.fspath(url)) in _LOCAL


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    """True when ``fs`` is the local disk: renames are atomic there, and object-store semantics do not apply."""
    return is_local_protocol(fs.protocol)


def _kind(fs) -> str:
    protos = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if is_local_protocol(protos):
        return "local"
    if any(p in ("s3", "s3a") for p in protos):
        return "s3"
    if any(p in ("gs", "gcs") for p in protos):
        return "gcs"
    return "other"


def conditional_support(fs) -> str:
    """``"atomic"`` where :func:`create_exclusive` and the compare-and-swap functions are enforced by the store,
    ``"best effort"`` where they are emulated with a check before the write."""
    return "best effort" if _kind(fs) == "other" else "atomic"


_warned: set[str] = set()
# What an S3-compatible store answers to a conditional header it does not implement.
_S3_UNSUPPORTED = ("NotImplemented",)


def _best_effort(fs) -> None:
    name = str(fs.protocol)
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"the {name} file system has no conditional writes gq knows how to use: one writer per output "
                      f"and first-writer-wins commit records are best effort there (a check, then a write)",
                      RuntimeWarning, stacklevel=3)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


class _DirLock:
    """An exclusive fcntl lock on a directory (no lock file to leave behind); a no-op where fcntl is missing."""

    def __init__(self, directory: str):
        self.directory = directory
        self.fd: int | None = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: see the race window noted above
            return self
        self.fd = os.open(self.directory, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _tmp_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _write_tmp(path: str, data: bytes) -> str:
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX: the directory entry is only on disk once the folder is synced)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and platforms) refuse fsync on a directory: the rename still happened
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], Any]) -> None:
    """Write a local file all at once: readers see the old file or the whole new one, and after a crash (power loss,
    a killed node) the final name never holds a zero-length or partial file.

    ``data`` is the bytes, or a function that writes to the open binary file (``lambda f: torch.save(obj, f)``).
    The temporary is in the same folder (so the rename is atomic), flushed and fsynced before the rename, and the
    folder is fsynced after it; on failure the temporary is removed."""
    path = os.fspath(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(path))


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Publish ``data`` at ``path`` on any fsspec file system, all at once: :func:`write_atomic` on local disk; on
    object stores one PUT (or a completed multipart upload), which appears atomically."""
    if is_local_fs(fs):
        write_atomic(_local(path), data)
    else:
        fs.pipe_file(path, data)


def _client_error_code(e: BaseException) -> str | None:
    """The S3 error code behind an s3fs exception (s3fs translates ClientError and keeps it as the cause)."""
    while e is not None:
        resp = getattr(e, "response", None)
        if isinstance(resp, dict) and "Error" in resp:
            return resp["Error"].get("Code")
        e = e.__cause__ or e.__context__
    return None


def _bucket_key(fs, path: str) -> tuple[str, str]:
    """(bucket, key) of an s3fs or gcsfs path."""
    bucket, key, _ = fs.split_path(path)
    return bucket, key


def _gcs_upload(fs, path: str, data: bytes, **conditions) -> dict:
    """One multipart upload with GCS preconditions (gcsfs's own pipe only knows ``ifGenerationMatch=0``)."""
    import json as _json

    bucket, key = _bucket_key(fs, path)
    boundary = "==gq-" + uuid.uuid4().hex + "=="
    meta = _json.dumps({"name": key})
    body = (f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{meta}\r\n--{boundary}\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--".encode()
    out = fs.call("POST", f"{fs._location}/upload/storage/v1/b/{bucket}/o", uploadType="multipart",
                  headers={"Content-Type": f'multipart/related; boundary="{boundary}"'}, data=body, json_out=True,
                  **{k: str(v) for k, v in conditions.items()})
    fs.invalidate_cache(path)
    return out


def create_exclusive(fs, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists: True if this call created it, False if it was there.

    Readers never see a part of ``data``: the object appears complete or not at all (except on a local file system
    without hard links, where the O_EXCL fallback writes in place)."""
    kind = _kind(fs)
    if kind == "local":
        path = _local(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        for _ in range(10):
            tmp = _write_tmp(path, data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except FileNotFoundError:  # a clean-up of temporaries removed ours before the link: write it again
                continue
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
                    raise
                break
            finally:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
        try:  # no hard links here: exclusive create, then write in place
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if kind == "s3":
        while True:
            try:
                fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False
            except OSError as e:
                # 409: another conditional write of this key is in flight; once it lands, ours gets a 412.
                code = _client_error_code(e)
                if code in _S3_UNSUPPORTED:
                    break  # an S3-compatible store without conditional writes: best effort below
                if code != "ConditionalRequestConflict":
                    raise
    if kind == "gcs":
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
    _best_effort(fs)
    fs.invalidate_cache(path)
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


def read_versioned(fs, path: str) -> tuple[bytes, str] | None:
    """``(bytes, version)`` of ``path`` read in one consistent step, or None if it does not exist."""
    kind = _kind(fs)
    if kind == "local":
        path = _local(path)
        try:
            with _DirLock(os.path.dirname(path) or "."):
                with open(path, "rb") as f:
                    data = f.read()
        except FileNotFoundError:
            return None
        return data, _sha(data)
    if kind == "s3":
        from fsspec.asyn import sync

        bucket, key = _bucket_key(fs, path)

        async def get():
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with resp["Body"] as body:
                return await body.read(), resp["ETag"]

        try:
            return sync(fs.loop, get)
        except FileNotFoundError:
            return None
    if kind == "gcs":
        bucket, key = _bucket_key(fs, path)
        try:
            headers, data = fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")
        except FileNotFoundError:
            return None
        return bytes(data), str(headers["x-goog-generation"])
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    return data, _sha(data)


def _local_at_version(path: str, version: str) -> bool:
    """A local file exists and holds the bytes of ``version`` (call under the directory's ``_DirLock``)."""
    try:
        with open(path, "rb") as f:
            return _sha(f.read()) == version
    except FileNotFoundError:
        return False


def replace_if_match(fs, path: str, data: bytes, version: str) -> str | None:
    """Overwrite ``path`` with ``data`` only if it is still at ``version``; returns the new version, or None if the
    object changed or vanished meanwhile (someone else wrote it)."""
    kind = _kind(fs)
    if kind == "local":
        path = _local(path)
        with _DirLock(os.path.dirname(path) or "."):
            if not _local_at_version(path, version):
                return None
            write_atomic(path, data)  # the one atomic write: fsync, rename, folder fsync, no temporary left
        return _sha(data)
    if kind == "s3":
        try:
            out = fs.pipe_file(path, data, IfMatch=version)
            fs.invalidate_cache(path)
            return out["ETag"]
        except (OSError, FileNotFoundError) as e:
            if isinstance(e, FileNotFoundError) or _client_error_code(e) in (
                    "PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return None
            if _client_error_code(e) not in _S3_UNSUPPORTED:
                raise
            # S3-compatible store without If-Match: best effort below (its versions are still ETags)
            _best_effort(fs)
            fs.invalidate_cache(path)
            now = fs.info(path) if fs.exists(path) else None
            if now is None or now.get("ETag") != version:
                return None
            return fs.pipe_file(path, data)["ETag"]
    if kind == "gcs":
        try:
            return str(_gcs_upload(fs, path, data, ifGenerationMatch=version)["generation"])
        except (FileExistsError, FileNotFoundError):  # gcsfs raises FileExistsError for any 412
            return None
    _best_effort(fs)
    now = read_versioned(fs, path)
    if now is None or now[1] != version:
        return None
    fs.pipe_file(path, data)
    return _sha(data)


def delete_if_match(fs, path: str, version: str) -> bool:
    """Delete ``path`` only if it is still at ``version``; True if this call deleted it."""
    kind = _kind(fs)
    if kind == "local":
        path = _local(path)
        with _DirLock(os.path.dirname(path) or "."):
            if not _local_at_version(path, version):
                return False
            os.unlink(path)
        return True
    if kind == "s3":
        bucket, key = _bucket_key(fs, path)
        try:
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except (OSError, FileNotFoundError) as e:
            if isinstance(e, FileNotFoundError) or _client_error_code(e) in (
                    "PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return False
            if _client_error_code(e) not in _S3_UNSUPPORTED:
                raise
            _best_effort(fs)  # S3-compatible store without conditional deletes: compare, then delete
            now = read_versioned(fs, path)
            if now is None or now[1] != version:
                return False
            fs.rm_file(path)
        fs.invalidate_cache(path)
        return True
    if kind == "gcs":
        bucket, key = _bucket_key(fs, path)
        try:
            fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(version))
        except (FileExistsError, FileNotFoundError):
            return False
        fs.invalidate_cache(path)
        return True
    _best_effort(fs)
    now = read_versioned(fs, path)
    if now is None or now[1] != version:
        return False
    fs.rm_file(path)
    return True
