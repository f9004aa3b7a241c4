"""Switching ``--format`` on one output writes only the missing format, from the committed shards, with no model
call: the shards, records and wids index are then those of a fresh run, nothing is orphaned, nothing deleted.
Where a conversion is impossible (a tar holding parsed ``.json`` members, a Parquet input's typed columns, latents
that were never stored), the unit goes through the model again, and the run says why."""
from __future__ import annotations

import filecmp
import json
import os

import pytest
from PIL import Image

import gq_pipeline
from gq_pipeline.gc_cli import collect_garbage
from gq_pipeline.worker import ModelRunner
from tests.helpers import encode_image, make_image_parquet, make_tiny_model, make_wds_tar, rgb_bytes

SIZE = 32


@pytest.fixture(scope="module")
def model():
    return make_tiny_model()


def _inputs(root, with_json: bool = False, with_parquet: bool = False) -> list[str]:
    """A folder (with one broken file), a tar with .txt/.cls pass-through, and on request a tar with .json members
    and a Parquet input with caption/label columns."""
    (root / "imgs").mkdir(parents=True)
    for i in range(5):
        (root / "imgs" / f"{i}.png").write_bytes(rgb_bytes(40 + i, 36, seed=i))
    (root / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    samples = [{"__key__": f"s{i:03d}", "png": encode_image(Image.new("RGB", (40, 44), (30 * i, 90, 20)), "PNG"),
                "txt": f"caption {i}", "cls": str(i)} for i in range(4)]
    (root / "plain.tar").write_bytes(make_wds_tar(samples))
    out = [str(root / "imgs"), str(root / "plain.tar")]
    if with_json:
        js = [{"__key__": f"j{i}", "jpg": rgb_bytes(40, 40, seed=50 + i), "json": json.dumps({"b": i, "a": [1, 2]})}
              for i in range(3)]
        (root / "meta.tar").write_bytes(make_wds_tar(js))
        out.append(str(root / "meta.tar"))
    if with_parquet:
        (root / "table.parquet").write_bytes(make_image_parquet(4, seed=7))
        out.append(str(root / "table.parquet"))
    return out


class _CountingModel:
    """Counts the model calls of a run (``ModelRunner.tokenize``, the workers' one model entry)."""

    def __init__(self, monkeypatch, fail: bool):
        self.calls = 0
        original = ModelRunner.tokenize

        def tokenize(runner, group):
            self.calls += 1
            if fail:
                raise AssertionError("the model was called")
            return original(runner, group)

        monkeypatch.setattr(ModelRunner, "tokenize", tokenize)


def _run(model, inputs, out, fmt, **kw):
    return gq_pipeline.tokenize(model, inputs, str(out), format=fmt, image_size=SIZE, unit_size=3, batch_size=4,
                                progress=False, model_placement="driver", **kw)


def _files(out) -> dict[str, bytes]:
    found = {}
    for sub in ("parquet", "webdataset", ".gq/errors", ".gq/units"):
        d = os.path.join(out, sub)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            found[f"{sub}/{name}"] = open(os.path.join(d, name), "rb").read()
    return found


def _same_as_fresh(out, fresh) -> None:
    mine, theirs = _files(out), _files(fresh)
    assert sorted(mine) == sorted(theirs)
    for rel in mine:
        assert mine[rel] == theirs[rel], rel  # shards, error files and commit records: the bytes of a fresh run
    index = json.load(open(os.path.join(out, ".gq", "webdataset-index.json")))
    want = json.load(open(os.path.join(fresh, ".gq", "webdataset-index.json")))
    assert index["shardlist"] == want["shardlist"]
    manifest, fresh_manifest = (json.load(open(os.path.join(d, ".gq", "manifest.json"))) for d in (out, fresh))
    assert manifest["units"] == fresh_manifest["units"]
    assert manifest["inputs"] == manifest["tokenized"] + manifest["errors"] == fresh_manifest["inputs"]


def _clean(out) -> None:
    report = collect_garbage(str(out), dry_run=True)
    assert report.removed == [] and report.damaged == [] and report.mismatched == [], report
    assert not os.listdir(os.path.join(out, ".gq", "staging"))


def test_parquet_webdataset_parquet_both_makes_no_model_call(tmp_path, model, monkeypatch):
    inputs = _inputs(tmp_path / "in")
    out, fresh_both = tmp_path / "out", tmp_path / "fresh_both"
    first = _run(model, inputs, out, "parquet")
    assert first["inputs"] == first["tokenized"] + first["errors"] == 10 and first["errors"] == 1
    _run(model, inputs, fresh_both, "both")
    counter = _CountingModel(monkeypatch, fail=True)
    s = _run(model, inputs, out, "webdataset")
    assert s["units_converted"] == s["units_planned"] and s["units_committed"] == 0
    _same_as_fresh(out, fresh_both)  # the Parquet shards kept, the tars written: as a fresh `both` run
    _clean(out)
    for fmt in ("parquet", "both", "webdataset"):
        s = _run(model, inputs, out, fmt)
        assert s["units_converted"] == s["units_committed"] == 0 and s["units_skipped"] == s["units_planned"]
        _same_as_fresh(out, fresh_both)  # nothing deleted: the record keeps every format it has
        _clean(out)
    assert counter.calls == 0


def test_webdataset_then_parquet_rebuilds_parquet_from_the_tars(tmp_path, model, monkeypatch):
    inputs = _inputs(tmp_path / "in")
    out, fresh_parquet, fresh_both = tmp_path / "out", tmp_path / "fresh_parquet", tmp_path / "fresh_both"
    _run(model, inputs, out, "webdataset")
    _run(model, inputs, fresh_parquet, "parquet")
    _run(model, inputs, fresh_both, "both")
    counter = _CountingModel(monkeypatch, fail=True)
    s = _run(model, inputs, out, "parquet")
    assert s["units_converted"] == s["units_planned"] and counter.calls == 0
    for name in os.listdir(fresh_parquet / "parquet"):  # byte-identical to a fresh Parquet run's shards
        assert filecmp.cmp(out / "parquet" / name, fresh_parquet / "parquet" / name, shallow=False), name
    _same_as_fresh(out, fresh_both)
    _clean(out)


def test_what_cannot_be_converted_goes_through_the_model_and_says_why(tmp_path, model, monkeypatch, capsys):
    inputs = _inputs(tmp_path / "in", with_json=True, with_parquet=True)
    out, fresh_both = tmp_path / "out", tmp_path / "fresh_both"
    first = _run(model, inputs, out, "webdataset")
    _run(model, inputs, fresh_both, "both")
    counter = _CountingModel(monkeypatch, fail=False)
    s = gq_pipeline.tokenize(model, inputs, str(out), format="parquet", image_size=SIZE, unit_size=3, batch_size=4,
                             model_placement="driver", progress=True)
    err = capsys.readouterr().err
    # the .json tar and the Parquet input (its columns are typed) are tokenized again; the others converted
    assert s["units_committed"] == 2 and s["units_converted"] == s["units_planned"] - 2, s
    assert "stored parsed in the tar" in err and "types lost" in err, err
    assert counter.calls >= 2
    assert s["inputs"] == first["inputs"] and s["tokenized"] + s["errors"] == s["inputs"]
    _same_as_fresh(out, fresh_both)
    _clean(out)


def test_latents_asked_later_need_the_model_and_keep_every_format(tmp_path, model, monkeypatch):
    inputs = _inputs(tmp_path / "in")
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    _run(model, inputs, out, "both")
    _run(model, inputs, fresh, "both", latents=True)
    counter = _CountingModel(monkeypatch, fail=False)
    s = _run(model, inputs, out, "parquet", latents=True)  # latents are not in the shards: the model again
    assert s["units_committed"] == s["units_planned"] and counter.calls > 0
    _same_as_fresh(out, fresh)  # the tars are rewritten with latents too, not left behind without them
    _clean(out)


@pytest.mark.parametrize("step", ["before_record", "before_publish"])
def test_a_conversion_stopped_at_either_side_of_its_commit_point_is_finished_by_the_rerun(tmp_path, model,
                                                                                        monkeypatch, step):
    """The staged tar, then the record replace (the commit point), then the publish: stopped before the record, the
    unit stays parquet-only and its staging is removed; stopped after it, the staged tar is rolled forward. Either
    way the rerun ends as a fresh `both` run, with no model call."""
    import gq_pipeline.convert as convert

    inputs = _inputs(tmp_path / "in")
    out, fresh_both = tmp_path / "out", tmp_path / "fresh_both"
    _run(model, inputs, out, "parquet")
    _run(model, inputs, fresh_both, "both")
    counter = _CountingModel(monkeypatch, fail=True)
    target = "replace_if_match" if step == "before_record" else "publish_unit"
    real = getattr(convert, target)

    def stop(*a, **kw):
        raise OSError(f"stopped {step}")

    monkeypatch.setattr(convert, target, stop)
    s = _run(model, inputs, out, "webdataset", max_attempts=1)
    assert s["units_failed"] and all(f"stopped {step}" in f["reason"] for f in s["units_failed"])
    staged = [p for p in (out / ".gq" / "staging").rglob("*.tar")]
    assert staged  # the tars wait in staging, where no plain reader looks
    assert not list((out / "webdataset").glob("*.tar")) if (out / "webdataset").exists() else True
    monkeypatch.setattr(convert, target, real)
    again = _run(model, inputs, out, "webdataset")
    assert again["units_failed"] == [] and counter.calls == 0
    _same_as_fresh(out, fresh_both)
    _clean(out)


def test_a_format_switch_on_s3(tmp_path, model, moto_s3, s3, monkeypatch):
    """The same on an object store: the record replaced by If-Match, the staged tar published by copy + delete."""
    inputs = _inputs(tmp_path / "in")
    s3.mkdir("gq-switch")
    fresh_both = tmp_path / "fresh_both"
    _run(model, inputs, fresh_both, "both")
    _run(model, inputs, "s3://gq-switch/out", "parquet", storage_options=moto_s3)
    counter = _CountingModel(monkeypatch, fail=True)
    s = _run(model, inputs, "s3://gq-switch/out", "webdataset", storage_options=moto_s3)
    assert s["units_converted"] == s["units_planned"] and counter.calls == 0
    s3.invalidate_cache()
    want = _files(fresh_both)
    got = {}
    for sub in ("parquet", "webdataset", ".gq/errors", ".gq/units"):
        for p in s3.ls(f"gq-switch/out/{sub}", detail=False):
            got[f"{sub}/{p.rsplit('/', 1)[-1]}"] = s3.cat_file(p)
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)
    assert not s3.find("gq-switch/out/.gq/staging")
    report = collect_garbage("s3://gq-switch/out", dry_run=True, storage_options=moto_s3)
    assert report.removed == [] and report.damaged == []
