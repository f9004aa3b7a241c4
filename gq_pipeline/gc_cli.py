"""``gq gc OUTPUT``: remove what no commit record covers, and finish commits a crash interrupted.

An output's truth is its commit set (``.gq/units/*.json``, docs/token-format.md; paths from
:mod:`gq_pipeline.layout`, version-1 outputs keep ``units/``, ``errors/``, ``.staging/`` and ``_lease.json`` at the
root and are collected the same way). Everything else under ``parquet/``, ``webdataset/`` and the errors folder is an
orphan: a shard written by a run killed before its record (older gq versions wrote shards in place), a copy planted
by hand, or the shard of a unit whose record was deleted. Under the staging folder, the folders of committed units
are rolled forward (their files published, checked against the record's sha256) and those of uncommitted units are
stale. Temporaries (``*.tmp-*``) of killed writes go too.

Removing a staged folder is only safe when no run is writing: gc refuses while the output's lease is live
(``expires_at`` in the future) unless ``--force``. Files gc does not recognise (no gq shard name) are kept and
listed. ``--dry-run`` prints the same plan and changes nothing.
"""
from __future__ import annotations

import argparse
import json
import posixpath
import sys
import time
from dataclasses import asdict, dataclass, field

from gq_pipeline import layout as _layout
from gq_pipeline.lease import LeaseHeldError, describe_owner, read_lease

__all__ = ["GcReport", "LeaseHeldError", "collect_garbage", "add_parser", "run"]

DATA_DIRS = _layout.CURRENT.file_dirs


@dataclass
class GcReport:
    output: str
    dry_run: bool
    committed_units: int = 0
    rolled_forward: list[str] = field(default_factory=list)   # staged files of committed units, published
    orphans: list[str] = field(default_factory=list)          # shard / error files no record covers
    stale_staging: list[str] = field(default_factory=list)    # .staging folders (uncommitted, or already published)
    temporaries: list[str] = field(default_factory=list)      # *.tmp-* of killed writes
    kept_unknown: list[str] = field(default_factory=list)     # files gc does not recognise: left alone
    damaged: list[str] = field(default_factory=list)          # committed files found neither published nor staged
    mismatched: list[str] = field(default_factory=list)       # staged files whose bytes their record does not vouch for

    @property
    def removed(self) -> list[str]:
        return self.orphans + self.stale_staging + self.temporaries


def _live_lease(fs, root: str, now: float, lay: _layout.Layout = _layout.CURRENT) -> dict | None:
    """The output's lease (``gq_pipeline.lease``) if it is live, ``expires_at`` later than ``now``; an unreadable
    lease counts as live."""
    lease = read_lease(fs, root, lay.lease)
    if lease is None:
        return None
    try:
        return lease if float(lease["expires_at"]) > now else None
    except (KeyError, TypeError, ValueError):
        return {"owner": "?", "expires_at": None, "unreadable": True}


def _ls(fs, path: str) -> list[str]:
    try:
        return [p.rstrip("/") for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


def collect_garbage(output: str, *, dry_run: bool = False, force: bool = False,
                    storage_options: dict | None = None) -> GcReport:
    """Roll committed units forward, then remove orphans, stale staging and temporaries (see the module doc)."""
    from gq_pipeline.commit import remove_tree, roll_forward
    from gq_pipeline.commitset import committed_paths, read_records, staged_files
    from gq_pipeline.sources import get_fs, to_url

    fs, root = get_fs(output, storage_options)
    root = root.rstrip("/")
    fs.invalidate_cache()
    url = to_url(fs, root)
    lay = _layout.detect(fs, root) or _layout.CURRENT
    lease = _live_lease(fs, root, time.time(), lay)
    if lease is not None and not force:
        when = lease.get("expires_at")
        until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when)) if when else "unknown (unreadable lease)"
        owner = describe_owner(lease) if isinstance(lease.get("owner"), dict) else str(lease.get("owner", "?"))
        raise LeaseHeldError(f"{url} is leased by {owner} until {until}: a run may be writing there, and its staged "
                             f"files would be removed. Wait for it, or pass --force if that run is known to be dead",
                             lease)
    records = read_records(fs, root, layout=lay)
    if records is None:
        raise FileNotFoundError(f"{url}: not a gq tokenize output (no {lay.units}/ folder); gc removes only files "
                                f"that commit records prove to be orphans, so it does nothing here")
    report = GcReport(url, dry_run, committed_units=len(records))
    rf = roll_forward(fs, root, records, dry_run=dry_run, layout=lay)
    report.rolled_forward = rf.published
    report.mismatched = rf.mismatched
    report.stale_staging = list(rf.cleaned)  # staging of committed units (removed by roll_forward unless dry_run)
    for folder in rf.uncommitted:  # no lease is live: nobody is writing these
        report.stale_staging.append(folder)
        if not dry_run:
            remove_tree(fs, posixpath.join(root, folder))
    keep = committed_paths(records)
    present = set(rf.published)
    for sub in lay.file_dirs:
        for p in _ls(fs, posixpath.join(root, sub)):
            rel = f"{sub}/{posixpath.basename(p)}"
            name = posixpath.basename(p)
            if ".tmp" in name:
                report.temporaries.append(rel)
            elif rel in keep:
                present.add(rel)
            elif rel == _layout.LEGACY_WIDS_INDEX:
                continue
            elif name.endswith((".parquet", ".tar")):
                report.orphans.append(rel)
            else:
                report.kept_unknown.append(rel)
    meta = posixpath.dirname(lay.units)  # .gq (version 1: the root itself)
    for p in _ls(fs, posixpath.join(root, lay.units)) + _ls(fs, posixpath.join(root, meta) if meta else root):
        name = posixpath.basename(p)
        if ".tmp-" in name:
            report.temporaries.append(posixpath.relpath(p, root))
    report.damaged = sorted(keep - present)
    if not dry_run:
        for rel in report.orphans + report.temporaries:
            try:
                fs.rm_file(posixpath.join(root, rel))
            except FileNotFoundError:
                pass
        if not staged_files(fs, root, lay):
            remove_tree(fs, posixpath.join(root, lay.staging))
    for name in ("orphans", "stale_staging", "temporaries", "kept_unknown", "rolled_forward"):
        setattr(report, name, sorted(set(getattr(report, name))))
    return report


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gc", help="remove files no commit record covers; finish interrupted commits",
                       description="Garbage-collect a gq tokenize output: roll forward committed units whose files "
                                   "are still staged, then remove orphan shards, stale staging folders and "
                                   "temporaries. Refuses while a run holds the output's lease.")
    p.add_argument("output", help="tokenize output root (local path or fsspec URL)")
    p.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    p.add_argument("--force", action="store_true", help="run even though the output's lease says a run holds it "
                                                        "(only when that run is known to be dead)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run)


def format_text(r: GcReport) -> str:
    verb = "would " if r.dry_run else ""
    lines = [f"{r.output}: {r.committed_units} committed unit(s)"]
    for title, items in ((f"{verb}publish (roll forward)", r.rolled_forward), (f"{verb}remove orphan", r.orphans),
                         (f"{verb}remove staging", r.stale_staging), (f"{verb}remove temporary", r.temporaries),
                         ("kept (not a gq file)", r.kept_unknown),
                         ("DAMAGED: committed file missing", r.damaged),
                         ("MISMATCHED: staged bytes differ from the record", r.mismatched)):
        lines += [f"  {title}: {x}" for x in items]
    lines.append(f"  {'would remove' if r.dry_run else 'removed'} {len(r.removed)} item(s), "
                 f"{'would publish' if r.dry_run else 'published'} {len(r.rolled_forward)} file(s)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        report = collect_garbage(args.output, dry_run=args.dry_run, force=args.force)
    except LeaseHeldError as e:
        print(f"gq gc: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(dict(asdict(report), removed=report.removed), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(format_text(report))
    return 1 if report.damaged or report.mismatched else 0
