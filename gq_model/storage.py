"""fsspec storage options, given once for a whole run and picked per URL.

A run can touch several stores at once: images on ``gs://``, shards written to ``s3://``, a model bundle over
``https://``. One flat options dict (``{"endpoint_url": ...}``) cannot serve them all, since each fsspec backend
takes its own keyword arguments (s3fs's ``key`` is an error to gcsfs). So ``storage_options`` is either

- a flat dict, given to every remote URL (the common case: one store), or
- a dict keyed by protocol, ``{"s3": {...}, "gs": {...}}``, whose entry for a URL's protocol is used (aliases such as
  ``gcs``/``gs`` and ``s3a``/``s3`` find each other's entry; a protocol without an entry gets no options).

Local paths never get options: a local file system rejects S3 keywords.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import fsspec

__all__ = ["options_for", "url_to_fs"]

_LOCAL = ("file", "local")
# Spellings fsspec registers for one backend: an entry under any of them serves the others.
_ALIASES = ({"gs", "gcs"}, {"s3", "s3a"}, {"http", "https"}, {"az", "abfs", "abfss"})


def _protocol(url: str) -> str:
    first = url.split("::", 1)[0]
    return first.split("://", 1)[0].lower() if "://" in first else "file"


def _is_per_protocol(options: Mapping[str, Any]) -> bool:
    known = fsspec.available_protocols()
    return bool(options) and all(k in known and isinstance(v, Mapping) for k, v in options.items())


def options_for(url: str | os.PathLike, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fsspec keyword arguments for ``url`` out of a run's ``storage_options`` (flat or per protocol)."""
    proto = _protocol(os.fspath(url))
    if proto in _LOCAL or not storage_options:
        return {}
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
