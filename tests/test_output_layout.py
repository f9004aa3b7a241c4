"""Output layout (format version 2) and one schema per output, tested with the libraries users point at an output.

Issue 18, items 2 and 3: a run over a folder, a WebDataset tar and a Parquet file must give Parquet shards that all
have the same columns (so polars, HF ``datasets`` and DuckDB read the folder without options), and the obvious
directory read of ``OUT``, ``OUT/parquet`` and ``OUT/webdataset`` must give token rows only, all of them (no error
rows, no JSON read as data). Version-1 outputs (records, errors and manifest at the root) stay readable, and a rerun
of one is refused with what to do.
"""
from __future__ import annotations

import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import make_image_parquet, make_wds_tar, rgb_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The last commit whose gq wrote format version 1 (layout with units/, errors/, manifest.json at the root).
V1_COMMIT = "31ad19f66f3fafdf57e40e0a42c1e235068bc48c"


def _inputs(root: str) -> list[str]:
    """A folder (3 images + 1 undecodable), a tar (txt/json/cls; one sample without them) and a Parquet file
    (caption/label; one bad row): 12 inputs, 10 tokenizable."""
    folder = os.path.join(root, "folder")
    os.makedirs(folder, exist_ok=True)
    for i in range(3):
        with open(os.path.join(folder, f"im{i}.jpg"), "wb") as f:
            f.write(rgb_bytes(40, 44, seed=i))
    with open(os.path.join(folder, "bad.jpg"), "wb") as f:
        f.write(b"not an image")
    samples = [{"__key__": f"s{i}", "jpg": rgb_bytes(40, 40, seed=10 + i), "txt": f"t{i}", "cls": str(i),
                "json": json.dumps({"a": i})} for i in range(3)]
    samples.append({"__key__": "s9", "jpg": rgb_bytes(40, 40, seed=19)})
    with open(os.path.join(root, "data.tar"), "wb") as f:
        f.write(make_wds_tar(samples))
    with open(os.path.join(root, "data.parquet"), "wb") as f:
        f.write(make_image_parquet(4, bad_rows=(2,)))
    return [folder, os.path.join(root, "data.tar"), os.path.join(root, "data.parquet")]


def _tokenize(model, inputs, out, fmt, **kw):
    from gq_pipeline import tokenize

    return tokenize(model, inputs, out, format=fmt, image_size=32, progress=False, model_placement="driver",
                    unit_size=2, **kw)


def _committed_keys(out: str) -> set[str]:
    keys = set()
    for f in glob.glob(f"{out}/parquet/*.parquet"):
        keys.update(pq.read_table(f, columns=["key"]).column("key").to_pylist())
    return keys


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """Two real runs over the same mixed inputs: ``both`` formats and ``parquet`` only."""
    root = str(tmp_path_factory.mktemp("layout"))
    inputs = _inputs(os.path.join(root, "in"))
    out = {}
    for fmt in ("both", "parquet"):
        o = os.path.join(root, f"out-{fmt}")
        s = _tokenize(tiny_model, inputs, o, fmt)
        assert (s["inputs"], s["tokenized"], s["errors"]) == (12, 10, 2)
        out[fmt] = o
    keys = _committed_keys(out["both"])
    assert len(keys) == 10 and keys == _committed_keys(out["parquet"])
    return {"inputs": inputs, "keys": keys, **out}


# ------------------------------------------------------------------------------------------------ layout
def test_root_holds_token_folders_and_one_hidden_folder(runs):
    assert sorted(os.listdir(runs["both"])) == [".gq", "parquet", "webdataset"]
    assert sorted(os.listdir(runs["parquet"])) == [".gq", "parquet"]
    meta = os.listdir(os.path.join(runs["both"], ".gq"))
    assert {"manifest.json", "units", "errors", "webdataset-index.json"} <= set(meta)
    assert all(n.endswith(".parquet") for n in os.listdir(os.path.join(runs["both"], "parquet")))
    assert all(n.endswith(".tar") for n in os.listdir(os.path.join(runs["both"], "webdataset")))
    m = json.load(open(os.path.join(runs["both"], ".gq", "manifest.json")))
    assert m["format_version"] == 2 and m["wids_index"] == ".gq/webdataset-index.json"


def test_layout_module_names_every_path():
    from gq_pipeline import layout

    v2 = layout.CURRENT
    assert v2.version == 2
    for rel in (v2.units, v2.errors, v2.manifest, v2.wids_index, v2.plan, v2.staging, v2.lease, v2.sink_tmp):
        assert rel.startswith(".gq/"), rel
    assert v2.shard("parquet", "u-1", "fp") == "parquet/u-1-fp.parquet"
    assert v2.shard("webdataset", "u-1", "fp") == "webdataset/u-1-fp.tar"
    assert v2.shard("errors", "u-1", "fp") == ".gq/errors/u-1-fp.parquet"
    assert v2.wids_url("webdataset/x.tar") == "../webdataset/x.tar"
    assert layout.V1.manifest == "manifest.json" and layout.V1.wids_url("webdataset/x.tar") == "webdataset/x.tar"


# ------------------------------------------------------------------------------------------------ one schema
def test_every_parquet_shard_has_the_declared_schema(runs):
    from gq_pipeline.schema import schema_from_json

    out = runs["both"]
    files = sorted(glob.glob(f"{out}/parquet/*.parquet"))
    assert len(files) >= 4  # folder units, the tar, the Parquet file
    schemas = [pq.read_schema(f).remove_metadata() for f in files]
    assert all(s.equals(schemas[0]) for s in schemas)
    m = json.load(open(os.path.join(out, ".gq", "manifest.json")))
    assert [(c["name"], c["type"]) for c in m["schema"]] == [(f.name, str(f.type)) for f in schemas[0]]
    declared = schema_from_json(m["passthrough_schema"])
    assert declared.names == ["txt", "json", "cls", "caption", "label"]
    assert declared.field("label").type == pa.int16() and declared.field("cls").type == pa.int64()
    for rec in glob.glob(f"{out}/.gq/units/*.json"):
        assert schema_from_json(json.load(open(rec))["passthrough_schema"]).equals(declared)
    rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
    by_source = {}
    for r in rows:
        kind = "tar" if r["source"].endswith(".tar") else "parquet" if r["source"].endswith(".parquet") else "file"
        by_source.setdefault(kind, []).append(r)
    assert all(r["caption"] is None and r["txt"] is None for r in by_source["file"])
    assert sorted(r["caption"] for r in by_source["parquet"]) == ["caption 0", "caption 1", "caption 3"]
    assert sorted(r["txt"] or "" for r in by_source["tar"]) == ["", "t0", "t1", "t2"]
    assert all(r["caption"] is None for r in by_source["tar"])


def test_duckdb_reads_the_mixed_folder_without_options(runs):
    duckdb = pytest.importorskip("duckdb")
    out = runs["both"]
    n, captions, txts, labels = duckdb.sql(
        f"SELECT count(*), count(caption), count(txt), sum(label) FROM read_parquet('{out}/parquet/*.parquet')"
    ).fetchall()[0]
    assert (n, captions, txts, labels) == (10, 3, 3, 0 + 1 + 3)
    keys = {k for (k,) in duckdb.sql(f"SELECT key FROM read_parquet('{out}/parquet/*.parquet')").fetchall()}
    assert keys == runs["keys"]


def test_polars_reads_the_mixed_folder_without_options(runs):
    pl = pytest.importorskip("polars")  # not installed in the project's venv at the time of writing
    df = pl.read_parquet(f"{runs['both']}/parquet/*.parquet")
    assert df.height == 10 and set(df["key"]) == runs["keys"] and df["caption"].null_count() == 7


def _hf(monkeypatch, tmp_path, *args, **kw):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    return datasets.load_dataset(*args, split="train", cache_dir=str(tmp_path / "hf"), **kw)


@pytest.mark.parametrize("how", ["root", "parquet_folder", "parquet_data_dir"])
def test_huggingface_load_dataset_gives_token_rows_only(runs, monkeypatch, tmp_path, how):
    out = runs["both"]  # manifest, index and records under .gq/, tars beside the Parquet shards
    args, kw = {"root": ((out,), {}), "parquet_folder": ((f"{out}/parquet",), {}),
                "parquet_data_dir": (("parquet",), {"data_dir": f"{out}/parquet"})}[how]
    ds = _hf(monkeypatch, tmp_path, *args, **kw)
    assert len(ds) == 10 and set(ds["key"]) == runs["keys"]
    assert {"txt", "json", "cls", "caption", "label", "tokens"} <= set(ds.features)


def test_pyarrow_dataset_on_every_folder(runs):
    import pyarrow.dataset as pds

    for url in (runs["parquet"], f"{runs['parquet']}/parquet", f"{runs['both']}/parquet"):
        t = pds.dataset(url, format="parquet").to_table()
        assert t.num_rows == 10 and set(t.column("key").to_pylist()) == runs["keys"], url
    # The root of a `--format both` output also holds tars: pyarrow.dataset does not filter by extension, so it
    # stops on one, by name (docs/token-format.md says to point it at parquet/ or pass exclude_invalid_files).
    with pytest.raises(pa.ArrowInvalid, match=r"\.tar"):
        pds.dataset(runs["both"], format="parquet").to_table()
    t = pds.dataset(runs["both"], format="parquet", exclude_invalid_files=True).to_table()
    assert set(t.column("key").to_pylist()) == runs["keys"]


def test_ray_data_directory_reads(runs, ray_cluster):
    import ray

    for url in (runs["both"], f"{runs['both']}/parquet", runs["parquet"]):
        rows = ray.data.read_parquet(url).take_all()
        assert len(rows) == 10 and {r["key"] for r in rows} == runs["keys"], url
        assert all(r["tokens"] is not None for r in rows)
    samples = ray.data.read_webdataset(f"{runs['both']}/webdataset").take_all()
    assert len(samples) == 10 and {s["__key__"] for s in samples} == runs["keys"]


def test_webdataset_readers(runs, monkeypatch, tmp_path, tiny_model):
    """HF's WebDataset builder takes its columns from the first samples, so it needs samples with the same members:
    true of an output whose inputs all have the same pass-through members (here a folder)."""
    wds = pytest.importorskip("webdataset")
    out = runs["both"]
    tars = sorted(glob.glob(f"{out}/webdataset/*.tar"))
    assert {s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False)} == runs["keys"]
    wids = pytest.importorskip("wids")
    index = wids.ShardListDataset(f"{out}/.gq/webdataset-index.json", cache_dir=str(tmp_path / "wids"))
    assert len(index) == 10 and {index[i]["__key__"] for i in range(len(index))} == runs["keys"]
    folder_out = str(tmp_path / "folder-out")
    _tokenize(tiny_model, [runs["inputs"][0]], folder_out, "webdataset")
    want = {n.split(".", 1)[0] for t in glob.glob(f"{folder_out}/webdataset/*.tar")
            for n in tarfile.open(t).getnames()}
    assert len(want) == 3
    for args, kw in (((f"{folder_out}/webdataset",), {}), (("webdataset",), {"data_dir": f"{folder_out}/webdataset"}),
                     ((folder_out,), {})):
        ds = _hf(monkeypatch, tmp_path, *args, **kw)
        assert len(ds) == 3 and set(ds["__key__"]) == want, (args, kw)


# ------------------------------------------------------------------------------------------------ reruns
def test_rerun_with_fewer_inputs_keeps_the_schema_and_more_columns_are_refused(runs, tiny_model, tmp_path):
    from gq_pipeline.schema import SchemaConflictError

    out = str(tmp_path / "out")
    shutil.copytree(runs["parquet"], out)
    before = {f: open(f, "rb").read() for f in glob.glob(f"{out}/parquet/*.parquet")}
    s = _tokenize(tiny_model, runs["inputs"][:1], out, "parquet")  # the folder alone: nothing new to do
    assert s["units_committed"] == 0 and s["tokenized"] == 10
    extra = tmp_path / "more.parquet"
    t = pq.read_table(io.BytesIO(make_image_parquet(2, seed=5)))
    pq.write_table(t.append_column("score", pa.array([0.5, 0.7])), extra)
    with pytest.raises(SchemaConflictError, match=r"adds column\(s\) score.*new --output"):
        _tokenize(tiny_model, runs["inputs"] + [str(extra)], out, "parquet")
    assert {f: open(f, "rb").read() for f in glob.glob(f"{out}/parquet/*.parquet")} == before
    # a new image in the folder (no new columns) is tokenized with the committed schema
    with open(os.path.join(str(tmp_path), "im-new.jpg"), "wb") as f:
        f.write(rgb_bytes(36, 36, seed=99))
    s = _tokenize(tiny_model, runs["inputs"] + [str(tmp_path / "im-new.jpg")], out, "parquet")
    assert s["units_committed"] == 1 and s["tokenized"] == 11
    schemas = [pq.read_schema(f).remove_metadata() for f in glob.glob(f"{out}/parquet/*.parquet")]
    assert len(schemas) == len(before) + 1 and all(x.equals(schemas[0]) for x in schemas)


def test_conflicting_types_across_parquet_inputs_are_refused_at_planning(tiny_model, tmp_path):
    from gq_pipeline.schema import SchemaConflictError

    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    t = pq.read_table(io.BytesIO(make_image_parquet(2)))
    pq.write_table(t, a)
    pq.write_table(t.set_column(t.schema.get_field_index("label"), "label",
                                pa.array([{"x": 1}, {"x": 2}])), b)
    with pytest.raises(SchemaConflictError, match="incompatible types"):
        _tokenize(tiny_model, [str(a), str(b)], str(tmp_path / "out"), "parquet")
    assert not glob.glob(str(tmp_path / "out" / "parquet" / "*"))


# ------------------------------------------------------------------------------------------------ version 1
@pytest.fixture(scope="module")
def v1_output(tmp_path_factory, tiny_model_dir):
    """A real version-1 output, written by the gq of :data:`V1_COMMIT` (extracted from git)."""
    if shutil.which("git") is None or subprocess.run(["git", "-C", REPO, "cat-file", "-e", V1_COMMIT],
                                                     capture_output=True).returncode != 0:
        pytest.skip("needs the git history of the repository (the version-1 writer)")
    root = tmp_path_factory.mktemp("v1")
    old = root / "gq-v1"
    old.mkdir()
    archive = subprocess.run(["git", "-C", REPO, "archive", V1_COMMIT, "gq_pipeline", "gq_model", "kernels"],
                             capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(old, filter="data")
    inputs = _inputs(str(root / "in"))
    out = str(root / "out")
    code = ("import sys, gq_pipeline; "
            "gq_pipeline.tokenize(sys.argv[1], sys.argv[3:], sys.argv[2], format='both', image_size=32, "
            "progress=False, model_placement='driver', unit_size=2)")
    env = dict(os.environ, PYTHONPATH=str(old))
    subprocess.run([sys.executable, "-c", code, tiny_model_dir, out, *inputs], env=env, check=True, timeout=600,
                   cwd=str(root))
    assert os.path.exists(os.path.join(out, "manifest.json")) and os.path.isdir(os.path.join(out, "units"))
    assert not os.path.exists(os.path.join(out, ".gq"))
    return {"out": out, "inputs": inputs, "keys": _committed_keys(out)}


def test_version1_output_is_read_by_every_gq_reader(v1_output, tmp_path, tiny_model_dir):
    from gq_pipeline import TokenDataset
    from gq_pipeline.gc_cli import collect_garbage
    from gq_pipeline.shards import list_shards

    out = v1_output["out"]
    assert len(v1_output["keys"]) == 10
    for fmt in ("parquet", "webdataset"):
        ss = list_shards(out, fmt)
        assert ss.committed and ss.layout.version == 1 and ss.num_samples == 10
        assert {s["key"] for s in TokenDataset(out, format=fmt, shuffle=False)} == v1_output["keys"]
    assert {s["key"] for s in TokenDataset(f"{out}/parquet", shuffle=False)} == v1_output["keys"]
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "inspect", out, "--json"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["samples"] == 10 and report["errors"]["total"] == 2 and report["manifest"]["inputs"] == 12
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "decode", "--model", tiny_model_dir, "--input", out,
                        "--out", str(tmp_path / "dec"), "--limit", "3", "--batch-size", "1"],
                       capture_output=True, text=True, env=env)
    # (--batch-size 1: a version-1 mixed output's shards have different columns, and batching samples across them is
    # TokenDataset's part of issue 18 item 2, not this test's)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(glob.glob(str(tmp_path / "dec" / "*.png"))) >= 3
    # gc on a version-1 output: its errors/ folder is the one checked, an orphan there is removed
    planted = os.path.join(out, "errors", "u-0000000000000000-0000000000000000.parquet")
    shutil.copy(glob.glob(os.path.join(out, "errors", "*.parquet"))[0], planted)
    report = collect_garbage(out)
    assert report.orphans == ["errors/u-0000000000000000-0000000000000000.parquet"] and not report.damaged
    assert not os.path.exists(planted) and not os.path.exists(os.path.join(out, ".gq"))


def test_rerun_of_a_version1_output_is_refused_and_leaves_it_as_it_was(v1_output, tiny_model):
    from gq_pipeline.manifest import OlderLayoutError

    out = v1_output["out"]

    def snapshot():
        return {os.path.relpath(os.path.join(d, n), out): os.path.getsize(os.path.join(d, n))
                for d, _, names in os.walk(out) for n in names}

    before = snapshot()
    with pytest.raises(OlderLayoutError, match=r"version 1.*new --output"):
        _tokenize(tiny_model, v1_output["inputs"], out, "both")
    assert snapshot() == before and not os.path.exists(os.path.join(out, ".gq"))


def test_gq_inspect_reports_the_declared_columns(runs, capsys):
    from jobs.cli import main as gq_main

    assert gq_main(["inspect", runs["both"], "--json", "--no-tokens"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["passthrough_columns"] == ["txt", "json", "cls", "caption", "label"] and r["samples"] == 10
    assert r["errors"]["total"] == 2 and not r["problems"]


def test_a_foreign_manifest_json_is_not_taken_for_a_version1_output(tiny_model, tmp_path):
    out, folder = tmp_path / "out", tmp_path / "in"
    out.mkdir()
    folder.mkdir()
    (out / "manifest.json").write_text('{"name": "not gq"}')
    (folder / "a.jpg").write_bytes(rgb_bytes(40, 40))
    s = _tokenize(tiny_model, [str(folder)], str(out), "parquet")
    assert s["tokenized"] == 1 and (out / "manifest.json").read_text() == '{"name": "not gq"}'


def test_a_unit_with_columns_the_output_schema_lacks_fails_instead_of_dropping_them():
    """A Parquet file rewritten between planning and its unit's run: its values are never silently dropped."""
    from gq_pipeline.writers import _passthrough_columns

    out_schema = pa.schema([("caption", pa.string()), ("label", pa.int64())])
    unit = pa.schema([("caption", pa.string()), ("label", pa.int16())])
    cols = dict(_passthrough_columns([{"caption": "a", "label": 3}, {"caption": None}], unit, out_schema))
    assert cols["label"].type == pa.int64() and cols["label"].to_pylist() == [3, None]
    assert dict(_passthrough_columns([{}], None, out_schema))["caption"].to_pylist() == [None]
    with pytest.raises(ValueError, match=r"\['txt'\]"):  # a tar sample's caption, were the schema to lack it
        _passthrough_columns([{"txt": "x"}], None, out_schema)
    with pytest.raises(ValueError, match=r"\['score'\].*changed since the run was planned"):
        _passthrough_columns([{"caption": "a", "score": 0.5}], unit.append(pa.field("score", pa.float64())),
                             out_schema)
