"""Telling a store that failed from a file that is damaged, by type.

pyarrow raises a plain ``OSError`` both for a damaged Parquet file ("Corrupt snappy compressed data") and, when the
bytes come from a Python file object, for whatever that object raised (a reset connection, an S3 timeout). The two
need opposite handling: a damaged file is the same on every run and becomes an error record; a store that failed is
transient and fails the unit, which is retried. Matching message text ("Parquet", "magic") to tell them apart broke
with every new pyarrow message. So the file objects gq hands to pyarrow are wrapped in :class:`TaggedFile`, which
re-raises anything the store raises as :class:`StorageReadError`; pyarrow passes a Python exception through
unchanged, so what reaches the caller is typed: ``StorageReadError`` (the store) or any other exception (the bytes).
"""
from __future__ import annotations

from typing import Any

__all__ = ["StorageReadError", "TaggedFile", "open_from_store"]


class StorageReadError(OSError):
    """Reading from the store failed (not the file's content): transient, the unit is retried."""


class TaggedFile:
    """A read-only file object (an fsspec file) whose read errors surface as :class:`StorageReadError`."""

    def __init__(self, f: Any):
        self._f = f

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._f, name)(*args)
        except StorageReadError:
            raise
        except Exception as e:
            raise StorageReadError(f"{type(e).__name__}: {e}") from e

    def read(self, *args: Any) -> bytes:
        return self._call("read", *args)

    def readinto(self, buffer: Any) -> int:
        return self._call("readinto", buffer)

    def seek(self, *args: Any) -> int:
        return self._call("seek", *args)

    def tell(self) -> int:
        return self._f.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._f.closed

    @property
    def size(self) -> Any:
        return getattr(self._f, "size", None)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "TaggedFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_from_store(fs: Any, path: str) -> Any:
    """``fs.open(path, "rb")`` with any failure but a missing file as :class:`StorageReadError`: opening reads no
    content, so whatever goes wrong there is the store's (a refused credential, a timeout, a reset)."""
    try:
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise
    except Exception as e:
        raise StorageReadError(f"{type(e).__name__}: {e}") from e
