"""Names shared by every pipeline stage: format version, error kinds, reserved columns, extensions, keys, unit ids.

Keys and unit ids are pure functions of the input (never of time, host or run) so that a rerun writes the same shard
names and the same bytes; see docs/token-format.md.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

__all__ = ["FORMAT_VERSION", "READABLE_FORMAT_VERSIONS", "tokens_fit_uint16", "ERROR_KINDS", "SampleError", "make_key", "make_unit_id", "ROW_OK",
           "ROW_ERROR", "checked_dimension", "printable", "is_utf8", "clean_message", "INT32_MAX", "RESERVED_COLUMNS",
           "IMAGE_EXTENSIONS", "TAR_EXTENSIONS", "PARQUET_EXTENSIONS"]

# Token shard format version (docs/token-format.md): writers stamp it, readers refuse newer ones.
FORMAT_VERSION = 2
# Versions this gq reads (version 1: the layout with records, errors and manifest at the output root).
READABLE_FORMAT_VERSIONS = (1, 2)


def tokens_fit_uint16(codebook_size: int) -> bool:
    """Tokens are stored as uint16 when every index fits (K <= 65536), else as int32."""
    return int(codebook_size) <= 65536


# Error record kinds (docs/token-format.md, "Errors").
ERROR_KINDS = ("decode", "empty", "too_large", "unsupported", "read", "model", "refused")

# Width/height columns are int32: a header value outside it (a BMP declaring 4294967169 columns) is reported as -1.
INT32_MAX = 2**31 - 1

# Row kinds flowing from the read stage through the model stage to the driver.
ROW_OK, ROW_ERROR = "ok", "error"

# Output columns of a token shard; input pass-through columns with these names get an ``input_`` prefix.
RESERVED_COLUMNS = ("key", "source", "member", "tokens", "token_shape", "width", "height", "latent", "latent_shape",
                    "txt", "json", "cls")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff", "tif")
TAR_EXTENSIONS = ("tar", "tar.gz", "tgz")
PARQUET_EXTENSIONS = ("parquet",)

_UNSAFE = re.compile(r"[^A-Za-z0-9-]+")
_SLUG_MAX = 64  # keeps "<key>.latent.npy" under the 100-character ustar name field


class SampleError(Exception):
    """A sample that produced no tokens; becomes one error record (never a crash). ``kind`` is in ERROR_KINDS."""

    def __init__(self, kind: str, message: str, width: int = -1, height: int = -1):
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(message)
        self.kind, self.message = kind, message
        self.width, self.height = checked_dimension(width), checked_dimension(height)


def checked_dimension(v: Any) -> int:
    """A header's width or height as the int32 the record stores, -1 when it does not fit (the message keeps it)."""
    try:
        v = int(v)
    except (TypeError, ValueError, OverflowError):
        return -1
    return v if -1 <= v <= INT32_MAX else -1


def printable(text: str) -> str:
    """``text`` as valid UTF-8: undecodable bytes of a file name (``surrogateescape``) become ``\\xNN`` escapes, so
    an error record can name the file it is about."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "surrogatepass") \
            .decode("utf-8", "backslashreplace")


def _only_escapes(text: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def clean_message(message: str) -> str:
    """Error text without object addresses (``<_io.BytesIO object at 0x7f..>``), so error files are reproducible."""
    return _ADDRESS.sub("", message)[:2000]


def make_key(identity: str, readable: str) -> str:
    """Stable, unique sample key: ``<slug of readable>-<sha256(identity)[:12]>``.

    ``identity`` is the sample's full input URI (``file:///d/a.jpg``, ``s3://b/x.tar#000123``, ``...parquet#row=7``)
    and is unique per sample; ``readable`` (usually the path relative to the input root) only makes the key readable.
    The slug keeps ``[A-Za-z0-9-]`` (no dots, as WebDataset keys require) so ``a.jpg`` and ``a.png`` become
    ``a_jpg-…`` and ``a_png-…``; the hash keeps keys distinct even where two names slug to the same text.
    """
    slug = _UNSAFE.sub("_", readable).strip("_")[-_SLUG_MAX:].lstrip("_") or "sample"
    # surrogatepass: a non-UTF-8 file name (surrogate-escaped by the OS layer) still hashes, deterministically
    return f"{slug}-{hashlib.sha256(identity.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


_SAFE_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,150}")


def file_name_for_key(key: str, suffix: str) -> str:
    """A file name for writing a sample by its key (``gq decode``'s ``<key>.png``) that can never leave the folder.

    gq's own keys are already safe and are used as they are. A key from elsewhere (a foreign shard, a plugin
    ``key_column``) that holds ``/``, ``..``, a leading dot or other characters becomes ``<slug>-<sha256[:12]>``, so it
    cannot climb out of the output folder or collide with another key."""
    if _SAFE_FILE.fullmatch(key) and ".." not in key:
        return key + suffix
    return make_key(key, key) + suffix


def make_unit_id(description: dict[str, Any]) -> str:
    """``u-<sha256(canonical JSON of the unit description)[:16]>``: same inputs and unit size give the same ids."""
    blob = json.dumps(description, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "u-" + hashlib.sha256(blob.encode("ascii")).hexdigest()[:16]
