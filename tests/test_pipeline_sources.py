"""Listing, units, keys and per-unit reading (no Ray): deterministic, streaming, and robust to broken inputs."""
from __future__ import annotations

import json
import os
import pickle

import pyarrow as pa
import pytest

from gq_pipeline.planning import plan_units
from gq_pipeline.records import make_key
from gq_pipeline.sources import Unit, UnitInfo, iter_samples
from tests.helpers import make_image_parquet, make_wds_tar, rgb_bytes, write_messy_folder


def test_plan_is_deterministic_and_cut_per_directory(tmp_path):
    images = write_messy_folder(tmp_path / "d")
    a = plan_units([str(tmp_path / "d")], unit_size=5)
    b = plan_units([f"file://{tmp_path}/d/"], unit_size=5)
    assert [u.unit_id for u in a.units] == [u.unit_id for u in b.units]
    files = [(u.source, f) for u in a.units for f in u.files]
    assert len(files) == len(images) == len(set(files))  # every image once, hidden file and notes.txt skipped
    assert a.ignored == 1 and a.ignored_examples[0].endswith("notes.txt")
    top = [u for u in a.units if not u.source.endswith("/sub")]
    assert [len(u.files) for u in top] == [5] * (len(top) - 1) + [len(images) - 1 - 5 * (len(top) - 1)]
    assert [u.prefix for u in a.units if u.source.endswith("/sub")] == ["sub"]
    # Adding a file in one directory leaves the other directory's units (and their ids) unchanged.
    (tmp_path / "d" / "sub" / "zzz.jpg").write_bytes(rgb_bytes(40, 40))
    c = plan_units([str(tmp_path / "d")], unit_size=5)
    assert {u.unit_id for u in top} <= {u.unit_id for u in c.units}


def test_globs_braces_single_files_and_overlaps(tmp_path):
    write_messy_folder(tmp_path / "d")
    for i in range(3):
        (tmp_path / f"shard-{i:03d}.tar").write_bytes(make_wds_tar([]))
    p = plan_units([f"{tmp_path}/shard-{{000..001}}.tar", str(tmp_path / "d" / "ok_00.jpg"),
                    f"{tmp_path}/d/*.png", str(tmp_path / "d")], unit_size=100)
    tars = [u for u in p.units if u.kind == "tar"]
    assert [os.path.basename(u.source) for u in tars] == ["shard-000.tar", "shard-001.tar"]
    listed = [(u.source, f) for u in p.units if u.kind == "files" for f in u.files]
    assert len(listed) == len(set(listed))  # overlapping inputs list each file once
    top = [u for u in p.units if u.kind == "files" and not u.source.endswith("/sub")]
    assert len(top) == 1 and "ok_00.jpg" in top[0].files and "a.png" in top[0].files


def test_missing_and_memory_inputs_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        plan_units([str(tmp_path / "nope")])
    with pytest.raises(FileNotFoundError):
        plan_units([f"{tmp_path}/*.jpg"])
    with pytest.raises(ValueError, match="memory://"):
        plan_units(["memory://bucket/images"])


def test_keys_are_unique_safe_and_stable():
    k1 = make_key("file:///d/a.jpg", "a.jpg")
    k2 = make_key("file:///d/a.png", "a.png")
    k3 = make_key("file:///d/a b.jpg", "a b.jpg")
    k4 = make_key("file:///d/a_b.jpg", "a_b.jpg")
    assert len({k1, k2, k3, k4}) == 4 and k1.startswith("a_jpg-")
    assert all("." not in k and all(c.isalnum() or c in "-_" for c in k) for k in (k1, k2, k3, k4))
    assert make_key("file:///d/a.jpg", "a.jpg") == k1
    long = make_key("s3://b/" + "x" * 500 + ".jpg", "x" * 500 + ".jpg")
    assert len(long) <= 64 + 13


def test_unit_roundtrip_and_id():
    u = Unit("files", "s3://b/d", ("a.jpg", "b.jpg"), "d")
    assert Unit.from_dict(json.loads(json.dumps(u.to_dict()))) == u
    assert u.unit_id.startswith("u-") and u.unit_id == Unit("files", "s3://b/d", ("a.jpg", "b.jpg")).unit_id
    assert u.unit_id != Unit("files", "s3://b/d", ("a.jpg",)).unit_id


def test_tar_samples_pass_through_and_duplicates(tmp_path):
    jpg = rgb_bytes(40, 40)
    tar = make_wds_tar([
        {"__key__": "s/000", "jpg": jpg, "txt": "a cat", "json": json.dumps({"w": 1}), "cls": "3"},
        {"__key__": "s/001", "png": rgb_bytes(40, 40, fmt="PNG"), "txt": "no json"},
        {"__key__": "s/002", "txt": "caption without image"},
        {"__key__": "s/000", "jpg": jpg},  # the same key again later in the tar
    ])
    (tmp_path / "x.tar").write_bytes(tar)
    unit = plan_units([str(tmp_path / "x.tar")]).units[0]
    samples = list(iter_samples(unit, UnitInfo()))
    assert [s.idx for s in samples] == [0, 1, 2, 3]
    assert [s.member for s in samples] == ["s/000", "s/001", "s/002", "s/000"]
    assert len({s.key for s in samples}) == 4
    assert samples[0].extra == {"txt": "a cat", "json": '{"w": 1}', "cls": 3}
    assert samples[2].error.kind == "unsupported" and samples[0].data == jpg


def test_truncated_tar_keeps_read_samples_and_records_the_rest(tmp_path):
    tar = make_wds_tar([{"__key__": f"{i:03d}", "jpg": rgb_bytes(64, 64, seed=i)} for i in range(6)])
    (tmp_path / "t.tar").write_bytes(tar[: len(tar) // 2])
    unit = plan_units([str(tmp_path / "t.tar")]).units[0]
    samples = list(iter_samples(unit, UnitInfo()))
    assert 1 <= len(samples) <= 4
    assert samples[-1].error.kind == "read" and samples[-1].member == "__unreadable__"
    assert all(s.error is None for s in samples[:-1])
    # Deterministic: a second read gives the same samples.
    assert [s.key for s in iter_samples(unit, UnitInfo())] == [s.key for s in samples]


@pytest.mark.parametrize("style", ["hf", "img2dataset"])
def test_parquet_image_column_and_pass_through(tmp_path, style):
    (tmp_path / "p.parquet").write_bytes(make_image_parquet(5, style=style, bad_rows=(3,)))
    unit = plan_units([str(tmp_path)]).units[0]
    info = UnitInfo()
    samples = list(iter_samples(unit, info))
    assert [s.member for s in samples] == [f"row={i}" for i in range(5)]
    assert info.image_column == ("image" if style == "hf" else "jpg")
    schema = pa.ipc.read_schema(pa.py_buffer(info.passthrough_schema))
    expected = ["caption", "label"] if style == "hf" else ["input_key", "caption", "label"]
    assert schema.names == expected and schema.field("label").type == pa.int16()
    assert samples[1].extra["caption"] == "caption 1" and samples[3].data == b"not an image"
    pickle.dumps(samples[0].extra)


def test_parquet_without_image_column_is_one_error_record(tmp_path):
    """The same on every run, so a record for the file (issue 19 item 8), not a unit failed and retried."""
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "n.parquet")
    unit = plan_units([str(tmp_path / "n.parquet")]).units[0]
    (s,) = list(iter_samples(unit, UnitInfo()))
    assert s.error.kind == "unsupported" and "image column" in s.error.message and s.member == "__unreadable__"
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    unit = plan_units([str(tmp_path / "bad.parquet")]).units[0]
    (s,) = list(iter_samples(unit, UnitInfo()))
    assert s.error.kind == "read"


def test_file_deleted_after_listing_is_a_read_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(rgb_bytes(40, 40))
    (tmp_path / "b.jpg").write_bytes(rgb_bytes(40, 40))
    unit = plan_units([str(tmp_path)]).units[0]
    os.remove(tmp_path / "b.jpg")
    samples = list(iter_samples(unit, UnitInfo()))
    assert samples[0].error is None and samples[1].error.kind == "read"


def test_wrong_image_column_fails_before_any_work(tmp_path):
    import gq_pipeline
    from tests.helpers import make_tiny_model

    (tmp_path / "p.parquet").write_bytes(make_image_parquet(2))
    with pytest.raises(ValueError, match="--image-column 'photo'"):
        gq_pipeline.tokenize(make_tiny_model(), [str(tmp_path)], str(tmp_path / "out"), image_size=32,
                             image_column="photo", progress=False)


def test_hf_rows_that_reference_files_by_path_are_read(tmp_path):
    """HF ``Image`` columns saved by reference hold ``{"bytes": None, "path": ...}``: the file is read (relative to the
    Parquet file, absolute, or a URL); a missing file is a ``read`` error and a row with neither is ``empty``."""
    import pyarrow.parquet as pq

    (tmp_path / "imgs").mkdir()
    a, b, c = rgb_bytes(40, 36, seed=1), rgb_bytes(38, 40, seed=2), rgb_bytes(44, 40, seed=3)
    (tmp_path / "imgs" / "a.png").write_bytes(a)
    (tmp_path / "imgs" / "b.png").write_bytes(b)
    (tmp_path / "c.png").write_bytes(c)
    rows = [{"bytes": None, "path": "imgs/a.png"}, {"bytes": None, "path": str(tmp_path / "imgs" / "b.png")},
            {"bytes": None, "path": f"file://{tmp_path}/c.png"}, {"bytes": None, "path": "imgs/missing.png"},
            {"bytes": None, "path": None}, {"bytes": c, "path": "ignored-when-bytes-present.png"},
            {"bytes": None, "path": "imgs/a.png"}]
    col = pa.array(rows, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": col, "n": list(range(len(rows)))}), tmp_path / "ref.parquet")
    unit = plan_units([str(tmp_path / "ref.parquet")]).units[0]
    samples = list(iter_samples(unit, UnitInfo()))
    assert [s.idx for s in samples] == list(range(7))
    assert [s.data for s in samples[:3]] == [a, b, c] and samples[5].data == c and samples[6].data == a
    assert samples[3].error.kind == "read" and "missing.png" in samples[3].error.message
    assert samples[4].error.kind == "empty"
    assert [s.extra["n"] for s in samples] == list(range(7))


def test_reading_and_committing_do_not_import_torch():
    """Listing, reading and committing units need no model: the plugin sink, ``gq gc`` and planning import them in
    processes that never run one, and importing torch costs about a second of CPU each (on 2 cores the first-wave
    pipeline fell from 0.85 to 0.66 of a DataLoader loop's images/s when a storage helper pulled it in)."""
    import subprocess
    import sys

    code = ("import sys, gq_pipeline.planning, gq_pipeline.sources, gq_pipeline.commit, gq_pipeline.manifest, "
            "gq_model.storage; "
            "print(sorted(m for m in ('torch', 'gq_model.model') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
