"""The commit set of an output, as its readers see it: which records exist, which files they commit, and where
staged files wait. The write side of the same protocol (staging, the record's creation, publishing, roll-forward)
is :mod:`gq_pipeline.commit`'s.

One home for the rules that the writer, the readers (:mod:`gq_pipeline.shards`) and ``gq gc`` share
(docs/token-format.md, "Staging"):

* a unit's files are first written under ``.gq/staging/<attempt>/<final relpath>`` (``attempt`` =
  ``<unit_id>.<random hex>``, :func:`gq_pipeline.layout.new_attempt`, unique per try, so two tries of one unit never
  touch each other's staged files);
* its record ``.gq/units/<unit_id>.json`` is then created: the commit point;
* then each staged file is *published* to its final name.

Paths are those of :mod:`gq_pipeline.layout` (``layout`` arguments: the output's version; version 1 outputs used
``.staging/`` and ``units/`` at the root). Staging lies under ``.gq``, which every plain reader skips when pointed
at the output root, and outside ``parquet/`` and ``webdataset/``, so every file a plain reader lists there is
committed. A committed unit whose files are still staged (a crash between record and publish) is read from its
staged copy by gq's own readers (:func:`staged_files`) until a roll-forward publishes it.
"""
from __future__ import annotations

import json
import posixpath
from typing import Any

from gq_pipeline.layout import CURRENT, Layout

__all__ = ["TornRecordError", "parse_record", "read_records",
           "staged_files", "committed_paths", "uncommitted_files"]


class TornRecordError(ValueError):
    """A ``units/*.json`` that is not a whole commit record (cut short, or not gq's): named, with what to do."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"commit record {path} is damaged ({problem}): rerun gq tokenize with the same inputs, "
                         f"which redoes that unit and replaces the record, or delete the file (its unit is then "
                         f"uncommitted, and gq gc removes its shards)")
        self.path = path


def parse_record(path: str, blob: bytes) -> dict[str, Any]:
    """A commit record's JSON, or :class:`TornRecordError` when it is not a whole record of the unit it names."""
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
                rec = parse_record(p, blob)
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
