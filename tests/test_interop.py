"""The token format is readable by the usual tools, not only by TokenDataset.

Tokens are drawn from [40000, 65536) so every tool is also checked for reading uint16 ids without a sign flip.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from tests.shard_writer import write_token_output

K = 65536


def high_tokens(rng, shape, k, i):
    return rng.integers(40000, k, size=shape)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("interop"))
    expected = write_token_output(root, (5, 3, 7), codebook_size=K, tokens_fn=high_tokens, row_group_size=4)
    return root, expected, sorted(glob.glob(f"{root}/parquet/*.parquet"))


def check_row(expected, key, tokens, shape=None):
    want = expected[key]["tokens"]
    got = np.asarray(tokens, dtype=np.int64).reshape(shape if shape is not None else want.shape)
    assert np.array_equal(got, want), key


def test_huggingface_datasets(out, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    root, expected, files = out
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 15 and str(ds.features["tokens"].feature.dtype) == "uint16"
    for row in ds:
        check_row(expected, row["key"], row["tokens"], row["token_shape"])
        assert row["txt"] == expected[row["key"]]["txt"]


def test_pandas_and_duckdb(out):
    pd = pytest.importorskip("pandas")
    duckdb = pytest.importorskip("duckdb")
    root, expected, files = out
    df = pd.read_parquet(os.path.join(root, "parquet"))
    assert len(df) == 15 and df.tokens.iloc[0].dtype == np.uint16
    for key, tokens, shape in zip(df.key, df.tokens, df.token_shape):
        check_row(expected, key, tokens, shape)
    con = duckdb.connect()
    lo, hi, n = con.sql(f"SELECT min(t), max(t), count(*) FROM (SELECT unnest(tokens) AS t "
                        f"FROM read_parquet('{root}/parquet/*.parquet'))").fetchall()[0]
    allt = np.concatenate([e["tokens"].ravel() for e in expected.values()])
    assert (lo, hi, n) == (allt.min(), allt.max(), allt.size) and lo >= 40000
    rows = con.sql(f"SELECT key, tokens FROM read_parquet('{root}/parquet/*.parquet')").fetchall()
    for key, tokens in rows:
        check_row(expected, key, tokens)


def test_ray_data(out, ray_cluster):
    import ray

    root, expected, files = out
    rows = ray.data.read_parquet(files).take_all()
    assert sorted(r["key"] for r in rows) == sorted(expected)
    for r in rows:
        check_row(expected, r["key"], r["tokens"], r["token_shape"])


def test_webdataset(out):
    wds = pytest.importorskip("webdataset")
    root, expected, _ = out
    tars = sorted(glob.glob(f"{root}/webdataset/*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode())
    assert sorted(s["__key__"] for s in samples) == sorted(expected)
    for s in samples:
        assert s["tokens.npy"].dtype == np.uint16
        check_row(expected, s["__key__"], s["tokens.npy"])
        assert s["json"]["token_shape"] == [1, 4, 4] and s["txt"] == expected[s["__key__"]]["txt"]


def test_wids_on_index_json(out, tmp_path):
    wids = pytest.importorskip("wids")
    root, expected, _ = out
    from functools import partial

    from wids.wids import default_decoder

    ds = wids.ShardListDataset(f"{root}/.gq/webdataset-index.json", cache_dir=str(tmp_path / "wids"),
                               transformations=[partial(default_decoder, format="numpy")])
    assert len(ds) == 15
    seen = []
    for i in range(len(ds)):
        s = ds[i]
        check_row(expected, s["__key__"], s[".tokens.npy"])
        seen.append(s["__key__"])
    assert sorted(seen) == sorted(expected)
