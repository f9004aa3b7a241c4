"""The output directory's bookkeeping: commit records, the compatibility guard, the manifest, the wids index and the
output's one Parquet schema. Paths are :mod:`gq_pipeline.layout`'s (``.gq/...``).

A unit is done exactly when ``.gq/units/<unit_id>.json`` exists; it is created after the unit's files are staged and
before they are published (:mod:`gq_pipeline.commit`), so a crash at any moment leaves
either an uncommitted unit that no plain reader sees and a rerun redoes (same names, same bytes), or a committed unit
whose staged files the next run's :meth:`OutputStore.prepare` rolls forward.
Resuming reads the manifest plus only the commit records the manifest does not list yet, so a rerun costs one
listing of ``.gq/units/`` and a few reads, never a scan of the shards or a re-read of finished inputs.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from gq_model.storage import is_local_fs, put_atomic, read_versioned
from gq_pipeline import layout as _layout
from gq_pipeline.commit import RollForward, roll_forward
from gq_pipeline.commitset import read_records, staged_files
from gq_pipeline.records import FORMAT_VERSION
from gq_pipeline.sources import get_fs, to_url
from gq_pipeline.writers import ShardContext

__all__ = ["OutputStore", "OutputState", "IncompatibleOutputError", "OlderLayoutError", "manifest_unit_entry",
           "RUN_CONSTANTS"]

SUBDIRS = _layout.CURRENT.dirs
# Commit-record fields that are the same for the whole output: stored once at the top of the manifest.
RUN_CONSTANTS = ("format_version", "model_fingerprint", "codebook_fingerprint", "preprocess", "codebook_size",
                 "passthrough_schema")
# A temporary younger than this may belong to a write in progress (prepare() leaves it when told to).
TEMP_STALE_S = 900.0


def manifest_unit_entry(record: dict[str, Any]) -> dict[str, Any]:
    """A commit record without the output-wide constants (the manifest stores those once)."""
    return {k: v for k, v in record.items() if k not in RUN_CONSTANTS}


class IncompatibleOutputError(ValueError):
    """The output already holds tokens made by another model, codebook or preprocessing."""


class OlderLayoutError(IncompatibleOutputError):
    """The output was written by an earlier gq in layout version 1: readable, but this gq does not add to it."""


@dataclass
class OutputState:
    """What is already committed under an output."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    foreign_shards: list[str] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)  # damaged units/*.json, counted as not committed


def normalised_root(root: str, url: str, local: bool) -> str:
    """The output path with ``.``, ``..`` and doubled slashes resolved, so that ``out/new/../tokens`` writes to
    ``out/tokens`` (not a stray ``new/`` folder) and ``s3://b/a/../t`` to ``b/t`` (not literal ``a/..`` keys).
    On an object store ``..`` may not climb out of the bucket: that is refused with a ``ValueError``."""
    parts = root.split("/")
    if "." not in parts and ".." not in parts and "//" not in root:
        return root.rstrip("/") or root
    norm = posixpath.normpath(root)
    if local:
        return norm
    bucket = root.lstrip("/").split("/", 1)[0]
    if bucket in (".", "..") or norm.startswith("..") or norm.lstrip("/").split("/", 1)[0] != bucket:
        raise ValueError(f"--output {url}: '..' climbs out of the bucket {bucket!r}; give the output's path "
                         f"inside its bucket without '..'")
    return norm.rstrip("/")


class OutputStore:
    """Paths and I/O under ``--output`` (any fsspec URL but ``memory://``)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.fs, root = get_fs(url, storage_options)
        self.local = is_local_fs(self.fs)
        self.root = normalised_root(root, url, self.local)
        self.url = to_url(self.fs, self.root)
        self.layout = _layout.CURRENT  # what this gq writes; refuse_older_layout() guards older outputs
        self.passthrough = None  # the output's pass-through schema once resolve_schema() decided it

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def refuse_older_layout(self) -> None:
        """Raise :class:`OlderLayoutError` when the output is a version-1 one (records and manifest at the root).

        Adding version-2 units to it would give an output that is neither: two manifests, errors in two places.
        Called before anything is written (the lease, persisted plans), so a refused output is left as it was."""
        found = _layout.detect(self.fs, self.root)
        if found is not None and found.version != self.layout.version and not self.fs.isdir(self.path(found.units)):
            try:  # only a manifest.json at the root: gq's, or someone else's file of that name?
                doc = json.loads(self.fs.cat_file(self.path(found.manifest)))
                found = found if isinstance(doc, dict) and "format_version" in doc and "units" in doc else None
            except (OSError, ValueError):
                found = None
        if found is not None and found.version != self.layout.version:
            raise OlderLayoutError(
                f"{self.url} was written by an earlier gq in output format version {found.version} ({found.manifest}, "
                f"{found.units}/ and {found.errors}/ at its root). This gq writes version {self.layout.version} "
                f"(those under {_layout.META}/, so that directory readers of the output see token rows only) and does "
                f"not add to a version-{found.version} output. Its tokens stay readable (TokenDataset, gq decode, "
                f"gq inspect, gq gc). To tokenize more, write to a new --output, or use the gq version that made it.")

    # ------------------------------------------------------------------ start of a run
    def prepare(self, temp_stale_s: float = 0.0) -> None:
        """Create directories (local), remove temporaries left by a killed run (local only: object stores have
        none, since every object is one PUT), and roll forward committed units whose files are still staged.

        Runs under the output's lease (gq_pipeline.lease), so no other live run writes here. When the lease was taken
        from a run that may still be alive (it expired, or was forced), the job passes ``temp_stale_s``
        (:data:`TEMP_STALE_S`): a temporary younger than that may be a write that run is finishing."""
        self._prepare_dirs(temp_stale_s)
        self.fs.invalidate_cache()
        if staged_files(self.fs, self.root, self.layout):  # one listing; usually empty
            self.roll_forward(read_records(self.fs, self.root, torn=[], layout=self.layout) or {})

    def _prepare_dirs(self, temp_stale_s: float = 0.0) -> None:
        if not self.local:
            bucket = self.root.split("/", 1)[0]
            try:
                ok = self.fs.exists(bucket)
            except Exception as e:  # no permission to look: the first write will tell
                ok, _ = True, e
            if not ok:
                raise FileNotFoundError(f"{self.url}: bucket {bucket!r} does not exist (gq does not create buckets)")
            return
        import time

        cutoff = time.time() - temp_stale_s
        stale = []
        for sub in SUBDIRS:
            if sub not in _layout.DATA_DIRS:  # parquet/, webdataset/ appear with their first shard (format's own)
                self.fs.makedirs(self.path(sub), exist_ok=True)
            stale += self.fs.glob(self.path(sub, "*.tmp-*"))
        # the lease's temporaries belong to runs contending for the lease right now (gq_pipeline.lease)
        lease_dir, lease_name = posixpath.split(self.layout.lease)
        lease_stem = lease_name.split(".", 1)[0] + "."
        stale += [p for p in self.fs.glob(self.path(self.layout.staging.rsplit("/", 1)[0], "*.tmp-*"))
                  if not (posixpath.dirname(p) == self.path(lease_dir).rstrip("/")
                          and posixpath.basename(p).startswith(lease_stem))]
        for p in stale:
            try:
                if temp_stale_s <= 0 or self.fs.modified(p).timestamp() < cutoff:
                    self.fs.rm_file(p)
            except FileNotFoundError:
                pass

    def _ls_names(self, sub: str) -> list[str]:
        try:
            return [posixpath.basename(p) for p in self.fs.ls(self.path(sub), detail=False)]
        except FileNotFoundError:
            return []

    def load(self) -> OutputState:
        self.fs.invalidate_cache()  # another process (an earlier, killed run) may have written since
        state = OutputState()
        try:
            state.manifest = json.loads(self.fs.cat_file(self.path(self.layout.manifest)))
        except FileNotFoundError:
            state.manifest = None
        except ValueError as e:
            raise ValueError(f"{self.url}/{self.layout.manifest} is not valid JSON ({e}); it is rewritten at the end "
                             f"of every run, so delete it and rerun to rebuild it from {self.layout.units}/") from e
        if state.manifest is None:
            self.refuse_older_layout()
        state.records = read_records(self.fs, self.root, state.manifest or {}, torn=state.torn,
                                     layout=self.layout) or {}
        for sub in _layout.DATA_DIRS:
            for n in self._ls_names(sub):
                if n.endswith((".parquet", ".tar")):
                    state.foreign_shards.append(f"{sub}/{n}")
        return state

    def roll_forward(self, records: dict[str, dict[str, Any]], dry_run: bool = False) -> RollForward:
        """Publish the staged files of committed units (a run killed between a record and its publish); call at the
        start of a run, after :meth:`load`. Staging folders of uncommitted units are left for ``gq gc``."""
        self.fs.invalidate_cache()
        return roll_forward(self.fs, self.root, records, dry_run=dry_run, layout=self.layout)

    def committed_sources(self, record: dict[str, Any]) -> list[str]:
        """The ``source`` of every sample a committed unit wrote (tokens and errors), read back from its shards.

        Only the small ``source`` column is read from Parquet; a WebDataset-only unit's ``.json`` members are parsed.
        """
        import io
        import tarfile

        import pyarrow.parquet as pq

        def parquet_sources(rel: str) -> list[str]:
            with self.fs.open(self.path(rel), "rb") as f:
                return pq.read_table(f, columns=["source"]).column("source").to_pylist()

        out: list[str] = []
        shards = {s["format"]: s for s in record.get("shards", []) if s.get("rows")}
        if "parquet" in shards:
            out.extend(parquet_sources(shards["parquet"]["path"]))
        elif "webdataset" in shards:
            with tarfile.open(fileobj=io.BytesIO(self.fs.cat_file(self.path(shards["webdataset"]["path"])))) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".json") and m.isfile():
                        out.append(json.loads(tar.extractfile(m).read())["source"])
        if record.get("errors_file"):
            out.extend(parquet_sources(record["errors_file"]))
        return out

    def check_compatible(self, state: OutputState, ctx: ShardContext) -> None:
        """Refuse to mix tokens of different models/codebooks/preprocessing under one output."""
        want = {"model_fingerprint": ctx.model_fingerprint, "codebook_fingerprint": ctx.codebook_fingerprint,
                "image_size": ctx.preprocess["image_size"], "crop": ctx.preprocess["crop"],
                "encoder_precision": ctx.preprocess.get("encoder_precision"),
                "policy": ctx.preprocess.get("policy", "gq")}
        sources = list(state.records.values())[:1]
        if state.manifest:
            sources.append({**state.manifest, **(state.manifest.get("preprocess") or {})})
        for rec in sources:
            pre = rec.get("preprocess", rec)
            have = {"model_fingerprint": rec.get("model_fingerprint"),
                    "codebook_fingerprint": rec.get("codebook_fingerprint"),
                    "image_size": pre.get("image_size"), "crop": pre.get("crop"),
                    "encoder_precision": pre.get("encoder_precision"),
                    "policy": pre.get("policy", "gq") if pre.get("image_size") is not None else None}
            diff = {k: (have[k], want[k]) for k in want if have[k] is not None and have[k] != want[k]}
            if diff:
                what = ", ".join(f"{k} {a!r} (this run: {b!r})" for k, (a, b) in diff.items())
                raise IncompatibleOutputError(
                    f"{self.url} already holds tokens made with {what}. Mixing them would give a dataset whose "
                    f"tokens mean different things; write to a new --output (or delete this one).")
            if int(rec.get("format_version", FORMAT_VERSION)) != FORMAT_VERSION:
                raise IncompatibleOutputError(f"{self.url} uses token format version {rec.get('format_version')}; "
                                              f"this gq writes version {FORMAT_VERSION}")
        suffixes = {n.rsplit("-", 1)[-1].split(".", 1)[0] for n in state.foreign_shards}
        other = sorted(s for s in suffixes if s != ctx.model_fingerprint)
        if other:
            raise IncompatibleOutputError(
                f"{self.url} holds shards of model(s) {other} (this run: {ctx.model_fingerprint}); write to a new "
                f"--output (or delete this one)")

    def resolve_schema(self, ctx: ShardContext, state: OutputState, todo: list, image_column: str | None,
                       storage_options: dict | None) -> ShardContext:
        """``ctx`` with the output's one pass-through schema (gq_pipeline.schema): the committed one, or, for a new
        output, the union over the units still to do (Parquet footers read here, tars' fixed set). Refuses a run
        whose inputs would add columns to committed shards (:class:`gq_pipeline.schema.SchemaConflictError`)."""
        from dataclasses import replace

        from gq_pipeline.schema import output_passthrough, run_passthrough
        from gq_pipeline.shards import declared_passthrough

        committed = declared_passthrough(state.records, state.manifest)
        run = run_passthrough(todo, image_column, storage_options)
        self.passthrough = output_passthrough(committed, run, self.url, bool(state.records))
        return replace(ctx, passthrough_schema=self.passthrough)

    # ------------------------------------------------------------------ writing
    def put(self, relpath: str, data: bytes) -> None:
        put_atomic(self.fs, self.path(relpath), data)

    def _declared_columns(self, manifest: dict[str, Any]) -> list[dict[str, str]]:
        from gq_pipeline.records import tokens_fit_uint16

        tok = "uint16" if tokens_fit_uint16(int(manifest.get("codebook_size") or 0)) else "int32"
        cols = [("key", "string"), ("source", "string"), ("member", "string"), ("tokens", f"list<element: {tok}>"),
                ("token_shape", "list<element: int32>"), ("width", "int32"), ("height", "int32")]
        cols += [(f.name, str(f.type)) for f in self.passthrough]
        if any(u.get("latents") for u in manifest.get("units", ())):
            cols += [("latent", "list<element: halffloat>"), ("latent_shape", "list<element: int32>")]
        return [{"name": n, "type": t} for n, t in cols]

    def read_record(self, unit_id: str) -> dict[str, Any] | None:
        """The commit record of ``unit_id`` as the store holds it (None if the unit is not committed)."""
        got = read_versioned(self.fs, self.path(self.layout.record(unit_id)))
        return json.loads(got[0]) if got is not None else None

    def wids_index_bytes(self, records: list[dict[str, Any]]) -> bytes | None:
        """What :meth:`write_wids_index` writes for ``records`` (None: no committed tar, no index)."""
        shards = sorted((s["path"], s["rows"]) for r in records for s in r.get("shards", [])
                        if s["format"] == "webdataset" and s["rows"] > 0)
        if not shards:
            return None
        index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": posixpath.basename(self.root),
                 "shardlist": [{"url": self.layout.wids_url(p), "nsamples": n} for p, n in shards]}
        return json.dumps(index, indent=1).encode("utf-8")

    def write_wids_index(self, records: list[dict[str, Any]]) -> str | None:
        """``.gq/webdataset-index.json`` (a wids index of the committed tars, URLs relative to it). It is not inside
        ``webdataset/``: there ``ray.data.read_webdataset`` read it as a tar and HF ``datasets`` as the data. An index
        an older gq left in ``webdataset/`` is removed for the same reason."""
        old = self.path(_layout.LEGACY_WIDS_INDEX)
        try:
            if self.fs.exists(old):
                self.fs.rm_file(old)
        except FileNotFoundError:
            pass
        data = self.wids_index_bytes(records)
        if data is None:
            return None
        self.put(self.layout.wids_index, data)
        return self.layout.wids_index

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write the manifest; with a resolved schema (:meth:`resolve_schema`) it declares it: ``passthrough_schema``
        (exact) and ``schema``, every Parquet column of the token shards with its type."""
        if self.passthrough is not None and "passthrough_schema" not in manifest:
            from gq_pipeline.schema import schema_to_json

            manifest = dict(manifest, passthrough_schema=schema_to_json(self.passthrough),
                            schema=self._declared_columns(manifest))
        self.put(self.layout.manifest, json.dumps(manifest, indent=1, sort_keys=False).encode("utf-8"))
