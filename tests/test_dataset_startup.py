"""Start-up cost of TokenDataset on an object store: counts, row groups and shapes come from the commit records
(through manifest.json, their cache), so no rank opens a Parquet footer and a rank's start-up requests do not grow
with the number of shards."""
from __future__ import annotations

import contextlib

import pytest

import gq_pipeline
from gq_pipeline.dataset import TokenDataset
from tests.helpers import rgb_bytes

SIZE = 32


@contextlib.contextmanager
def s3_gets(storage_options):
    """Every S3 call the shared (fsspec-cached) s3fs client makes, via botocore's own hooks: (operation, key)."""
    import fsspec

    fs = fsspec.filesystem("s3", **storage_options)
    fs.connect()
    calls: list[tuple[str, str]] = []

    def record(model, params, **kwargs):
        calls.append((model.name, str(params.get("url_path", "")).lstrip("/")))

    fs.s3.meta.events.register("before-call.s3", record)
    try:
        yield calls
    finally:
        fs.s3.meta.events.unregister("before-call.s3", record)


@pytest.mark.parametrize("n_units", [3, 9])
def test_ranks_start_without_reading_footers_and_in_constant_requests(moto_s3, s3, tiny_model, tmp_path, n_units):
    bucket = f"gq-startup-{n_units}"
    s3.mkdir(bucket)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2 * n_units):
        (src / f"{i:03d}.png").write_bytes(rgb_bytes(40, 40, seed=i))
    out = f"s3://{bucket}/tokens"
    s = gq_pipeline.tokenize(tiny_model, [str(src)], out, image_size=SIZE, unit_size=2, progress=False,
                             storage_options=moto_s3, format="both")
    assert s["units_committed"] == n_units
    per_rank = []
    for rank in range(4):
        with s3_gets(moto_s3) as calls:
            ds = TokenDataset(out, format="parquet", rank=rank, world_size=4, storage_options=moto_s3,
                              batch_size=2)
            assert ds.shards.num_samples == 2 * n_units
        footers = [k for op, k in calls if op == "GetObject" and "/parquet/" in k]
        assert footers == [], footers  # sizes and shapes came from the commit records
        per_rank.append(len(calls))
    # the same few requests (manifest, listing of units/) whatever the number of shards
    assert min(per_rank) >= 1, per_rank  # the hook does see the readers' client
    assert max(per_rank) <= 6, per_rank


# ---------------------------------------------------------------------------------------------- without records
FOLDER_SHARDS = (5, 3, 7, 4)  # samples per shard of the record-less folder


def _parquet_footer_gets(calls) -> int:
    return sum(1 for op, k in calls if op == "GetObject" and k.endswith(".parquet"))


def _open_rank(url, options, footer_cache, rank, world):
    """(footer GETs at start-up, what the footer cache did, shard descriptions, this rank's keys in order)."""
    import dataclasses

    with s3_gets(options) as calls:
        ds = TokenDataset(url, rank=rank, world_size=world, storage_options=options, batch_size=2,
                          footer_cache=footer_cache, shuffle_window=4, drop_last=True)
    footers = _parquet_footer_gets(calls)
    keys = [k for batch in ds for k in batch["key"]]
    return (footers, ds.footer_cache.last if ds.footer_cache else None,
            [dataclasses.asdict(s) for s in ds.shards.shards], keys)


def _rank_process(url, options, footer_dir, rank, world, barrier, results):
    """One "rank" of a node: every rank starts at the same moment, as under torchrun."""
    barrier.wait(timeout=300)
    try:
        results.put((rank, _open_rank(url, options, footer_dir, rank, world)))
    except BaseException as e:  # noqa: BLE001 - reported to the test, not lost in a child's stderr
        results.put((rank, repr(e)))


def test_a_folder_without_records_has_its_footers_read_once_per_node(moto_s3, tmp_path):
    import multiprocessing as mp

    from tests.shard_writer import make_bucket, write_token_output

    make_bucket(moto_s3, "gq-norecords")
    url = "s3://gq-norecords/copied/parquet"  # shards copied without units/ or manifest.json
    write_token_output("s3://gq-norecords/copied", FOLDER_SHARDS, formats=("parquet",), manifest=False,
                       storage_options=moto_s3)
    world = 3
    plain = [_open_rank(url, moto_s3, False, r, world) for r in range(world)]
    per_scan = plain[0][0]
    assert per_scan >= len(FOLDER_SHARDS), per_scan  # uncached: every rank reads every footer
    assert [p[0] for p in plain] == [per_scan] * world

    footer_dir = str(tmp_path / "node-cache" / "footers")
    ctx = mp.get_context("spawn")  # fork would copy the parent's s3fs event loop into the children
    barrier, results = ctx.Barrier(world), ctx.Queue()
    procs = [ctx.Process(target=_rank_process, args=(url, moto_s3, footer_dir, r, world, barrier, results))
             for r in range(world)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(isinstance(v, tuple) for v in got.values()), got
    footers = [got[r][0] for r in range(world)]
    assert sum(footers) == per_scan, footers  # one scan for the node, not one per rank
    assert sorted(got[r][1] for r in range(world)) == ["hit", "hit", "scan"]
    for r in range(world):
        assert got[r][2] == plain[r][2]  # the same row counts, row groups, columns and fingerprints
        assert got[r][3] == plain[r][3]  # the same samples, in the same order
    keys = [k for r in range(world) for k in got[r][3]]
    assert len(keys) == len(set(keys)) == sum(FOLDER_SHARDS) - sum(FOLDER_SHARDS) % (2 * world)

    # a later start on the node reads no footer at all
    again = _open_rank(url, moto_s3, footer_dir, 0, world)
    assert (again[0], again[1]) == (0, "hit")

    # a changed listing makes a new key: a shard added ...
    write_token_output("s3://gq-norecords/copied", (6,), formats=("parquet",), manifest=False, unit_offset=10,
                       storage_options=moto_s3)
    added = _open_rank(url, moto_s3, footer_dir, 0, 1)
    assert added[1] == "scan" and added[0] >= len(FOLDER_SHARDS) + 1
    assert sum(s["num_rows"] for s in added[2]) == sum(FOLDER_SHARDS) + 6
    # ... or one rewritten in place under the same name
    write_token_output("s3://gq-norecords/copied", (2,), formats=("parquet",), manifest=False, seed=5,
                       storage_options=moto_s3)
    rewritten = _open_rank(url, moto_s3, footer_dir, 0, 1)
    assert rewritten[1] == "scan"
    assert sum(s["num_rows"] for s in rewritten[2]) == sum(FOLDER_SHARDS[1:]) + 2 + 6
    assert rewritten[2] == _open_rank(url, moto_s3, False, 0, 1)[2]
    assert _open_rank(url, moto_s3, footer_dir, 0, 1)[1] == "hit"


def test_footer_cache_stays_off_for_local_folders_unless_asked(tmp_path, monkeypatch):
    from tests.shard_writer import write_token_output

    monkeypatch.setenv("GQ_CACHE", str(tmp_path / "c"))
    write_token_output(str(tmp_path / "out"), (3, 2), formats=("parquet",), manifest=False)
    folder = str(tmp_path / "out" / "parquet")
    assert TokenDataset(folder).footer_cache.last == "bypass"
    assert not (tmp_path / "c" / "footers").exists()
    first = TokenDataset(folder, footer_cache=True, cache_dir=str(tmp_path / "shard-copies"))
    assert first.footer_cache.last == "scan" and first.footer_cache.directory == str(tmp_path / "c" / "footers")
    assert not (tmp_path / "shard-copies" / "footers").exists()  # the shard cache holds shard copies only
    second = TokenDataset(folder, footer_cache=str(tmp_path / "c" / "footers"))
    assert second.footer_cache.last == "hit"
    assert [s.row_groups for s in second.shards.shards] == [s.row_groups for s in first.shards.shards]
    assert TokenDataset(folder, footer_cache=False).footer_cache is None


def test_footer_cache_keeps_no_problem_and_survives_an_unusable_folder(tmp_path):
    from gq_pipeline.shards import ShardError
    from tests.shard_writer import write_token_output

    write_token_output(str(tmp_path / "out"), (3, 2), formats=("parquet",), manifest=False)
    folder = tmp_path / "out" / "parquet"
    damaged = sorted(folder.iterdir())[0]
    good = damaged.read_bytes()
    damaged.write_bytes(good[: len(good) // 2])  # a truncated copy
    cache = tmp_path / "footers"
    with pytest.raises(ShardError, match=damaged.name):
        TokenDataset(str(folder), footer_cache=str(cache))
    assert not list(cache.glob("*.json"))  # the failure is not remembered (it may be a transient one)
    damaged.write_bytes(good)
    assert TokenDataset(str(folder), footer_cache=str(cache)).shards.num_samples == 5
    (tmp_path / "a-file").write_text("")
    with pytest.warns(UserWarning, match="footer cache .* is not usable"):
        ds = TokenDataset(str(folder), footer_cache=str(tmp_path / "a-file" / "footers"))
    assert ds.footer_cache.last == "bypass" and ds.shards.num_samples == 5
