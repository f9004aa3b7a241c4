"""Planning (on the driver): resolve input names into deterministic work units.

A *unit* is the smallest thing that is committed or redone: one WebDataset tar, one Parquet file, or up to
``unit_size`` image files of one directory (the directory's sorted listing cut into consecutive runs). Units never
span directories, so adding files to one directory leaves the unit ids (and committed work) of the others intact.

A ``list`` unit is a run of ``unit_size`` rows of an ``--input-list`` (:mod:`gq_pipeline.input_list`), generated
lazily and read back from the plan persisted under the output (:mod:`gq_pipeline.plan_store`).

Listing never stats a file and never fetches sizes: directories are listed breadth-first, ``LIST_THREADS`` at a
time (one request per page of names on object stores); a brace pattern costs one listing per parent prefix, not a
request per URL. A listing that fails anywhere stops the plan (:class:`ListingError`): nothing is skipped. Hidden
names (leading ``.``, e.g. macOS ``._x.jpg`` resource forks) are skipped; so are entries that are not regular files
(FIFOs, sockets, devices, dangling symlinks, symlinked directories), counted in ``Plan.skipped``: a FIFO named
``x.jpg`` would block its reader for ever. Files of formats Pillow decodes but gq does not take by default (``.ico``,
``.ppm``, ``.tga``, ...) are counted in ``Plan.ignored_decodable``; ``extensions`` widens the set.

Planning is the driver's half of the inputs; reading a unit's bytes is the workers' half (:mod:`gq_pipeline.sources`,
which holds :class:`~gq_pipeline.sources.Unit` and what both halves share). This module imports that one and never
the other way round: each half reads on its own, and a read task never imports listing code it does not run.
"""
from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import stat
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec

from gq_model.storage import is_local_fs
from gq_pipeline.records import IMAGE_EXTENSIONS, PARQUET_EXTENSIONS, TAR_EXTENSIONS, printable
from gq_pipeline.sources import Unit, file_extension, get_fs, image_extensions, in_process_reads, to_url

__all__ = ["Plan", "ListingError", "plan_units", "list_input_files", "ignored_counts", "ignored_note",
           "pillow_extensions"]

_MAGIC = re.compile(r"[*?\[]")


class ListingError(RuntimeError):
    """A listing request failed while planning: the plan would miss inputs, so the run stops and names the prefix."""


@dataclass
class Plan:
    """The units of a run's inputs.

    ``units`` (a list) holds what was listed: folders, globs, tars, Parquet files, brace patterns; it is what
    :func:`gq_pipeline.replan.reconcile_with_committed` takes. ``list_units`` holds the units of ``--input-list``,
    generated lazily as it is iterated (:class:`gq_pipeline.plan_store.ListUnits`; empty without a list); their ids
    are content hashes of fixed row ranges, so they never need reconciling. :meth:`iter_units` chains both.
    ``listed`` and ``ignored`` count names listed; a list's rows are in ``list_units.rows`` once it was iterated.
    """

    units: list[Unit]
    ignored: int = 0
    ignored_examples: list[str] = field(default_factory=list)
    listed: int = 0
    list_s: float = 0.0
    list_units: Any = ()
    reused: list[str] = field(default_factory=list)  # inputs planned from a persisted plan, not listed
    skipped: int = 0  # listed entries that are not regular files (FIFOs, sockets, dangling links, ...)
    skipped_examples: list[str] = field(default_factory=list)
    ignored_decodable: int = 0  # of ``ignored``: files Pillow could decode (add their extension with ``extensions``)
    ignored_by_extension: dict[str, int] = field(default_factory=dict)

    def iter_units(self) -> Iterator[Unit]:
        yield from self.units
        yield from self.list_units


def pillow_extensions() -> frozenset[str]:
    """Extensions of the formats this Pillow can open (``.ico``, ``.ppm``, ``.tga``, ``.psd``, ``.dds``, ...)."""
    global _PILLOW_EXTENSIONS
    if _PILLOW_EXTENSIONS is None:
        from PIL import Image

        _PILLOW_EXTENSIONS = frozenset(e.lstrip(".").lower() for e, fmt in Image.registered_extensions().items()
                                       if fmt in Image.OPEN)
    return _PILLOW_EXTENSIONS


_PILLOW_EXTENSIONS: frozenset[str] | None = None


def ignored_counts(plan: Plan) -> dict[str, Any]:
    """The summary's account of listed names that are not inputs: ``ignored_decodable`` (files of a format Pillow
    decodes but gq does not take without ``--extensions``) with their counts per extension, and ``skipped_files``
    (entries that are not regular files)."""
    decodable = {e: n for e, n in sorted(plan.ignored_by_extension.items()) if e in pillow_extensions()}
    return {"ignored_decodable": plan.ignored_decodable, "ignored_decodable_by_extension": decodable,
            "skipped_files": plan.skipped}


def ignored_note(plan: Plan) -> str:
    """One progress line about decodable formats left out and non-regular entries skipped ("" when none)."""
    notes = []
    if plan.ignored_decodable:
        exts = ", ".join(f".{e} ({n})" for e, n in ignored_counts(plan)["ignored_decodable_by_extension"].items())
        notes.append(f"{plan.ignored_decodable} ignored files are images Pillow can decode ({exts}): add them with "
                     f"--extensions {' '.join(ignored_counts(plan)['ignored_decodable_by_extension'])}")
    if plan.skipped:
        notes.append(f"{plan.skipped} entries that are not regular files (FIFOs, sockets, dangling links, "
                     f"symlinked folders) skipped, e.g. {plan.skipped_examples[0]}")
    return "; ".join(notes)


def _expand_braces(url: str) -> list[str]:
    if "{" not in url:
        return [url]
    try:
        import braceexpand
    except ImportError:  # webdataset depends on it; without it braces are taken literally
        return [url]
    return list(braceexpand.braceexpand(url))


def _non_magic_prefix(path: str) -> str:
    parts = path.split("/")
    keep = []
    for p in parts:
        if _MAGIC.search(p):
            break
        keep.append(p)
    return "/".join(keep)


def list_input_files(inputs: str | list[str], storage_options: dict | None = None, *,
                     kinds: tuple[str, ...] = ("files", "tar", "parquet"),
                     extensions: tuple[str, ...] | list[str] | None = None, in_process: bool = False) -> list[str]:
    """The file URLs ``gq tokenize`` would read for ``inputs`` (folders, globs, brace patterns, files), sorted.

    The one listing layer: training data (``jobs/training/data.py``) and ``gq eval`` list through the planner, so
    all three agree on what an input holds: the same extensions, hidden names skipped, FIFOs and dangling links
    skipped, brace patterns, storage options per URL. ``kinds`` keeps image files (``files``), tar shards (``tar``)
    and Parquet files (``parquet``). ``in_process``: the caller reads the files in this process, so ``memory://``
    is allowed (other processes cannot see it, which is why the pipeline refuses it)."""
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    with in_process_reads() if in_process else contextlib.nullcontext():
        plan = plan_units([os.fspath(s) for s in specs], unit_size=1 << 30, storage_options=storage_options,
                          extensions=extensions)
    out: list[str] = []
    for u in plan.units:
        if u.kind not in kinds:
            continue
        if u.kind == "files":
            base = u.source.rstrip("/")
            out.extend(f"{base}/{name}" for name in u.files)
        else:
            out.append(u.source)
    return sorted(out)


def plan_units(inputs: list[str], unit_size: int = 1000, storage_options: dict | None = None, *,
               input_list: str | None = None, input_list_column: str | None = None, plan_dir: str | None = None,
               relist: bool = False, extensions: tuple[str, ...] | list[str] | None = None) -> Plan:
    """List every input and cut it into units (sorted, de-duplicated by file URL); add ``input_list``'s units.

    ``extensions`` adds image file extensions to :data:`~gq_pipeline.records.IMAGE_EXTENSIONS` (``["ico", "ppm"]``).
    ``plan_dir`` (the output's ``_plan`` directory) is where plans are persisted (:mod:`gq_pipeline.plan_store`);
    an input list needs one. ``relist`` ignores persisted plans. A listing that fails anywhere raises
    :class:`ListingError` naming the prefix; a brace pattern naming a file that does not exist raises
    ``FileNotFoundError`` naming it (found from one listing of its parent, not a request per file).
    """
    if unit_size < 1:
        raise ValueError(f"unit_size must be >= 1, got {unit_size}")
    if not inputs and not input_list:
        raise ValueError("no --input or --input-list given")
    t0 = time.perf_counter()
    plan = Plan(units=[])
    ctx = _PlanContext(plan, storage_options, plan_dir, relist, image_exts=image_extensions(extensions))
    with ThreadPoolExecutor(LIST_THREADS, thread_name_prefix="gq-list") as pool:
        ctx.pool = pool
        for raw in inputs:
            raw = str(raw)
            urls = _expand_braces(raw)
            if "{" in raw and urls != [raw]:
                _plan_brace(ctx, raw, urls)
            else:
                _plan_one(ctx, raw)
    for d, (prefix, names) in ctx.by_dir.items():
        ordered = sorted(names)
        for i in range(0, len(ordered), unit_size):
            plan.units.append(Unit("files", d, tuple(ordered[i:i + unit_size]), prefix))
    plan.units.extend(Unit(kind, url, prefix="") for url, kind in ctx.shard_urls.items())
    plan.units.sort(key=lambda u: (u.source, u.files[:1]))
    if input_list:
        from gq_pipeline.input_list import open_input_list
        from gq_pipeline.plan_store import ListUnits

        if not plan_dir:
            raise ValueError("an --input-list is planned into the output (its _plan/ directory): pass plan_dir")
        plan.list_units = ListUnits(open_input_list(input_list, storage_options, input_list_column), unit_size,
                                    plan_dir, storage_options, relist)
    plan.list_s = time.perf_counter() - t0
    return plan


LIST_THREADS = 16  # listing requests in flight at once (one per directory / prefix)


@dataclass
class _PlanContext:
    plan: Plan
    storage_options: dict | None
    plan_dir: str | None
    relist: bool
    image_exts: tuple[str, ...] = IMAGE_EXTENSIONS
    pool: Any = None
    by_dir: dict[str, tuple[str, set[str]]] = field(default_factory=dict)  # dir URL -> (prefix, names)
    shard_urls: dict[str, str] = field(default_factory=dict)  # url -> kind
    fresh: set[int] = field(default_factory=set)

    def fs(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """``get_fs`` with the listing cache cleared once per filesystem per plan (fsspec instances are shared per
        process: never plan from a stale listing, never pay for clearing it per URL)."""
        fs, path = get_fs(url, self.storage_options)
        if id(fs) not in self.fresh:
            fs.invalidate_cache()
            self.fresh.add(id(fs))
        return fs, path

    def classify(self, fs, root_path: str, d: str, names: list[str]) -> None:
        _classify(self.plan, fs, root_path, d, names, self.by_dir, self.shard_urls, self.image_exts)

    def skip(self, fs, d: str, names: list[str]) -> None:
        _count_skipped(self.plan, fs, d, names)

    def walk(self, fs, root: str, root_path: str) -> None:
        for d, names, skipped in _walk_dirs(fs, root, self.pool, with_skipped=True):
            self.skip(fs, d, skipped)
            if names:
                self.classify(fs, root_path, d, names)


def _plan_one(ctx: _PlanContext, url: str) -> None:
    """One input that is not a brace pattern: a glob, a directory or a file."""
    fs, path = ctx.fs(url)
    root_path = path.rstrip("/") or path
    if _MAGIC.search(path):
        root_path = _non_magic_prefix(path).rstrip("/")
        matches = sorted(fs.glob(path, detail=True).items())
        if not matches:
            raise FileNotFoundError(f"{url}: the pattern matched nothing")
        groups: dict[str, list[str]] = {}
        for p, info in matches:
            kind = _entry_kind(fs, p, info)
            if kind == "directory":
                ctx.walk(fs, p, root_path)
            elif kind == "file":
                d, name = posixpath.split(p)
                groups.setdefault(d, []).append(name)
            else:
                ctx.skip(fs, posixpath.dirname(p), [posixpath.basename(p)])
        for d, names in groups.items():
            ctx.classify(fs, root_path, d, names)
    elif fs.isdir(path):
        ctx.walk(fs, root_path, root_path)
    elif fs.exists(path):
        if is_local_fs(fs) and _entry_kind(fs, path, {"type": "other"}) == "other":
            ctx.skip(fs, posixpath.dirname(path), [posixpath.basename(path)])
            return
        ctx.classify(fs, posixpath.dirname(root_path), posixpath.dirname(path), [posixpath.basename(path)])
    else:
        raise FileNotFoundError(f"{url}: no such file or directory")


def _plan_brace(ctx: _PlanContext, raw: str, urls: list[str]) -> None:
    """A brace pattern: one listing per parent prefix (in parallel) instead of a stat per URL.

    Every URL it names must exist: a missing one is an error here, at plan time, naming it (a pattern is a promise
    that those files exist; a typo in a range must not pass as a smaller dataset). A pattern that named files only
    is persisted (``_plan/inputs/``), so a rerun classifies the same files without listing.
    """
    files = None if ctx.relist else _load_brace_plan(ctx, raw)
    if files is not None:
        ctx.plan.reused.append(raw)
        _classify_urls(ctx, files)
        return
    by_parent: dict[tuple[int, str], tuple[Any, list[tuple[str, str]]]] = {}
    for url in urls:
        if _MAGIC.search(url):
            _plan_one(ctx, url)
            continue
        fs, path = _fs_like(ctx, url)
        parent, name = posixpath.split(path.rstrip("/"))
        by_parent.setdefault((id(fs), parent), (fs, []))[1].append((url, name))
    keys = list(by_parent)
    listings = ctx.pool.map(lambda k: _list_parent(by_parent[k][0], k[1]), keys)
    missing: list[str] = []
    found: list[str] = []
    walks = []
    for key, (files_here, dirs_here) in zip(keys, listings):
        fs, entries = by_parent[key]
        names, subdirs = set(files_here), {posixpath.basename(d.rstrip("/")): d for d in dirs_here}
        parent = key[1]
        hits = []
        for url, name in entries:
            if name in names:
                hits.append(name)
                found.append(url)
            elif name in subdirs:
                walks.append((fs, subdirs[name]))
            else:
                missing.append(url)
        if hits:
            ctx.classify(fs, parent, parent, hits)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{raw}: {len(missing)} of the {len(urls)} paths it names do not exist: "
                                f"{', '.join(missing[:5])}{more}")
    for fs, d in walks:
        ctx.walk(fs, d.rstrip("/") or d, d.rstrip("/") or d)
    if not walks and not any(_MAGIC.search(u) for u in urls):
        from gq_pipeline.plan_store import save_brace_plan

        save_brace_plan(ctx.plan_dir, raw, found, ctx.storage_options)


def _fs_like(ctx: _PlanContext, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``ctx.fs`` without parsing options again for every URL of a large pattern (one filesystem per protocol)."""
    proto = url.split("://", 1)[0] if "://" in url else "file"
    cache = ctx.__dict__.setdefault("_by_proto", {})
    if proto not in cache:
        cache[proto] = ctx.fs(url)[0]
    fs = cache[proto]
    return fs, fs._strip_protocol(url)


def _load_brace_plan(ctx: _PlanContext, raw: str) -> list[str] | None:
    from gq_pipeline.plan_store import load_brace_plan

    return load_brace_plan(ctx.plan_dir, raw, ctx.storage_options)


def _classify_urls(ctx: _PlanContext, urls: list[str]) -> None:
    groups: dict[tuple[int, str], tuple[Any, list[str]]] = {}
    for url in urls:
        fs, path = _fs_like(ctx, url)
        d, name = posixpath.split(path)
        groups.setdefault((id(fs), d), (fs, []))[1].append(name)
    for (_, d), (fs, names) in groups.items():
        ctx.classify(fs, d, d, names)


def _list_parent(fs: fsspec.AbstractFileSystem, parent: str) -> tuple[list[str], list[str]]:
    """A brace pattern's parent prefix: (file names, sub-directory paths); a parent that does not exist holds
    nothing (its URLs are then reported missing)."""
    try:
        return _list_dir(fs, parent)[:2]
    except ListingError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return [], []
        raise


def _entry_kind(fs, path: str, info: dict) -> str:
    """``file``, ``directory`` or ``other`` (not listed as an input). Local entries are checked with ``os.stat``,
    following links: a symlink to a file is a file, a FIFO or a dangling link is ``other``; a symlink loop counts as
    a file, so that reading it gives that file's error record instead of hiding it."""
    t = info.get("type")
    if not is_local_fs(fs) or t == "directory":
        return t if t in ("file", "directory") else "other"
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return "file" if e.errno == errno.ELOOP else "other"
    return "directory" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def _count_skipped(plan: Plan, fs, d: str, names: list[str]) -> None:
    for name in names:
        if name.startswith("."):
            continue
        plan.skipped += 1
        if len(plan.skipped_examples) < 5:
            plan.skipped_examples.append(printable(f"{to_url(fs, d).rstrip('/')}/{name}"))


def _classify(plan: Plan, fs, root_path: str, d: str, names: list[str], by_dir: dict, shard_urls: dict,
              image_exts: tuple[str, ...] = IMAGE_EXTENSIONS) -> None:
    """Sort one directory's file names into image files, tars and Parquet files (URL built once per directory)."""
    plan.listed += len(names)
    dir_url = to_url(fs, d).rstrip("/")
    images = None
    for name in names:
        if name.startswith("."):
            continue
        ext = file_extension(name)
        if ext in image_exts:
            if images is None:
                rel = posixpath.relpath(d, root_path) if root_path and d.startswith(root_path) else ""
                images = by_dir.setdefault(dir_url, ("" if rel == "." else rel, set()))[1]
            images.add(name)
        elif ext in TAR_EXTENSIONS:
            shard_urls[f"{dir_url}/{name}"] = "tar"
        elif ext in PARQUET_EXTENSIONS:
            shard_urls[f"{dir_url}/{name}"] = "parquet"
        else:
            plan.ignored += 1
            plan.ignored_by_extension[ext] = plan.ignored_by_extension.get(ext, 0) + 1
            if ext in pillow_extensions():
                plan.ignored_decodable += 1
            if len(plan.ignored_examples) < 5:
                plan.ignored_examples.append(printable(f"{dir_url}/{name}"))


def _list_dir(fs: fsspec.AbstractFileSystem, d: str) -> tuple[list[str], list[str], list[str]]:
    """One directory: (file names, sub-directory paths, names skipped as not regular files). Local: ``os.scandir``
    (d_type, a stat only for symlinks; symlinked directories are not followed, as ``os.walk`` does not; a symlink
    loop is listed as a file so that reading it records it). Elsewhere: one ``fs.ls`` (paginated listings of 1000
    names per request on S3/GCS, the index page over HTTP). Any failure is a :class:`ListingError` naming ``d``."""
    try:
        files, dirs, skipped = [], [], []
        if is_local_fs(fs):
            with os.scandir(d) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        dirs.append(e.path)
                        continue
                    try:
                        regular = e.is_file()
                    except OSError as err:  # ELOOP: recorded when read
                        regular = err.errno == errno.ELOOP
                    (files if regular else skipped).append(e.name)
            return files, dirs, skipped
        for e in fs.ls(d, detail=True):
            name = e["name"]
            if e.get("type") == "directory":
                if name.rstrip("/") != d.rstrip("/"):
                    dirs.append(name)
            elif e.get("type", "file") == "file":
                files.append(posixpath.basename(name))
            else:
                skipped.append(posixpath.basename(name))
        return files, dirs, skipped
    except Exception as e:
        raise ListingError(f"listing {to_url(fs, d)} failed ({type(e).__name__}: {e}); planning stops rather than "
                           f"leave out what it holds: fix its access, or leave it out of --input") from e


def _walk_dirs(fs: fsspec.AbstractFileSystem, root: str, pool=None, with_skipped: bool = False) -> Iterator[tuple]:
    """(directory path, file names) for every directory under ``root``, hidden directories skipped; with
    ``with_skipped``, (path, file names, names that are not regular files) for every directory that holds either.

    Directories are listed in parallel (``LIST_THREADS`` at once, one request per directory or page): a bucket's
    prefixes are walked breadth-first instead of one after another. A failed listing anywhere raises
    :class:`ListingError` (never skipped: a skipped prefix would silently shrink the dataset).
    """
    own = pool is None
    if own:
        pool = ThreadPoolExecutor(LIST_THREADS, thread_name_prefix="gq-list")
    pending = {pool.submit(_list_dir, fs, root): root}
    try:
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                d = pending.pop(fut)
                files, dirs, skipped = fut.result()
                for sub in sorted(dirs):
                    if not posixpath.basename(sub.rstrip("/")).startswith("."):
                        pending[pool.submit(_list_dir, fs, sub)] = sub
                if with_skipped and (files or skipped):
                    yield d, files, skipped
                elif files and not with_skipped:
                    yield d, files
    finally:
        for fut in pending:
            fut.cancel()
        if own:
            pool.shutdown(wait=True)
