"""Outputs whose shards carry different pass-through columns batch: the batch has the union of the fields, None for a
sample whose shard lacks one (issue 18 item 2, reader side).

Outputs written before the writer used one union schema look like this when one run read a folder, a tar and a
Parquet file: folder shards have no extra column, tar shards ``txt``/``json``/``cls``, Parquet-input shards that
input's own columns (``caption``/``label``). The shards here come from the test shard writer, then each unit is
given the columns of one kind of input, in both formats, as ``gq tokenize`` wrote them."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from gq_pipeline.dataset import TokenDataset, TokenLoader, collate, pad_collate
from gq_pipeline.mixture import TokenMixture
from tests.shard_writer import write_token_output

KINDS = ("folder", "tar", "parquet")  # the input each unit was read from
EXTRA = {"folder": (), "tar": ("txt", "json", "cls"), "parquet": ("caption", "label")}
ALL_EXTRA = ("txt", "json", "cls", "caption", "label")


def _extras(kind: str, key: str, i: int) -> dict:
    if kind == "tar":
        return {"txt": f"caption {key}", "json": json.dumps({"k": i}), "cls": i % 3}
    if kind == "parquet":
        return {"caption": f"a photo {key}", "label": 10 + i}
    return {}


def _reshape_parquet(path: str, kind: str) -> None:
    table = pq.read_table(path)
    meta = table.schema.metadata
    table = table.drop_columns(["txt", "cls"])
    keys = table.column("key").to_pylist()
    extras = [_extras(kind, k, i) for i, k in enumerate(keys)]
    types = {"txt": pa.string(), "json": pa.string(), "cls": pa.int64(), "caption": pa.string(), "label": pa.int64()}
    for name in EXTRA[kind]:
        table = table.append_column(name, pa.array([e[name] for e in extras], types[name]))
    pq.write_table(table.replace_schema_metadata(meta), path)


def _reshape_tar(path: str, kind: str) -> None:
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    keys = sorted({name.split(".", 1)[0] for name in members})
    buf = io.BytesIO()
    with wds.TarWriter(buf) as sink:
        for i, key in enumerate(keys):
            meta = json.loads(members[f"{key}.json"])
            sample = {"__key__": key, "tokens.npy": np.load(io.BytesIO(members[f"{key}.tokens.npy"]))}
            e = _extras(kind, key, i)
            if kind == "tar":  # as tar_bytes writes a tar input: nested json, txt and cls members
                meta["json"] = json.loads(e["json"])
                sample["txt"], sample["cls"] = e["txt"], e["cls"]
            elif kind == "parquet":  # a Parquet input's columns go into the json member
                meta["columns"] = e
            sample["json"] = meta
            sink.write(sample)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A record-less output of 3 units x 2 formats, one unit per kind of input; ``expected[key]`` gives the kind
    and the tokens."""
    root = str(tmp_path_factory.mktemp("mixed") / "out")
    written = write_token_output(root, (6, 5, 7))
    by_unit: dict[str, list[str]] = {}
    for key in written:
        by_unit.setdefault(key.rsplit("-", 1)[0], []).append(key)
    units = sorted(by_unit, key=lambda u: min(by_unit[u]))
    expected = {}
    for kind, uid in zip(KINDS, units):
        for name in os.listdir(os.path.join(root, "parquet")):
            if name.startswith(uid):
                _reshape_parquet(os.path.join(root, "parquet", name), kind)
        for name in os.listdir(os.path.join(root, "webdataset")):
            if name.startswith(uid):
                _reshape_tar(os.path.join(root, "webdataset", name), kind)
        for i, key in enumerate(sorted(by_unit[uid])):
            expected[key] = {"kind": kind, "tokens": written[key]["tokens"], **_extras(kind, key, i)}
    return root, expected


def _check_batches(batches, expected, fmt):
    seen, mixing = [], 0
    for batch in batches:
        n = len(batch["key"])
        assert batch["tokens"].shape == (n, 1, 4, 4)  # tokens still stack
        kinds = set()
        for j, key in enumerate(batch["key"]):
            exp = expected[key]
            kinds.add(exp["kind"])
            assert torch.equal(batch["tokens"][j], torch.from_numpy(exp["tokens"]))
            for f in ALL_EXTRA:
                got = batch[f][j] if f in batch else None
                if isinstance(got, torch.Tensor):
                    got = int(got)
                assert got == exp.get(f), (fmt, key, f, got)
        mixing += len(kinds) > 1
        for f in ALL_EXTRA:
            if f in batch and not isinstance(batch[f], torch.Tensor):
                assert isinstance(batch[f], list) and len(batch[f]) == n
        seen += batch["key"]
    assert sorted(seen) == sorted(expected)  # every sample exactly once
    assert mixing >= 2, "no batch mixed shards of different columns: the test would prove nothing"
    return seen


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_batches_mix_shards_with_different_passthrough_columns(mixed, fmt):
    root, expected = mixed
    ds = TokenDataset(root, format=fmt, batch_size=4, seed=3)
    batches = list(TokenLoader(ds))
    _check_batches(batches, expected, fmt)
    if fmt == "parquet":  # the footers give the output's schema: every batch has all of its fields
        assert set(ds.fields) == {"key", "source", "member", "width", "height", *ALL_EXTRA}
        assert all(set(b) == {"tokens", *ds.fields} for b in batches)
    else:  # tars declare no schema: a batch has the union of its samples' fields
        assert ds.fields is None
        for b in batches:
            kinds = {expected[k]["kind"] for k in b["key"]}
            assert {f for f in ALL_EXTRA if f in b} == {f for k in kinds for f in EXTRA[k]}


def test_two_ranks_with_workers_read_mixed_shards_exactly_once(mixed):
    root, expected = mixed
    keys = []
    for rank in range(2):
        ds = TokenDataset(root, batch_size=4, seed=1, rank=rank, world_size=2, shuffle_window=8)
        keys += [k for b in TokenLoader(ds, num_workers=2) for k in b["key"]]
    assert sorted(keys) == sorted(expected)


def test_unbatched_parquet_samples_carry_the_outputs_fields(mixed):
    root, expected = mixed
    ds = TokenDataset(root, shuffle=False)
    for sample in ds:
        exp = expected[sample["key"]]
        assert set(sample) == {"tokens", *ds.fields}
        assert all(sample[f] == exp.get(f) for f in ALL_EXTRA)
    projected = TokenDataset(root, columns=["caption"], batch_size=4)
    assert projected.fields == ("key", "caption")
    for batch in projected:
        assert set(batch) == {"tokens", "key", "caption"}
        assert batch["caption"] == [expected[k].get("caption") for k in batch["key"]]


def test_pad_collate_and_mixture_take_the_union(mixed, tmp_path):
    root, expected = mixed
    ds = TokenDataset(root, format="webdataset", batch_size=4, collate_fn=pad_collate, seed=2)
    _check_batches(list(ds), expected, "webdataset")
    other = str(tmp_path / "plain")
    plain = write_token_output(other, (8,), formats=("parquet",), unit_offset=7)
    mix = TokenMixture([TokenDataset(root, format="parquet"), TokenDataset(other)], weights=[0.5, 0.5], seed=0,
                       batch_size=4)
    assert set(mix.fields) == {"key", "source", "member", "width", "height", *ALL_EXTRA}
    n_mixed = 0
    for batch in mix:
        assert set(batch) == {"tokens", "dataset", *mix.fields}
        for j, key in enumerate(batch["key"]):
            if int(batch["dataset"][j]) == 1:
                assert batch["caption"][j] is None and batch["txt"][j] == plain[key]["txt"]
            else:
                assert batch["caption"][j] == expected[key].get("caption")
        n_mixed += len(set(batch["dataset"].tolist())) > 1
    assert n_mixed >= 1


def test_collate_fills_gaps_with_none_and_keeps_full_fields_as_tensors():
    t = torch.zeros(1, 2, 2, dtype=torch.int64)
    batch = collate([{"tokens": t, "key": "a", "cls": 1}, {"tokens": t, "key": "b", "txt": "x"},
                     {"tokens": t, "key": "c", "cls": 2, "txt": "y"}])
    assert list(batch) == ["tokens", "key", "cls", "txt"]
    assert batch["tokens"].shape == (3, 1, 2, 2)
    assert batch["cls"] == [1, None, 2] and batch["txt"] == [None, "x", "y"]
    full = collate([{"tokens": t, "cls": 1}, {"tokens": t, "cls": 2}])
    assert torch.equal(full["cls"], torch.tensor([1, 2]))


def test_a_real_run_over_a_folder_a_tar_and_a_parquet_file_batches(ray_cluster, tiny_model, tmp_path):
    """The issue's run: ``gq tokenize`` over three kinds of input, read back in both formats with batch_size=4."""
    import gq_pipeline
    from tests.helpers import make_image_parquet, make_wds_tar, rgb_bytes

    (tmp_path / "folder").mkdir()
    for i in range(5):
        (tmp_path / "folder" / f"f{i}.png").write_bytes(rgb_bytes(40, 40, seed=i, fmt="PNG"))
    samples = [{"__key__": f"t{i}", "jpg": rgb_bytes(40, 40, seed=20 + i), "txt": f"tar caption {i}", "cls": str(i)}
               for i in range(5)]
    (tmp_path / "in.tar").write_bytes(make_wds_tar(samples))
    (tmp_path / "in.parquet").write_bytes(make_image_parquet(5))
    out = str(tmp_path / "out")
    s = gq_pipeline.tokenize(tiny_model, [str(tmp_path / "folder"), str(tmp_path / "in.tar"),
                                          str(tmp_path / "in.parquet")], out, image_size=32, format="both",
                             progress=False)
    assert (s["inputs"], s["tokenized"], s["errors"]) == (15, 15, 0)
    for fmt in ("parquet", "webdataset"):
        ds = TokenDataset(out, format=fmt, batch_size=4, seed=0)
        seen, mixing = 0, 0
        for batch in TokenLoader(ds):
            kinds = set()
            for j, source in enumerate(batch["source"]):
                kind = "tar" if source.endswith(".tar") else "parquet" if source.endswith(".parquet") else "folder"
                kinds.add(kind)
                get = lambda f: (batch[f][j] if f in batch else None)  # noqa: E731
                assert (get("txt") is not None) == (kind == "tar"), (fmt, kind, get("txt"))
                assert (get("caption") is not None) == (kind == "parquet"), (fmt, kind, get("caption"))
                if kind == "tar":
                    assert get("txt").startswith("tar caption")
                if kind == "parquet":
                    assert get("caption").startswith("caption")
            assert batch["tokens"].shape[0] == len(batch["key"])
            seen += len(batch["key"])
            mixing += len(kinds) > 1
        assert seen == 15 and mixing >= 1, (fmt, seen, mixing)
