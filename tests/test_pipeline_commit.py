"""Committing one unit (no Ray): shard files and records byte-stable, counts adding up, tars webdataset reads."""
from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pyarrow as pa

from gq_pipeline.commit import commit_unit
from gq_pipeline.manifest import OutputStore
from gq_pipeline.sources import Unit
from gq_pipeline.writers import TOKEN_SCHEMA, CompleteUnit, ShardContext, _TarBuilder, tar_bytes

CTX = ShardContext("0123456789abcdef", "fedcba9876543210", 4096, 16, 42, 1.0, "unet",
                   {"image_size": 32, "crop": "center"})


def _done(uid: str, n: int, *, errors=()) -> CompleteUnit:
    """A tokenized unit as a worker hands it to commit_unit: n sample rows in index order, some of them errors."""
    rng = np.random.default_rng(len(uid) + n)
    rows = []
    for i in range(n):
        ok = i not in errors
        tok = rng.integers(0, 4096, (1, 4, 4), dtype=np.uint16)
        rows.append({"unit": uid, "idx": i, "kind": "ok" if ok else "error", "key": f"{uid}-k{i}",
                     "source": f"file:///d/{i}.jpg", "member": "", "width": 40, "height": 30,
                     "extra": pickle.dumps({"txt": f"caption {i}"}) if i % 2 else b"",
                     "error": "" if ok else "decode", "message": "" if ok else "broken", "n": 0, "info": b"",
                     "tokens": tok.tobytes() if ok else b"", "tg": 1 if ok else 0, "th": 4 if ok else 0,
                     "tw": 4 if ok else 0, "latent": b"", "lc": 0, "lh": 0, "lw": 0, "model_s": 0.01})
    unit = Unit("tar", f"file:///in/{uid}.tar")
    return CompleteUnit(unit, pa.Table.from_pylist(rows, schema=TOKEN_SCHEMA), {"read_s": 0.5}, 0.01)


def test_commit_is_byte_stable_and_counts_add_up(tmp_path):
    outs = []
    for run in range(2):
        done = _done("a", 6, errors=(1, 4))
        store = OutputStore(str(tmp_path / f"out{run}"))
        store.prepare()
        record, hist = commit_unit(store, CTX, ("parquet", "webdataset"), done)
        assert (record["inputs"], record["tokenized"], record["errors"]) == (6, 4, 2)
        assert record["errors_by_kind"] == {"decode": 2} and int(hist.sum()) == 4 * 16
        outs.append({p.name: p.read_bytes() for p in (tmp_path / f"out{run}").rglob("*") if p.is_file()})
    assert outs[0] == outs[1]


def test_tar_builder_matches_tarfile_and_handles_long_names():
    t = _TarBuilder()
    t.add("abc-123.tokens.npy", b"x" * 1000)
    t.add("a" * 120 + ".json", b"{}")
    t.add("k.txt", b"")
    with tarfile.open(fileobj=io.BytesIO(t.getvalue())) as tf:
        members = [(m.name, m.size, m.mode, m.mtime, m.uid) for m in tf]
        assert tf.extractfile("abc-123.tokens.npy").read() == b"x" * 1000
    assert members == [("abc-123.tokens.npy", 1000, 0o644, 0, 0), ("a" * 120 + ".json", 2, 0o644, 0, 0),
                       ("k.txt", 0, 0o644, 0, 0)]


def test_tar_shard_reads_back_with_webdataset(tmp_path):
    import webdataset as wds

    done = _done("a", 4)
    uid = "a"
    ok = done.rows
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes(ok, CTX, parquet_input=False))
    samples = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"{uid}-k{i}" for i in range(4)]
    assert samples[1]["txt"] == "caption 1" and samples[0]["tokens.npy"].shape == (1, 4, 4)
    assert samples[0]["json"] == {"source": "file:///d/0.jpg", "member": None, "width": 40, "height": 30,
                                  "token_shape": [1, 4, 4]}


def test_empty_unit_commits_without_shards(tmp_path):
    done = _done("empty", 0)  # a tar with no samples
    store = OutputStore(str(tmp_path / "out"))
    store.prepare()
    record, hist = commit_unit(store, CTX, ("parquet",), done)
    assert record["inputs"] == 0 and record["shards"] == [] and hist is None
