"""Start-up cost of TokenDataset on an object store: counts, row groups and shapes come from the commit records
(through manifest.json, their cache), so no rank opens a Parquet footer and a rank's start-up requests do not grow
with the number of shards."""
from __future__ import annotations

import contextlib

import pytest

import gq_pipeline
from gq_pipeline.dataset import TokenDataset
from tests.conftest import rgb_bytes

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
