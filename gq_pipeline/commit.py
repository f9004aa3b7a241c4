"""Commit one finished unit: stage its files, create its commit record, publish them (docs/token-format.md).

The whole commit protocol lives here, the way Ray Data's ``Datasink`` keeps its lifecycle in one place: every write
that makes a unit "done", and the roll-forward that finishes a commit a crash interrupted. What the files and the
record contain is :mod:`gq_pipeline.writers`' (built in memory, no I/O); every path name, staging folders' too, is
:mod:`gq_pipeline.layout`'s; the listing of what is committed is :mod:`gq_pipeline.commitset`'s, shared with the
readers and ``gq gc`` (roll-forward reads it). Whoever
produced the unit's rows (a worker that tokenized it, or a plugin sink) commits them through here. The steps, and
why in this order:

1. every file is written under ``.gq/staging/<attempt>/`` (``attempt`` = ``<unit_id>.<random hex>``, unique per
   try), where no plain reader of the output looks, so a crash here leaves nothing visible;
2. the record ``.gq/units/<unit_id>.json`` is created: the commit point (:func:`create_record`, a conditional
   create, so of two writers of one unit only the first wins);
3. the staged files are published to their final names (local rename; object stores copy + delete). A crash here
   leaves a committed unit whose files :func:`roll_forward` publishes (next run, ``gq gc``); gq's readers read the
   staged copy meanwhile.

If the record already exists (another run committed this unit first), this try's staged files are discarded and
the existing record stands: the unit is counted once, with the other run's bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gq_model.storage import create_exclusive, is_local_fs, put_atomic, read_versioned, replace_if_match
from gq_pipeline.commitset import TornRecordError, parse_record, staged_files
from gq_pipeline.layout import CURRENT, Layout, attempt_unit, new_attempt
from gq_pipeline.writers import CompleteUnit, ShardContext, UnitFiles, unit_files

if TYPE_CHECKING:
    from gq_pipeline.manifest import OutputStore

__all__ = ["commit_unit", "stage_files", "stage_unit", "commit_staged", "create_record", "publish_unit",
           "discard_unit", "StagedUnit", "record_bytes", "publish", "remove_tree", "roll_forward", "RollForward"]


@dataclass
class StagedUnit:
    """A unit whose files are staged and whose record is built but not yet created."""

    attempt: str
    files: list[str]  # final relpaths, each staged under .gq/staging/<attempt>/
    record: dict[str, Any]
    hist: np.ndarray | None


def record_bytes(record: dict[str, Any]) -> bytes:
    """A commit record as stored: the one serialisation, so equal records are equal bytes."""
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")


# ------------------------------------------------------------------------------------------ step 1: stage
def stage_files(store: "OutputStore", built: UnitFiles) -> StagedUnit:
    """Write a unit's files under a fresh staging folder (one PUT each on object stores, an fsynced rename locally)."""
    attempt = new_attempt(built.unit_id)
    for rel, data in built.files:
        path = store.path(store.layout.staged(attempt, rel))
        if store.local:
            store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        put_atomic(store.fs, path, data)
    return StagedUnit(attempt, [rel for rel, _ in built.files], built.record, built.hist)


def stage_unit(store: "OutputStore", ctx: ShardContext, formats: tuple[str, ...], done: CompleteUnit) -> StagedUnit:
    """Build a complete unit's files and record (:func:`gq_pipeline.writers.unit_files`) and stage them."""
    return stage_files(store, unit_files(ctx, formats, done))


# ------------------------------------------------------------------------------------ step 2: the record
_CREATED, _SAME, _TAKEN = "created", "same", "taken"


def _supersedes(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """``new`` commits more of the same unit than ``old``: every format ``old`` has and its latents, and more."""
    more_formats = set(old.get("formats", ())) <= set(new.get("formats", ()))
    more_latents = bool(new.get("latents")) or not old.get("latents")
    return more_formats and more_latents and (set(new.get("formats", ())) != set(old.get("formats", ()))
                                              or bool(new.get("latents")) != bool(old.get("latents")))


def _create(store: "OutputStore", record: dict[str, Any]) -> str:
    path = store.path(store.layout.record(record["unit_id"]))
    data = record_bytes(record)
    if create_exclusive(store.fs, path, data):
        return _CREATED
    got = read_versioned(store.fs, path)
    if got is None:  # removed between the two calls (a gc of a broken record): nobody holds the unit now
        return _CREATED if create_exclusive(store.fs, path, data) else _TAKEN
    blob, version = got
    try:
        old = json.loads(blob)
    except ValueError:
        old = None
    if blob == data or old == json.loads(data):
        return _SAME
    if old is not None and not _supersedes(record, old):
        return _TAKEN
    return _CREATED if replace_if_match(store.fs, path, data, version) is not None else _TAKEN


def create_record(store: "OutputStore", record: dict[str, Any]) -> bool:
    """The commit point: from now on the unit is done. True if this call wrote the record, False if the unit was
    already committed (by another run, or by an earlier attempt of this commit), which the caller must not count
    again.

    The record is created conditionally (``gq_model.storage.create_exclusive``), so of two writers of one unit only
    the first wins. The one exception is a record this one supersedes: the same unit committed with fewer formats
    or without latents, which a rerun with more asks for; it is replaced by a compare-and-swap on the version read,
    so a concurrent change wins over us rather than being overwritten."""
    return _create(store, record) == _CREATED


# ------------------------------------------------------------------------------------ step 3: publish
def publish(fs, src: str, dst: str) -> None:
    """Move a staged file to its final name. Local: ``os.replace`` (atomic, same file system). Object stores: a
    server-side copy then a delete of the staged object (the copy appears whole, like any PUT). A staged file that
    is gone while its final name exists was published by a concurrent roll-forward: that is success."""
    try:
        if is_local_fs(fs):
            os.makedirs(posixpath.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        else:
            fs.copy(src, dst)
            fs.rm_file(src)
    except FileNotFoundError:
        # A roll-forward in another process (gq gc, a run starting) published this committed file first.
        if not fs.exists(dst):
            raise


def remove_tree(fs, path: str) -> None:
    """Remove a staged attempt folder (missing is fine: another process may have finished it)."""
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def publish_unit(store: "OutputStore", staged: StagedUnit) -> None:
    """Move the staged files to their final names, then drop the staging folder."""
    for rel in staged.files:
        publish(store.fs, store.path(store.layout.staged(staged.attempt, rel)), store.path(rel))
    remove_tree(store.fs, store.path(store.layout.staging, staged.attempt))


def discard_unit(store: "OutputStore", staged: StagedUnit) -> None:
    remove_tree(store.fs, store.path(store.layout.staging, staged.attempt))


# -------------------------------------------------------------------------------------------- all three
def commit_staged(store: "OutputStore", staged: StagedUnit) -> bool:
    """Steps 2 and 3: create the record (the commit point), then publish. False when another run had created a
    different record of this unit first: that one stands, this try's staged files are discarded and nothing of it
    is visible, and the caller must not count the unit.

    A byte-identical record is an earlier attempt of this same unit (a worker that died after its record, before
    publishing): names and bytes are deterministic, so this try publishes its files and the unit counts once, in
    place of the attempt whose outcome was lost."""
    if _create(store, staged.record) == _TAKEN:
        discard_unit(store, staged)
        return False
    publish_unit(store, staged)
    return True


def commit_unit(store: "OutputStore", ctx: ShardContext, formats: tuple[str, ...], done: CompleteUnit
                ) -> tuple[dict[str, Any], np.ndarray | None]:
    """Build, stage, commit and publish a complete unit.

    Returns (record, token histogram of this unit). When another run had already created the record, this try's
    files are discarded and (that record, None) is returned, so the other run's tokens are not counted twice."""
    staged = stage_unit(store, ctx, formats, done)
    if not commit_staged(store, staged):
        return store.read_record(done.unit.unit_id), None
    return staged.record, staged.hist


# --------------------------------------------------------------------------- finishing an interrupted commit
def sha256_of(fs, path: str) -> str:
    """A staged or published file's sha256, streamed (shards can be large), to compare with its record's."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class RollForward:
    """What :func:`roll_forward` did (or, with ``dry_run``, would do); paths relative to the output root."""

    published: list[str] = field(default_factory=list)       # staged files of committed units, now at their names
    cleaned: list[str] = field(default_factory=list)         # staging folders of committed units, removed
    mismatched: list[str] = field(default_factory=list)      # staged files whose bytes the record does not vouch for
    uncommitted: list[str] = field(default_factory=list)     # staging folders of units without a record (left)


def roll_forward(fs, root: str, records: dict[str, dict[str, Any]], dry_run: bool = False,
                 layout: Layout = CURRENT) -> RollForward:
    """Publish the staged files of committed units (a crash between record and publish), then drop their staging.

    A staged file is published only if its sha256 is the one its record names, and only if the final file is
    missing or differs; folders of units that have no record are left alone (a live run may be writing them:
    ``gq gc`` removes them when the output is not leased).
    """
    report = RollForward()
    staged = staged_files(fs, root, layout)
    # The record of a unit with staged files is read from units/ itself, never from the manifest's cache: a record
    # replaced since the manifest was written (a format added) names files the cached copy does not.
    records = dict(records)
    for uid in sorted({attempt_unit(a) for a in staged}):
        try:
            path = posixpath.join(root, layout.record(uid))
            records[uid] = parse_record(path, fs.cat_file(path))
        except (FileNotFoundError, TornRecordError):
            records.pop(uid, None)
    expected = {}
    for r in records.values():
        for s in r.get("shards", ()):
            expected[(r["unit_id"], s["path"])] = s.get("sha256")
        if r.get("errors_file"):
            expected[(r["unit_id"], r["errors_file"])] = r.get("errors_sha256")
    for attempt, rels in sorted(staged.items()):
        uid = attempt_unit(attempt)
        folder = posixpath.join(root, layout.staging, attempt)
        if uid not in records:
            report.uncommitted.append(f"{layout.staging}/{attempt}")
            continue
        suspect = False
        for rel in sorted(rels):
            if (uid, rel) not in expected:
                continue  # a temporary, or a file this record does not cover: removed with the folder
            src, dst = posixpath.join(folder, rel), posixpath.join(root, rel)
            want = expected[(uid, rel)]
            try:
                have = sha256_of(fs, src)
            except FileNotFoundError:
                continue
            if want is not None and have != want:
                report.mismatched.append(layout.staged(attempt, rel))
                suspect = True
                continue
            try:
                final_ok = fs.exists(dst) and (want is None or sha256_of(fs, dst) == want)
            except FileNotFoundError:
                final_ok = False
            if final_ok:
                continue
            report.published.append(rel)
            if not dry_run:
                publish(fs, src, dst)
        if suspect:  # kept for a person to look at: bytes the record does not vouch for
            continue
        report.cleaned.append(f"{layout.staging}/{attempt}")
        if not dry_run:
            remove_tree(fs, folder)
    return report
