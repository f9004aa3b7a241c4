"""The commit set of an output: which files are committed, where staged files wait, and how they are published.

One home for the layout rules that the writer (:mod:`gq_pipeline.commit`), the readers (:mod:`gq_pipeline.shards`)
and ``gq gc`` share (docs/token-format.md, "Staging"):

* a unit's files are first written under ``.gq/staging/<attempt>/<final relpath>`` (``attempt`` =
  ``<unit_id>.<random hex>``, unique per try, so two tries of one unit never touch each other's staged files);
* its record ``.gq/units/<unit_id>.json`` is then created: the commit point;
* then each staged file is *published* to its final name (local rename; object stores copy + delete).

Paths are those of :mod:`gq_pipeline.layout` (``layout`` arguments: the output's version; version 1 outputs used
``.staging/`` and ``units/`` at the root). Staging lies under ``.gq``, which every plain reader skips when pointed
at the output root, and outside ``parquet/`` and ``webdataset/``, so every file a plain reader lists there is
committed.

A crash after the record and before publishing leaves a committed unit whose files are still staged: *roll-forward*
(:func:`roll_forward`, at the start of the next run and in ``gq gc``) publishes them, after checking each staged
file against the record's sha256. Until then gq's own readers read the staged copy (:func:`staged_files`).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

from gq_model.storage import is_local_fs
from gq_pipeline.layout import CURRENT, Layout

__all__ = ["STAGING", "UNITS", "WIDS_INDEX", "TornRecordError", "new_attempt", "staged_relpath", "read_records",
           "staged_files", "publish",
           "remove_tree", "roll_forward", "RollForward", "committed_paths", "uncommitted_files"]

# The current layout's names (kept for callers that import them; new code uses gq_pipeline.layout). The wids index
# is not in webdataset/: a directory read there by ray.data.read_webdataset took it for a tar ("truncated header").
STAGING = CURRENT.staging
UNITS = CURRENT.units
WIDS_INDEX = CURRENT.wids_index


def new_attempt(unit_id: str) -> str:
    """A staging folder name for one try at committing ``unit_id`` (the unit id first, so gc can tell whose)."""
    return f"{unit_id}.{uuid.uuid4().hex[:12]}"


def attempt_unit(attempt: str) -> str:
    return attempt.split(".", 1)[0]


def staged_relpath(attempt: str, relpath: str, layout: Layout = CURRENT) -> str:
    return layout.staged(attempt, relpath)


class TornRecordError(ValueError):
    """A ``units/*.json`` that is not a whole commit record (cut short, or not gq's): named, with what to do."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"commit record {path} is damaged ({problem}): rerun gq tokenize with the same inputs, "
                         f"which redoes that unit and replaces the record, or delete the file (its unit is then "
                         f"uncommitted, and gq gc removes its shards)")
        self.path = path


def _parse_record(path: str, blob: bytes) -> dict[str, Any]:
    try:
        rec = json.loads(blob)
    except ValueError as e:
        raise TornRecordError(path, f"not valid JSON: {e}") from None
    uid = posixpath.basename(path)[:-5]
    if not isinstance(rec, dict) or rec.get("unit_id") != uid or not isinstance(rec.get("shards", []), list):
        raise TornRecordError(path, "not a commit record of this unit")
    return rec


def read_records(fs, root: str, manifest: dict | None = None, torn: list[str] | None = None, *,
                 layout: Layout = CURRENT) -> dict[str, dict[str, Any]] | None:
    """Every commit record under ``root`` (``.gq/units/*.json``), or None when the output has no records folder.

    ``units/`` is the truth; ``manifest.json`` is only a cache: a record it lists is taken from it (with the
    output-wide fields it stores once), any other record is read. Pass ``manifest`` when already loaded.

    A record that is not valid JSON (gq creates records whole, so only damage from outside does this: a truncated
    copy, a full disk under a file system without hard links) raises :class:`TornRecordError` naming it; with a
    ``torn`` list, its path is appended there instead and the unit counts as not committed (``gq tokenize`` redoes
    it, and the commit replaces the damaged record).
    """
    units = posixpath.join(root, layout.units)
    try:
        listed = fs.ls(units, detail=False)
    except FileNotFoundError:
        return None
    names = [posixpath.basename(p.rstrip("/")) for p in listed]
    names = [n for n in names if n.endswith(".json") and ".tmp" not in n]
    if manifest is None:
        try:
            manifest = json.loads(fs.cat_file(posixpath.join(root, layout.manifest)))
        except (FileNotFoundError, ValueError):
            manifest = None
    m = manifest or {}
    shared = {k: m[k] for k in ("format_version", "model_fingerprint", "codebook_fingerprint", "preprocess",
                                "codebook_size", "passthrough_schema") if k in m}
    known = {u["unit_id"]: u for u in m.get("units", []) if isinstance(u, dict) and "formats" in u}
    records: dict[str, dict[str, Any]] = {}
    missing = []
    for n in names:
        uid = n[:-5]
        if uid in known:
            records[uid] = {**shared, **known[uid]}
        else:
            missing.append(posixpath.join(units, n))
    if missing:
        for p, blob in fs.cat(missing, on_error="return").items():
            if isinstance(blob, BaseException):
                if isinstance(blob, FileNotFoundError):
                    continue  # removed since the listing
                raise OSError(f"cannot read commit record {p}: {blob}")
            try:
                rec = _parse_record(p, blob)
            except TornRecordError:
                if torn is None:
                    raise
                torn.append(p)
                continue
            records[rec["unit_id"]] = rec
    return records


def committed_paths(records: dict[str, dict[str, Any]]) -> set[str]:
    """Paths (relative to the output root) of every file a record covers: token shards and error files."""
    out = set()
    for r in records.values():
        out.update(s["path"] for s in r.get("shards", ()))
        if r.get("errors_file"):
            out.add(r["errors_file"])
    return out


def uncommitted_files(fs, root: str, records: dict[str, dict[str, Any]], layout: Layout = CURRENT) -> list[str]:
    """Shard and error files under ``parquet/``, ``webdataset/`` and the errors folder that no record covers
    (relpaths): what a plain reader would see beyond the commit set. Temporaries and the wids index are not counted."""
    keep = committed_paths(records)
    out = []
    for sub in layout.file_dirs:
        try:
            listed = fs.ls(posixpath.join(root, sub), detail=False)
        except FileNotFoundError:
            continue
        for p in listed:
            name = posixpath.basename(p.rstrip("/"))
            rel = f"{sub}/{name}"
            if ".tmp" not in name and name.endswith((".parquet", ".tar")) and rel not in keep:
                out.append(rel)
    return sorted(out)


def staged_files(fs, root: str, layout: Layout = CURRENT) -> dict[str, list[str]]:
    """``{attempt: [final relpath, ...]}`` of everything under the staging folder (one recursive listing;
    temporaries of a staged write, ``*.tmp-*``, are listed too so that gc can remove them)."""
    base = posixpath.join(root, layout.staging)
    try:
        found = fs.find(base)
    except FileNotFoundError:
        return {}
    out: dict[str, list[str]] = {}
    for p in found:
        rel = posixpath.relpath(p, base)
        attempt, _, inner = rel.partition("/")
        if inner:
            out.setdefault(attempt, []).append(inner)
    return out


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


def sha256_of(fs, path: str) -> str:
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
            records[uid] = _parse_record(path, fs.cat_file(path))
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
