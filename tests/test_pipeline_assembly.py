"""Driver-side unit assembly and shard writing (no Ray): interleaved, retried and failed units; byte-stable files."""
from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pyarrow as pa

from gq_pipeline.assembly import CompleteUnit, FailedUnit, UnitAssembler
from gq_pipeline.commit import commit_unit
from gq_pipeline.manifest import OutputStore
from gq_pipeline.sources import Unit
from gq_pipeline.stages import TOKEN_SCHEMA
from gq_pipeline.writers import ShardContext, _TarBuilder, tar_bytes

CTX = ShardContext("0123456789abcdef", "fedcba9876543210", 4096, 16, 42, 1.0, "unet",
                   {"image_size": 32, "crop": "center"})


def _rows(uid: str, n: int, *, errors=(), end_error: str = "") -> pa.Table:
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
    rows.append({"unit": uid, "idx": -1, "kind": "end", "key": "", "source": "", "member": "", "width": -1,
                 "height": -1, "extra": b"", "error": end_error, "message": "", "n": n,
                 "info": pickle.dumps({"read_s": 0.5}), "tokens": b"", "tg": 0, "th": 0, "tw": 0, "latent": b"",
                 "lc": 0, "lh": 0, "lw": 0, "model_s": 0.0})
    return pa.Table.from_pylist(rows, schema=TOKEN_SCHEMA)


def _units(*specs):
    return {u.unit_id: u for u in (Unit("tar", f"file:///in/{name}.tar") for name in specs)}


def test_interleaved_and_duplicated_rows_complete_each_unit_once():
    units = _units("a", "b")
    ua, ub = list(units)
    a, b = _rows(ua, 7, errors=(3,)), _rows(ub, 5)
    stream = pa.concat_tables([a, b, a.slice(2, 3)])  # a retry repeats three of a's rows
    perm = np.random.default_rng(0).permutation(stream.num_rows)
    stream = stream.take(pa.array(perm))
    asm = UnitAssembler(dict(units))
    done = [d for i in range(0, stream.num_rows, 4) for d in asm.add(stream.slice(i, 4))]
    assert sorted(d.unit.unit_id for d in done) == sorted([ua, ub]) and not asm.buffers
    got = {d.unit.unit_id: d for d in done}
    assert got[ua].rows.column("idx").to_pylist() == list(range(7))
    assert got[ub].rows.column("idx").to_pylist() == list(range(5))
    assert got[ua].info == {"read_s": 0.5}
    assert asm.add(a.slice(0, 2)) == []  # late duplicates of a finished unit are ignored


def test_failed_unit_and_incomplete_unit_are_reported_not_completed():
    units = _units("a", "b")
    ua, ub = list(units)
    asm = UnitAssembler(dict(units))
    (failed,) = asm.add(_rows(ua, 3, end_error="network down"))
    assert isinstance(failed, FailedUnit) and failed.reason == "network down"
    asm.add(_rows(ub, 4).slice(0, 2))
    (left,) = asm.leftovers()
    assert left.unit.unit_id == ub and "incomplete" in left.reason


def test_commit_is_byte_stable_and_counts_add_up(tmp_path):
    units = _units("a")
    (uid,) = units
    rows = _rows(uid, 6, errors=(1, 4))
    outs = []
    for run in range(2):
        asm = UnitAssembler(dict(units))
        (done,) = asm.add(rows.take(pa.array(np.random.default_rng(run).permutation(rows.num_rows))))
        assert isinstance(done, CompleteUnit)
        store = OutputStore(str(tmp_path / f"out{run}"))
        store.prepare()
        record, hist, _ = commit_unit(store, CTX, ("parquet", "webdataset"), done)
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

    units = _units("a")
    (uid,) = units
    (done,) = UnitAssembler(dict(units)).add(_rows(uid, 4))
    ok = done.rows
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes(ok, CTX, parquet_input=False))
    samples = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"{uid}-k{i}" for i in range(4)]
    assert samples[1]["txt"] == "caption 1" and samples[0]["tokens.npy"].shape == (1, 4, 4)
    assert samples[0]["json"] == {"source": "file:///d/0.jpg", "member": None, "width": 40, "height": 30,
                                  "token_shape": [1, 4, 4]}


def test_empty_unit_commits_without_shards(tmp_path):
    units = _units("empty")
    (uid,) = units
    end_row = _rows(uid, 0)  # a tar with no samples: just its end row
    assert end_row.num_rows == 1
    (done,) = UnitAssembler(dict(units)).add(end_row)
    store = OutputStore(str(tmp_path / "out"))
    store.prepare()
    record, hist, _ = commit_unit(store, CTX, ("parquet",), done)
    assert record["inputs"] == 0 and record["shards"] == [] and hist is None
