"""Every path name under a ``gq tokenize`` output, for each layout version (docs/token-format.md, "Layout").

One home for these names, so that the writer, the readers, ``gq gc`` and resume agree on them and a layout change
is made here only.

Version 2 (this gq writes it) keeps the output root to the token data alone::

    OUTPUT/parquet/*.parquet   OUTPUT/webdataset/*.tar   OUTPUT/.gq/...   (everything else)

because the obvious directory read of ``OUTPUT`` must give token rows only. Version 1 put ``errors/*.parquet``,
``units/``, ``manifest.json``, ``webdataset-index.json``, ``_plan/`` and ``_lease.json`` at the root:
``ray.data.read_parquet(OUTPUT)`` then mixed error rows (null tokens) into the token rows, ``pyarrow.dataset`` tried
to read the JSON files as Parquet, and HF ``datasets`` counted them when guessing the format. The one folder
``.gq`` is skipped by every library checked (installed sources): pyarrow.dataset and Ray Data skip paths whose
part below the given folder starts with ``.`` or ``_``; HF ``datasets`` skips ``.``-names and ``__``-folders
(``data_files.py``, not ``_``-folders); DuckDB and polars read only the globs/folders they are given, and a glob
``*`` does not match a leading dot in Python's ``glob``, the shell or DuckDB.

Version 1 outputs stay readable (:func:`detect`); this gq does not write into them (see ``OutputStore``).
"""
from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass

__all__ = ["Layout", "V1", "V2", "CURRENT", "PARQUET", "WEBDATASET", "DATA_DIRS", "META", "detect",
           "LEGACY_WIDS_INDEX", "SINK_TMP", "layout_of_version", "shard_ext", "new_attempt", "attempt_unit"]

PARQUET = "parquet"        # token shards, Parquet (both versions)
WEBDATASET = "webdataset"  # token shards, WebDataset tars (both versions)
DATA_DIRS = (PARQUET, WEBDATASET)
META = ".gq"               # version 2: everything that is not token data
# An index older gq versions (before version 1 moved it to the root) wrote inside webdataset/; removed when seen.
LEGACY_WIDS_INDEX = f"{WEBDATASET}/index.json"


def shard_ext(fmt: str) -> str:
    return "tar" if fmt == WEBDATASET else "parquet"


def new_attempt(unit_id: str) -> str:
    """A staging folder name for one try at committing ``unit_id`` (the unit id first, so gc can tell whose)."""
    return f"{unit_id}.{uuid.uuid4().hex[:12]}"


def attempt_unit(attempt: str) -> str:
    """The unit id a staging folder name (:func:`new_attempt`) belongs to."""
    return attempt.split(".", 1)[0]


@dataclass(frozen=True)
class Layout:
    """Relative paths (to the output root) of one layout version."""

    version: int
    units: str            # commit records: <units>/<unit_id>.json
    errors: str           # error files:    <errors>/<unit_id>-<model_fp>.parquet
    manifest: str
    wids_index: str
    plan: str             # persisted plans (gq_pipeline.plan_store)
    staging: str          # <staging>/<attempt>/<final relpath>
    lease: str
    sink_tmp: str         # GQShardSink's per-sink staging stores

    def record(self, unit_id: str) -> str:
        return f"{self.units}/{unit_id}.json"

    def shard(self, fmt: str, unit_id: str, model_fp: str) -> str:
        """``fmt`` is ``parquet``, ``webdataset`` or ``errors``."""
        folder = self.errors if fmt == "errors" else {PARQUET: PARQUET, WEBDATASET: WEBDATASET}[fmt]
        return f"{folder}/{unit_id}-{model_fp}.{shard_ext(fmt)}"

    def staged(self, attempt: str, relpath: str) -> str:
        return f"{self.staging}/{attempt}/{relpath}"

    @property
    def file_dirs(self) -> tuple[str, ...]:
        """Folders holding a unit's files (token shards and error files)."""
        return (PARQUET, WEBDATASET, self.errors)

    @property
    def dirs(self) -> tuple[str, ...]:
        """Folders a writer creates up front (local outputs)."""
        return (PARQUET, WEBDATASET, self.errors, self.units)

    def wids_url(self, shard_relpath: str) -> str:
        """A shard's URL in the wids index, relative to the index's own folder (the wids convention)."""
        return posixpath.relpath(shard_relpath, posixpath.dirname(self.wids_index) or ".")


V1 = Layout(1, units="units", errors="errors", manifest="manifest.json", wids_index="webdataset-index.json",
            plan="_plan", staging=".staging", lease="_lease.json", sink_tmp="_tmp")
V2 = Layout(2, units=f"{META}/units", errors=f"{META}/errors", manifest=f"{META}/manifest.json",
            wids_index=f"{META}/webdataset-index.json", plan=f"{META}/plan", staging=f"{META}/staging",
            lease=f"{META}/lease.json", sink_tmp=f"{META}/tmp")
CURRENT = V2
SINK_TMP = CURRENT.sink_tmp


def layout_of_version(version: int | str | None) -> Layout:
    return V1 if str(version) == "1" else V2


def detect(fs, root: str) -> Layout | None:
    """The layout of the output at ``root``: V2 when ``.gq/`` holds records or a manifest, V1 when ``units/`` or
    ``manifest.json`` sits at the root, None when neither (not a gq output yet). V2 is tried first and costs one
    listing, so opening a current output costs no more than before."""
    root = root.rstrip("/")
    for lay in (V2, V1):
        try:
            names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(posixpath.join(root, posixpath.dirname(lay.units)
                                                                                      or ""), detail=False)}
        except (FileNotFoundError, NotADirectoryError):
            continue
        if posixpath.basename(lay.units) in names or posixpath.basename(lay.manifest) in names:
            return lay
    return None
