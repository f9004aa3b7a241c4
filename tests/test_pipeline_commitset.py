"""Readers see only committed data, plain readers included; ``gq gc`` removes exactly the orphans (issue 13).

Crashes are made with the real commit steps stopped part-way (``stage_unit`` without the record: killed between
shard and record; ``stage_unit`` + ``OutputStore.commit`` without ``publish_unit``: killed between record and
publish), on the real model, real pyarrow/DuckDB/HF datasets/Ray Data/webdataset readers and a moto S3 server.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import time

import pyarrow.dataset as pads
import pytest

import gq_pipeline
from gq_pipeline.commit import commit_unit, create_record, stage_unit
from gq_pipeline.dataset import TokenDataset
from gq_pipeline.gc_cli import LeaseHeldError, collect_garbage
from gq_pipeline.layout import CURRENT
from gq_pipeline.manifest import OutputStore
from gq_pipeline.planning import plan_units
from gq_pipeline.writers import ShardContext
from gq_model.cli import main as gq_main
from tests.helpers import rgb_bytes

STAGING = CURRENT.staging

SIZE = 32
UNIT = 4


def _ctx(model) -> ShardContext:
    """The context ``gq_pipeline.tokenize`` builds for these settings (fp32, center crop, default max pixels)."""
    from gq_pipeline.preprocess import DEFAULT_MAX_PIXELS

    c = model.config
    pre = {"image_size": SIZE, "crop": "center", "resize": "PIL bicubic, shorter side",
           "multiple_of": model.downsample_factor, "alpha": "composite on white", "max_pixels": DEFAULT_MAX_PIXELS,
           "encoder_precision": "fp32", "policy": "gq"}
    return ShardContext(model_fingerprint=model.model_fingerprint, codebook_fingerprint=model.fingerprint,
                        codebook_size=c.codebook_size, group=c.group, seed=c.seed, beta=c.beta, arch=c.arch,
                        preprocess=pre)


def _complete_units(model, folder: str, storage_options=None):
    """Read and tokenize every unit of ``folder`` in this process, as the job's workers do, without committing."""
    from gq_pipeline.preprocess import DEFAULT_MAX_PIXELS
    from gq_pipeline.worker import ModelRunner
    from gq_pipeline.worker import UnitProcessor, WorkSpec

    plan = plan_units([folder], UNIT, storage_options)
    spec = WorkSpec(output=folder, storage_options=storage_options, ctx=_ctx(model), formats=("parquet",),
                    image_size=SIZE, crop="center", max_pixels=DEFAULT_MAX_PIXELS,
                    multiple_of=model.downsample_factor, image_column=None, batch_size=8)
    proc = UnitProcessor(spec, ModelRunner(model.eval(), batch_size=8))
    try:
        return [proc.tokenize_unit(u) for u in plan.units]
    finally:
        proc.close()


def _images(folder, names):
    os.makedirs(folder, exist_ok=True)
    for i, n in enumerate(names):
        with open(os.path.join(folder, n), "wb") as f:
            f.write(rgb_bytes(36 + i % 5, 40 + i % 3, seed=i))


def _sources_everywhere(out: str, ray_ok: bool = True) -> dict[str, list[str]]:
    """The ``source`` of every token row, as each reader sees it."""
    import duckdb
    import webdataset as wds
    from datasets import load_dataset

    seen = {}
    seen["pyarrow.dataset"] = pads.dataset(os.path.join(out, "parquet")).to_table(columns=["source"]) \
        .column("source").to_pylist()
    seen["duckdb glob"] = [r[0] for r in duckdb.sql(
        f"SELECT source FROM read_parquet('{out}/parquet/*.parquet')").fetchall()]
    seen["duckdb dir"] = [r[0] for r in duckdb.sql(f"SELECT source FROM read_parquet('{out}/parquet')").fetchall()]
    cache = os.path.join(out + "-hfcache")
    seen["hf parquet dir"] = load_dataset(os.path.join(out, "parquet"), split="train", cache_dir=cache)["source"]
    seen["hf parquet files"] = load_dataset("parquet", data_files=sorted(glob.glob(f"{out}/parquet/*.parquet")),
                                            split="train", cache_dir=cache)["source"]
    tars = sorted(glob.glob(f"{out}/webdataset/*.tar"))
    seen["webdataset"] = [json.loads(s["json"])["source"] for s in wds.WebDataset(tars, shardshuffle=False)]
    hf_wds = load_dataset(os.path.join(out, "webdataset"), split="train", cache_dir=cache)
    seen["hf webdataset dir"] = [j["source"] for j in hf_wds["json"]]
    if ray_ok:
        import ray.data

        seen["ray.data.read_parquet"] = ray.data.read_parquet(os.path.join(out, "parquet")) \
            .select_columns(["source"]).to_pandas()["source"].tolist()
        seen["ray.data.read_webdataset"] = [json.loads(j)["source"] if isinstance(j, (str, bytes)) else j["source"]
                                            for j in ray.data.read_webdataset(os.path.join(out, "webdataset"))
                                            .to_pandas()["json"]]
    for fmt in ("parquet", "webdataset"):
        seen[f"TokenDataset {fmt}"] = [s["source"] for s in TokenDataset(out, format=fmt, shuffle=False)]
        seen[f"TokenDataset {fmt} folder"] = [s["source"] for s in TokenDataset(os.path.join(out, fmt),
                                                                                shuffle=False)]
    return seen


def _inspect(out: str, fmt: str = "parquet") -> dict:
    from gq_pipeline.inspect_cli import build_report

    class A:
        shards, format, limit, no_tokens, plot = out, fmt, 0, False, None

    return build_report(A())


def _tree(out: str) -> dict[str, bytes]:
    files = {}
    for d, _, names in os.walk(out):
        for n in names:
            p = os.path.join(d, n)
            files[os.path.relpath(p, out)] = open(p, "rb").read()
    return files


def _assert_once(seen: dict[str, list[str]], expected: set[str]) -> None:
    for reader, sources in seen.items():
        assert len(sources) == len(expected) and set(sources) == expected, (reader, len(sources), len(expected))


@pytest.fixture
def crashed(tiny_model, tmp_path):
    """An output where unit 0 is committed, unit 1 was killed between record and publish, and unit 2 between its
    staged shards and its record."""
    folder = str(tmp_path / "in")
    _images(folder, [f"a{i:02d}.jpg" for i in range(10)])
    out = str(tmp_path / "out")
    store = OutputStore(out)
    store.prepare()
    ctx = _ctx(tiny_model)
    units = _complete_units(tiny_model, folder)
    commit_unit(store, ctx, ("parquet", "webdataset"), units[0])
    s1 = stage_unit(store, ctx, ("parquet", "webdataset"), units[1])
    assert create_record(store, s1.record) is not False  # the commit point ... then killed before publish_unit
    s2 = stage_unit(store, ctx, ("parquet", "webdataset"), units[2])  # killed before the record
    return folder, out, units, (s1, s2)


def test_staged_files_are_invisible_to_plain_readers(crashed, ray_cluster):
    folder, out, units, (s1, s2) = crashed
    src = lambda i: {f"file://{folder}/a{k:02d}.jpg" for k in range(4 * i, min(10, 4 * i + 4))}  # noqa: E731
    seen = _sources_everywhere(out)
    plain = {k: v for k, v in seen.items() if not k.startswith("TokenDataset")}
    _assert_once(plain, src(0))  # plain readers: the published unit only, nothing uncommitted
    # gq's readers go through the commit set: unit 1 is committed (its staged copy is read), unit 2 is not
    _assert_once({k: v for k, v in seen.items() if k.startswith("TokenDataset")}, src(0) | src(1))
    r = _inspect(out)
    assert r["samples"] == 8 and not r["unreadable"], r
    # a directory read of the output root by Ray sees no staged file either
    import ray.data

    root_rows = ray.data.read_parquet(out, file_extensions=["parquet"]).select_columns(["source"]).to_pandas()
    assert set(root_rows["source"]) <= src(0) | {None}


def test_crash_then_changed_folder_and_rerun_every_reader_sees_every_input_once(crashed, tiny_model, ray_cluster):
    folder, out, units, (s1, s2) = crashed
    _images(folder, ["a05b.jpg", "a01b.jpg", "z.jpg"])  # inside unit 1's range, inside unit 0's, at the end
    with open(os.path.join(out, "webdataset", "index.json"), "w") as f:  # where an older gq kept the wids index
        json.dump({"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": []}, f)
    s = gq_pipeline.tokenize(tiny_model, [folder], out, format="both", image_size=SIZE, unit_size=UNIT,
                             batch_size=8, progress=False)
    expected = {f"file://{folder}/{n}" for n in os.listdir(folder)}
    assert s["inputs"] == s["tokenized"] == len(expected) == 13
    # the rerun rolled unit 1 forward; unit 2's staging (never committed, and recut) is left for gq gc
    assert os.listdir(os.path.join(out, STAGING)) == [s2.attempt]
    # the wids index moved to the root: webdataset/ holds tars only, for directory readers (issue 18)
    import wids

    assert os.listdir(os.path.join(out, "webdataset")) == [n for n in os.listdir(os.path.join(out, "webdataset"))
                                                           if n.endswith(".tar")]
    index = wids.ShardListDataset(os.path.join(out, ".gq", "webdataset-index.json"), cache_dir=out + "-wids")
    assert sorted(index[i][".json"]["source"] for i in range(len(index))) == sorted(expected)  # decoded by wids
    seen = _sources_everywhere(out)
    _assert_once(seen, expected)
    for fmt in ("parquet", "webdataset"):
        r = _inspect(out, fmt)
        assert r["samples"] == 13 and not r["problems"] and not r["unreadable"], r


def test_planted_shard_is_invisible_to_gq_readers_and_gc_removes_exactly_the_orphans(crashed, tiny_model,
                                                                                        tiny_model_dir, ray_cluster,
                                                                                        capsys):
    folder, out, units, (s1, s2) = crashed
    gq_pipeline.tokenize(tiny_model, [folder], out, format="both", image_size=SIZE, unit_size=UNIT, batch_size=8,
                         progress=False)
    expected = {f"file://{folder}/a{k:02d}.jpg" for k in range(10)}
    fp = tiny_model.model_fingerprint
    # plant copies under an uncommitted unit id, and leave a temporary of a killed write
    first = sorted(glob.glob(f"{out}/parquet/*.parquet"))[0]
    shutil.copy(first, f"{out}/parquet/u-00000000deadbeef-{fp}.parquet")
    shutil.copy(sorted(glob.glob(f"{out}/webdataset/*.tar"))[0], f"{out}/webdataset/u-00000000deadbeef-{fp}.tar")
    open(f"{out}/.gq/units/u-0000000000000000.json.tmp-1-abc", "w").write("{")
    os.makedirs(f"{out}/{STAGING}/u-00000000cafecafe.0123", exist_ok=True)
    open(f"{out}/{STAGING}/u-00000000cafecafe.0123/x.parquet.tmp-9-zz", "wb").write(b"partial")
    for fmt in ("parquet", "webdataset"):
        assert sorted(s["source"] for s in TokenDataset(out, format=fmt, shuffle=False)) == sorted(expected)
        assert _inspect(out, fmt)["samples"] == 10
    png = out + "-png"
    assert gq_main(["decode", "--model", tiny_model_dir, "--input", out, "--out", png, "--limit", "100"]) == 0
    assert "decoded 10 sample(s)" in capsys.readouterr().out
    r = _inspect(out)
    assert r["uncommitted_files"] == sorted([f"parquet/u-00000000deadbeef-{fp}.parquet",
                                             f"webdataset/u-00000000deadbeef-{fp}.tar"])
    assert any("gq gc" in p for p in r["problems"]) and gq_main(["inspect", out, "--no-tokens"]) == 1
    # gq gc --dry-run: the plan names exactly the orphans, and nothing changes
    before = _tree(out)
    plan = collect_garbage(out, dry_run=True)
    orphans = sorted([f"parquet/u-00000000deadbeef-{fp}.parquet", f"webdataset/u-00000000deadbeef-{fp}.tar"])
    assert plan.orphans == orphans
    assert plan.temporaries == [".gq/units/u-0000000000000000.json.tmp-1-abc"]
    assert f"{STAGING}/{s2.attempt}" in plan.stale_staging and f"{STAGING}/u-00000000cafecafe.0123" in \
        plan.stale_staging
    assert not plan.damaged and not plan.rolled_forward and not plan.kept_unknown
    assert _tree(out) == before
    # a live lease refuses; an expired one does not
    lease = {"owner": "host:1234", "expires_at": time.time() + 600}
    open(f"{out}/.gq/lease.json", "w").write(json.dumps(lease))
    with pytest.raises(LeaseHeldError, match="host:1234"):
        collect_garbage(out)
    assert gq_main(["gc", out]) == 2 and _tree(out) == dict(before, **{".gq/lease.json": json.dumps(lease).encode()})
    open(f"{out}/.gq/lease.json", "w").write(json.dumps(dict(lease, expires_at=time.time() - 1)))
    assert gq_main(["gc", out]) == 0
    after = _tree(out)
    removed = set(before) - set(after)
    assert {p for p in removed if not p.startswith(STAGING)} == set(orphans) | set(plan.temporaries)
    assert not [p for p in after if p.startswith(STAGING)]
    assert set(after) - set(before) == {".gq/lease.json"}
    assert all(after[p] == before[p] for p in after if p in before)  # nothing committed was touched
    _assert_once(_sources_everywhere(out), expected)
    assert gq_main(["inspect", out, "--no-tokens"]) == 0
    assert collect_garbage(out).removed == []  # idempotent


def test_gc_rolls_forward_a_unit_killed_between_record_and_publish(crashed):
    folder, out, units, (s1, s2) = crashed
    plan = collect_garbage(out, dry_run=True)
    assert plan.rolled_forward == sorted(s1.files) and not plan.damaged
    assert not os.path.exists(os.path.join(out, s1.files[0]))
    done = collect_garbage(out)
    assert done.rolled_forward == sorted(s1.files)
    for rel in s1.files:  # published with the bytes the record vouches for
        import hashlib

        sha = {s["path"]: s["sha256"] for s in s1.record["shards"]}.get(rel, s1.record.get("errors_sha256"))
        assert hashlib.sha256(open(os.path.join(out, rel), "rb").read()).hexdigest() == sha
    expected = {f"file://{folder}/a{k:02d}.jpg" for k in range(8)}
    got = pads.dataset(os.path.join(out, "parquet")).to_table(columns=["source"]).column("source").to_pylist()
    assert sorted(got) == sorted(expected)
    assert not os.path.exists(os.path.join(out, STAGING))


def test_staged_bytes_the_record_does_not_vouch_for_are_not_published(crashed):
    folder, out, units, (s1, s2) = crashed
    rel = next(r for r in s1.files if r.endswith(".parquet") and r.startswith("parquet/"))
    staged = os.path.join(out, STAGING, s1.attempt, rel)
    data = bytearray(open(staged, "rb").read())
    data[100] ^= 0xFF  # a flipped bit on the disk
    open(staged, "wb").write(bytes(data))
    assert gq_main(["gc", out]) == 1
    report = collect_garbage(out)
    assert report.mismatched == [f"{STAGING}/{s1.attempt}/{rel}"] and report.damaged == [rel]
    assert not os.path.exists(os.path.join(out, rel)) and os.path.exists(staged)  # kept for a person to look at


def test_a_second_commit_of_a_unit_discards_its_staged_files(crashed, tiny_model):
    folder, out, units, _ = crashed
    store = OutputStore(out)
    before = _tree(out)
    record, hist = commit_unit(store, _ctx(tiny_model), ("parquet", "webdataset"), units[0])
    # Whether OutputStore.commit creates conditionally (then this try's staged files are discarded) or overwrites
    # (then the same bytes are republished), the output is unchanged and no staging is left behind.
    assert _tree(out) == before
    assert record["unit_id"] == units[0].unit.unit_id


def test_s3_publish_roll_forward_and_gc(tiny_model, moto_s3, s3, tmp_path):
    from tests.shard_writer import make_bucket

    folder = str(tmp_path / "in")
    _images(folder, [f"a{i:02d}.jpg" for i in range(10)])
    make_bucket(moto_s3, "commitset")
    out = "s3://commitset/out"
    store = OutputStore(out, moto_s3)
    store.prepare()
    ctx = _ctx(tiny_model)
    units = _complete_units(tiny_model, folder)
    commit_unit(store, ctx, ("parquet", "webdataset"), units[0])
    s1 = stage_unit(store, ctx, ("parquet", "webdataset"), units[1])
    create_record(store, s1.record)  # killed before publish
    s2 = stage_unit(store, ctx, ("parquet", "webdataset"), units[2])  # killed before the record
    fp = tiny_model.model_fingerprint
    s3.copy(f"commitset/out/parquet/{units[0].unit.unit_id}-{fp}.parquet",
            f"commitset/out/parquet/u-00000000deadbeef-{fp}.parquet")  # a planted copy

    def plain():
        import pyarrow.fs as pafs

        fs = pafs.PyFileSystem(pafs.FSSpecHandler(s3))
        return pads.dataset("commitset/out/parquet", filesystem=fs).to_table(columns=["source"]) \
            .column("source").to_pylist()

    src = lambda i: [f"file://{folder}/a{k:02d}.jpg" for k in range(4 * i, min(10, 4 * i + 4))]  # noqa: E731
    assert sorted(plain()) == sorted(src(0) * 2)  # the planted copy is plain-visible until gc; staged files never
    ds = TokenDataset(out, shuffle=False, storage_options=moto_s3)
    assert sorted(s["source"] for s in ds) == sorted(src(0) + src(1))  # commit set: staged unit 1, no plant
    plan = collect_garbage(out, dry_run=True, storage_options=moto_s3)
    assert plan.orphans == [f"parquet/u-00000000deadbeef-{fp}.parquet"]
    assert plan.rolled_forward == sorted(s1.files)
    assert f"{STAGING}/{s2.attempt}" in plan.stale_staging
    assert sorted(plain()) == sorted(src(0) * 2)  # dry run changed nothing
    done = collect_garbage(out, storage_options=moto_s3)
    assert done.orphans == plan.orphans and done.rolled_forward == plan.rolled_forward
    s3.invalidate_cache()
    assert sorted(plain()) == sorted(src(0) + src(1))
    assert not s3.find(f"commitset/out/{STAGING}")
    ds = TokenDataset(out, shuffle=False, storage_options=moto_s3)
    assert sorted(s["source"] for s in ds) == sorted(src(0) + src(1))


def test_commit_set_listing_reads_no_footer(crashed, monkeypatch):
    """Row counts, row groups, columns and token shapes come from the records: no Parquet footer is opened."""
    import pyarrow.parquet as pq

    folder, out, units, _ = crashed
    opened = []
    real = pq.ParquetFile.__init__

    def spy(self, *a, **k):
        opened.append(a)
        real(self, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "__init__", spy)
    from gq_pipeline.shards import list_shards

    ss = list_shards(out)
    assert ss.committed and ss.num_samples == 8 and not opened
    assert all(s.token_shapes and s.token_shapes[0][3] == s.num_rows for s in ss.shards)
    assert all("tokens" in s.columns for s in ss.shards)


def test_records_describe_shards_as_their_footers_do(crashed, tiny_model):
    """The commit-set listing equals the footer listing (same resume digest), and records of an older gq without
    row groups fall back to reading footers."""
    from gq_pipeline.shards import list_shards

    folder, out, units, _ = crashed
    collect_garbage(out)  # publish unit 1, drop unit 2's staging
    by_records = list_shards(out)
    by_footers = list_shards(f"{out}/parquet/*.parquet")
    assert by_records.committed and not by_footers.committed
    assert by_records.digest() == by_footers.digest()
    for a, b in zip(by_records.shards, by_footers.shards):
        assert (a.path, a.num_rows, a.row_groups, a.codebook_fingerprint, a.model_fingerprint, a.codebook_size,
                a.columns) == (b.path, b.num_rows, b.row_groups, b.codebook_fingerprint, b.model_fingerprint,
                               b.codebook_size, b.columns)
    for p in glob.glob(f"{out}/.gq/units/*.json"):  # as an older gq wrote them
        rec = json.load(open(p))
        for s in rec["shards"]:
            for k in ("row_groups", "columns", "token_shapes"):
                s.pop(k, None)
        json.dump(rec, open(p, "w"))
    old = list_shards(out)
    assert old.digest() == by_footers.digest() and old.num_samples == 8
    assert sorted(s["source"] for s in TokenDataset(out, format="webdataset", shuffle=False)) == \
        sorted(s["source"] for s in TokenDataset(out, shuffle=False))
