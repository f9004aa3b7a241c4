"""A folder's listing changes between runs (files added before, between and after committed ones, files deleted,
another --unit-size): reruns must never tokenize a file twice nor skip a new one.

The unit tests drive ``reconcile_with_committed`` with hand-made commit records; the last test runs the real job
(local Ray) through a sequence of listing changes and checks every key exactly once in the output.
"""
from __future__ import annotations

import collections
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gq_pipeline.replan import reconcile_with_committed
from gq_pipeline.sources import Unit

D = "file:///data/imgs"


def _units(names, size):
    names = sorted(names)
    return [Unit("files", D, tuple(names[i:i + size])) for i in range(0, len(names), size)]


def _record(unit: Unit) -> dict:
    return {"unit_id": unit.unit_id, "kind": "files", "source": unit.source, "inputs": len(unit.files),
            "files": {"count": len(unit.files), "first": unit.files[0], "last": unit.files[-1]}}


def _never(record):
    raise AssertionError(f"shards of {record['unit_id']} should not need reading")


def _files(units):
    return [n for u in units for n in u.files]


def test_unchanged_listing_keeps_the_plan_and_reads_nothing():
    names = [f"{i:03d}.png" for i in range(10)]
    planned = _units(names, 3)
    records = {u.unit_id: _record(u) for u in planned[1:3]}  # a crash after committing two units
    r = reconcile_with_committed(planned, records, 3, _never)
    assert [u.unit_id for u in r.units] == [u.unit_id for u in planned] and not r.changed_dirs


def test_added_files_shift_boundaries_but_only_new_files_are_todo():
    old = [f"{i:03d}.png" for i in range(0, 20, 2)]  # 000, 002, ..., 018
    committed = _units(old, 3)
    records = {u.unit_id: _record(u) for u in committed}
    new_names = old + ["-first.png", "003.png", "zzz.png"]  # before, inside a committed unit's range, after
    r = reconcile_with_committed(_units(new_names, 3), records, 3, lambda rec: [
        f"{D}/{n}" for u in committed if u.unit_id == rec["unit_id"] for n in u.files])
    todo = [u for u in r.units if u.unit_id not in records]
    assert sorted(_files(todo)) == ["-first.png", "003.png", "zzz.png"]
    assert r.shards_read == 1  # only the unit whose range (000-004) gained 003.png; the others are verified by their id
    assert r.changed_dirs == [D] and r.recut_units == 1 and r.committed_unlisted == 0
    assert "changed since its units were committed" in r.describe()


def test_other_unit_size_redoes_nothing():
    names = [f"{i:03d}.png" for i in range(11)]
    committed = _units(names, 4)
    records = {u.unit_id: _record(u) for u in committed}
    r = reconcile_with_committed(_units(names, 5), records, 5, _never)
    assert [u for u in r.units if u.unit_id not in records] == []


def test_partly_committed_then_changed_and_deleted_files_are_counted():
    names = [f"{i:03d}.png" for i in range(9)]
    committed = _units(names, 3)
    records = {committed[0].unit_id: _record(committed[0])}  # only 000-002 committed
    now = [n for n in names if n != "001.png"] + ["100.png"]
    r = reconcile_with_committed(_units(now, 3), records, 3,
                                 lambda rec: [f"{D}/{n}" for n in committed[0].files])
    todo = [u for u in r.units if u.unit_id not in records]
    assert _files(todo) == [f"{i:03d}.png" for i in range(3, 9)] + ["100.png"]
    assert r.committed_unlisted == 1 and "no longer listed" in r.describe()


def test_damaged_commit_record_is_an_error():
    names = [f"{i:03d}.png" for i in range(6)]
    committed = _units(names, 3)
    records = {u.unit_id: _record(u) for u in committed}
    with pytest.raises(RuntimeError, match="damaged"):
        reconcile_with_committed(_units(names + ["001b.png"], 3), records, 3, lambda rec: [f"{D}/000.png"])


def test_unreadable_shards_of_a_changed_unit_are_a_clear_error():
    names = [f"{i:03d}.png" for i in range(6)]
    records = {u.unit_id: _record(u) for u in _units(names, 3)}

    def gone(record):
        raise FileNotFoundError("parquet/u-x.parquet")

    with pytest.raises(RuntimeError, match="could not be read back"):
        reconcile_with_committed(_units(names + ["001b.png"], 3), records, 3, gone)


def test_rerun_after_recut_reproduces_the_recut_units():
    """The units cut after a change are stable: a crash in that run, then a rerun, gives the same ids."""
    old = [f"{i:03d}.png" for i in range(0, 30, 3)]
    first = _units(old, 4)
    records = {u.unit_id: _record(u) for u in first}
    new = old + [f"{i:03d}.png" for i in range(1, 30, 3)]
    read = {u.unit_id: [f"{D}/{n}" for n in u.files] for u in first}
    r1 = reconcile_with_committed(_units(new, 4), records, 4, lambda rec: read[rec["unit_id"]])
    todo1 = [u for u in r1.units if u.unit_id not in records]
    # commit only the second recut unit, then plan again
    records2 = dict(records, **{todo1[1].unit_id: _record(todo1[1])})
    read[todo1[1].unit_id] = [f"{D}/{n}" for n in todo1[1].files]
    r2 = reconcile_with_committed(_units(new, 4), records2, 4, lambda rec: read[rec["unit_id"]])
    todo2 = [u.unit_id for u in r2.units if u.unit_id not in records2]
    assert todo2 == [u.unit_id for u in todo1 if u.unit_id != todo1[1].unit_id]


# ------------------------------------------------------------------------------------------------ the real job


def _image(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(path)


def _keys_and_sources(out):
    sources = []
    for sub in ("parquet", ".gq/errors"):
        folder = os.path.join(out, sub)
        for n in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            sources += pq.read_table(os.path.join(folder, n), columns=["source"]).column("source").to_pylist()
    return sources


def test_job_survives_listing_changes_exactly_once(ray_cluster, tiny_model_dir, tmp_path):
    from gq_pipeline import tokenize

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(0, 14, 2):
        _image(folder / f"{i:02d}.png", i)
    out = str(tmp_path / "tokens")
    run = dict(image_size=32, batch_size=4, progress=False)

    s1 = tokenize(tiny_model_dir, str(folder), out, unit_size=3, **run)
    assert (s1["inputs"], s1["this_run"]["inputs"]) == (7, 7)

    for name in ("-a.png", "05.png", "99.png"):  # before, between and after the committed files
        _image(folder / name, 100 + len(name))
    (folder / "07.jpg").write_bytes(b"broken")
    s2 = tokenize(tiny_model_dir, str(folder), out, unit_size=3, **run)
    assert s2["this_run"]["inputs"] == 4 and s2["listing_changes"]["folders"] == 1
    assert (s2["inputs"], s2["tokenized"], s2["errors"]) == (11, 10, 1)

    os.remove(folder / "00.png")
    s3 = tokenize(tiny_model_dir, str(folder), out, unit_size=5, **run)  # another unit size, one file gone
    assert s3["this_run"]["inputs"] == 0 and s3["inputs"] == 11
    assert s3["listing_changes"]["committed_files_no_longer_listed"] == 1

    sources = _keys_and_sources(out)
    counts = collections.Counter(os.path.basename(s) for s in sources)
    assert max(counts.values()) == 1, counts
    expected = {f"{i:02d}.png" for i in range(0, 14, 2)} | {"-a.png", "05.png", "99.png", "07.jpg"}
    assert set(counts) == expected


def test_committed_sources_read_back_from_webdataset_only_outputs(ray_cluster, tiny_model_dir, tmp_path):
    """The read-back replan uses when a unit's range changed, for an output written without Parquet shards."""
    from gq_pipeline import tokenize
    from gq_pipeline.manifest import OutputStore

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        _image(folder / f"{i:02d}.png", i)
    (folder / "03.jpg").write_bytes(b"broken")
    out = str(tmp_path / "tokens")
    tokenize(tiny_model_dir, str(folder), out, format="webdataset", image_size=32, unit_size=10, progress=False)
    store = OutputStore(out)
    (record,) = store.load().records.values()
    assert [s["format"] for s in record["shards"]] == ["webdataset"]
    sources = store.committed_sources(record)
    assert sorted(os.path.basename(s) for s in sources) == ["00.png", "01.png", "02.png", "03.jpg"]
