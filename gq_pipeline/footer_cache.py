"""A node-local cache of shard descriptions, so that the footers of an output without commit records are read once
per node, not once per rank.

Why: an output written by ``gq tokenize`` is described from its commit records (no footer read at all). A folder
without them (shards copied elsewhere, written by another tool, a glob, a list of files) is described from its
Parquet footers, and without this cache every rank of a job would read every footer at start: ``shards x ranks``
GETs on one prefix. With it, the first process of a node to get there scans, writes a small JSON summary, and every
other process of the node (ranks, relaunches) reads the summary instead.

* **Where**: ``$GQ_CACHE/footers`` (default ``~/.cache/gq/footers``), or any folder passed as ``footer_cache``. Point
  it at a node-local disk. Not inside ``TokenDataset``'s ``cache_dir``: that folder holds shard copies only and is
  trimmed to its size bound file by file.
* **Key**: sha256 of the reader's format version and the sorted ``(url, size, version tag)`` of the listing, the
  version tag being the object's ETag, generation or mtime as the file system reports it in its listing (the listing
  the reader made anyway, so checking the cache costs no request per shard). A shard added, removed, rewritten or
  replaced makes a new key, so a stale summary is never used. Where the listing lacks tags (HTTP), each file's
  ``info`` (a HEAD) gives them. Files whose file system reports no version tag are not cached (always scanned): a
  same-size rewrite could not be told apart. Old summaries are small and are never read again; delete the folder
  at any time.
* **Concurrency**: a summary is written under a temporary name and renamed into place (``os.replace``), so a reader
  never sees half of one; an exclusive ``fcntl.flock`` on ``<key>.lock`` makes the processes of a node that miss
  wait for the one scan instead of all scanning. A scan that met an unreadable shard is not kept (the failure may
  be transient), and a cache folder that cannot be written only costs the cache (a warning, then a direct scan).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import posixpath
import warnings
from typing import Callable

from gq_model.storage import is_local_protocol, write_atomic
from gq_pipeline.shards import FORMAT_VERSION, FSRef, Shard, ShardError

__all__ = ["FooterCache", "default_footer_dir", "resolve_footer_cache"]

SUMMARY_VERSION = 1
_TAGS = ("ETag", "etag", "generation", "md5Hash", "Content-MD5", "mtime", "LastModified", "Last-Modified",
         "last_modified", "updated")

Scan = Callable[[FSRef, list, bool], tuple]


def default_footer_dir() -> str:
    """``$GQ_CACHE/footers`` (``~/.cache/gq/footers``)."""
    from gq_model.hub import gq_cache_dir

    return os.path.join(gq_cache_dir(), "footers")


def resolve_footer_cache(option: str | bool | None) -> FooterCache | None:
    """``TokenDataset``'s ``footer_cache`` option: None (the default) caches remote shard sets only (local footers
    are cheap and a local folder is usually one rank's), True caches local ones too, False never caches, a string is
    the folder to use."""
    if option is False:
        return None
    if isinstance(option, (str, os.PathLike)):
        return FooterCache(os.fspath(option))
    return FooterCache(default_footer_dir(), remote_only=option is None)


class FooterCache:
    """Describes shards through ``scan`` (``shards._describe_parquet``) once per listing and node; see the module
    docstring. ``last`` says what the latest :meth:`describe` did: ``"hit"``, ``"scan"`` or ``"bypass"``."""

    def __init__(self, directory: str, remote_only: bool = False):
        self.directory, self.remote_only = os.path.abspath(os.path.expanduser(directory)), remote_only
        self.last: str | None = None

    def key(self, fsref: FSRef, paths: list[str]) -> str | None:
        """The listing's key, or None when some file has no version tag or the listing fails (then nothing is
        cached: the scan reads the files and reports their problems itself)."""
        try:
            entries = _listing(fsref, paths)
        except Exception:  # noqa: BLE001 - the cache is an optimisation; the scan raises a clear error if any
            return None
        if entries is None:
            return None
        h = hashlib.sha256(json.dumps([SUMMARY_VERSION, FORMAT_VERSION, sorted(entries)]).encode())
        return h.hexdigest()

    def describe(self, fsref: FSRef, paths: list[str], strict: bool, scan: Scan) -> tuple[list[Shard], list]:
        """``(shards, problems)`` as ``scan(fsref, paths, strict)`` gives them, from this node's summary when one
        exists for this exact listing. With ``strict`` the first problem is raised, as the scan would."""
        local = is_local_protocol(fsref.protocol)
        key = None if (self.remote_only and local) else self.key(fsref, paths)
        if key is None:
            self.last = "bypass"
            return scan(fsref, paths, strict)
        summary = os.path.join(self.directory, key + ".json")
        found = _load(summary)
        self.last = "hit"
        if found is None:
            try:
                os.makedirs(self.directory, exist_ok=True)
                lock = open(os.path.join(self.directory, key + ".lock"), "a")
            except OSError as e:  # a read-only or full cache disk: read the footers as if there were no cache
                warnings.warn(f"footer cache {self.directory} is not usable ({e}); reading the footers directly",
                              stacklevel=3)
                self.last = "bypass"
                return scan(fsref, paths, strict)
            with lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # the others of the node wait here for the one scan
                try:
                    found = _load(summary)
                    if found is None:
                        self.last = "scan"
                        found = scan(fsref, paths, False)
                        if not found[1]:  # a problem may be transient (a failed GET): never keep it
                            _store(summary, found)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        shards, problems = found
        if strict and problems:
            raise ShardError(problems[0][1])
        return shards, problems


def _listing(fsref: FSRef, paths: list[str]) -> list[tuple[str, int, str]] | None:
    """``(url, size, version tag)`` per path from the listing of each parent folder (fsspec's listing cache usually
    holds it already: the reader just listed these folders), ``info`` for a path the listing lacks."""
    fs = fsref.fs
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        by_dir.setdefault(posixpath.dirname(p), []).append(p)
    out = []
    for d, members in by_dir.items():
        try:
            listed = {e["name"].rstrip("/"): e for e in fs.ls(d, detail=True)}
        except (FileNotFoundError, NotADirectoryError):
            listed = {}
        for p in members:
            info = listed.get(p.rstrip("/")) or listed.get(fs._strip_protocol(p)) or fs.info(p)
            tag = next((info[t] for t in _TAGS if info.get(t) not in (None, "")), None)
            if tag is None:
                return None
            out.append((fsref.url(p), int(info.get("size") or 0), str(tag)))
    return out


def _load(summary: str) -> tuple[list[Shard], list] | None:
    try:
        with open(summary) as f:
            data = json.load(f)
    except (OSError, ValueError):  # absent, unreadable, or damaged by something outside gq: scan again
        return None
    if data.get("version") != SUMMARY_VERSION:
        return None
    shards = [Shard(**{**s, "row_groups": tuple(s["row_groups"]), "columns": tuple(s["columns"]),
                       "token_shapes": tuple(tuple(t) for t in s["token_shapes"])}) for s in data["shards"]]
    return shards, [tuple(p) for p in data["problems"]]


def _store(summary: str, found: tuple[list[Shard], list]) -> None:
    """Write the summary atomically (gq_model.storage.write_atomic); a failed write only costs the cache."""
    shards, problems = found
    try:
        write_atomic(summary, json.dumps({"version": SUMMARY_VERSION, "shards": [dataclasses.asdict(s) for s in shards],
                                          "problems": [list(p) for p in problems]}).encode("utf-8"))
    except OSError as e:
        warnings.warn(f"cannot write the footer summary {summary} ({e}); the next start reads the footers again",
                      stacklevel=4)
