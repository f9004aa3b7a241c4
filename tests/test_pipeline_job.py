"""The Ray Data tokenization job end to end on a local 2-CPU Ray cluster: local folders, S3 (moto), tars, Parquet."""
from __future__ import annotations

import glob
import hashlib
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import gq_pipeline
from gq_pipeline import preprocess_image
from gq_pipeline.manifest import IncompatibleOutputError
from tests.helpers import make_image_parquet, make_tiny_model, make_wds_tar, rgb_bytes

SIZE = 32


def _direct_tokens(model, data: bytes, crop: str = "center") -> np.ndarray:
    return model.tokenize(preprocess_image(data, SIZE, crop)[None])[0].numpy()


def _tree_hashes(root: str) -> dict[str, str]:
    out = {}
    for sub in ("parquet", "webdataset", ".gq/errors", ".gq/units"):
        for p in glob.glob(os.path.join(root, sub, "*")):
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _read_parquet_dir(root: str):
    return pq.read_table(sorted(glob.glob(os.path.join(root, "parquet", "*.parquet")))).to_pylist()


@pytest.fixture(scope="module")
def folder_run(ray_cluster, messy_folder, tiny_model_dir, tmp_path_factory):
    folder, images = messy_folder
    out = str(tmp_path_factory.mktemp("out") / "tokens")
    # A Ray actor pool runs the model here (the placement GPUs use); the reruns below take the default for this
    # single CPU node, the driver, and must reproduce the same bytes.
    summary = gq_pipeline.tokenize(tiny_model_dir, [folder], out, format="both", image_size=SIZE, unit_size=4,
                                   batch_size=8, max_pixels=1_000_000, progress=False, model_placement="actors")
    assert summary["throughput"]["resources"]["model_placement"] == "actors"
    return folder, images, out, summary


def test_counts_add_up_and_error_kinds(folder_run):
    folder, images, out, s = folder_run
    bad = {n: k for n, (_, k) in images.items() if k}
    assert s["units_failed"] == []
    assert s["inputs"] == len(images) and s["errors"] == len(bad) and s["tokenized"] == len(images) - len(bad)
    assert s["errors_by_kind"] == {"decode": 2, "empty": 1, "too_large": 1}
    assert s["ignored_files"] == 1  # notes.txt
    manifest = json.load(open(os.path.join(out, ".gq", "manifest.json")))
    for u in manifest["units"]:
        assert u["tokenized"] + u["errors"] == u["inputs"]
        assert sum(u["errors_by_kind"].values()) == u["errors"]
    assert sum(u["inputs"] for u in manifest["units"]) == manifest["inputs"] == len(images)
    errors = pq.read_table(sorted(glob.glob(os.path.join(out, ".gq", "errors", "*.parquet")))).to_pylist()
    by_name = {os.path.basename(e["source"]): e["error"] for e in errors}
    assert by_name == bad
    assert s["throughput"]["images_per_s"] > 0 and set(s["throughput"]["time_split"]) == \
        {"read_decode_s", "model_s", "write_s"}


def test_tokens_equal_direct_model_tokenize(folder_run, tiny_model):
    folder, images, out, s = folder_run
    rows = _read_parquet_dir(out)
    assert len(rows) == s["tokenized"] and len({r["key"] for r in rows}) == len(rows)
    prefix = "file://" + os.path.abspath(folder) + "/"
    for r in rows:
        name = r["source"][len(prefix):]
        assert r["member"] is None and r["token_shape"] == [1, SIZE // 8, SIZE // 8]
        expected = _direct_tokens(tiny_model, images[name][0])
        assert np.array_equal(np.array(r["tokens"]).reshape(r["token_shape"]), expected), name
    a_keys = [r["key"] for r in rows if os.path.basename(r["source"]) in ("a.jpg", "a.png")]
    assert len(set(a_keys)) == 2
    rot = next(r for r in rows if r["source"].endswith("exif_rotated.jpg"))
    assert (rot["width"], rot["height"]) == (32, 64)
    schema = pq.read_schema(glob.glob(os.path.join(out, "parquet", "*.parquet"))[0])
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert meta["gq.model_fingerprint"] == tiny_model.model_fingerprint and meta["gq.codebook_size"] == "4096"
    assert str(schema.field("tokens").type) in ("list<element: uint16>", "list<item: uint16>")


def test_webdataset_and_wids_read_back(folder_run):
    import webdataset as wds
    import wids

    folder, images, out, s = folder_run
    by_key = {r["key"]: r for r in _read_parquet_dir(out)}
    tars = sorted(glob.glob(os.path.join(out, "webdataset", "*.tar")))
    seen = 0
    for sample in wds.WebDataset(tars, shardshuffle=False).decode():
        r = by_key[sample["__key__"]]
        assert np.array_equal(sample["tokens.npy"].reshape(-1), np.array(r["tokens"], np.uint16))
        assert sample["tokens.npy"].dtype == np.uint16 and sample["json"]["source"] == r["source"]
        seen += 1
    assert seen == s["tokenized"]
    ds = wids.ShardListDataset(os.path.join(out, ".gq", "webdataset-index.json"))
    assert len(ds) == s["tokenized"] and ds[0][".tokens.npy"] is not None


def test_rerun_skips_and_redo_reproduces_bytes(folder_run, tiny_model_dir):
    folder, images, out, s = folder_run
    before = _tree_hashes(out)
    again = gq_pipeline.tokenize(tiny_model_dir, [folder], out, format="both", image_size=SIZE, unit_size=4,
                                 batch_size=8, max_pixels=1_000_000, progress=False)
    assert again["units_committed"] == 0 and again["units_skipped"] == s["units_planned"]
    assert again["inputs"] == s["inputs"] and _tree_hashes(out) == before
    # Forget two units (as if killed before their commit records) and a shard: only they are redone, same bytes.
    units = sorted(glob.glob(os.path.join(out, ".gq", "units", "*.json")))[:2]
    for p in units:
        os.remove(p)
    os.remove(sorted(glob.glob(os.path.join(out, "parquet", "*.parquet")))[0])
    redo = gq_pipeline.tokenize(tiny_model_dir, [folder], out, format="both", image_size=SIZE, unit_size=4,
                                batch_size=3, max_pixels=1_000_000, progress=False)
    assert redo["throughput"]["resources"]["model_placement"] == "driver"
    assert redo["units_committed"] >= 2 and redo["inputs"] == s["inputs"]
    assert _tree_hashes(out) == before  # the driver placement writes the actor pool's bytes


def test_other_model_or_preprocessing_is_refused(folder_run, tmp_path):
    folder, images, out, s = folder_run
    other = make_tiny_model(seed=1)
    with pytest.raises(IncompatibleOutputError, match="model_fingerprint"):
        gq_pipeline.tokenize(other, [folder], out, image_size=SIZE, progress=False)
    with pytest.raises(IncompatibleOutputError, match="image_size"):
        gq_pipeline.tokenize(make_tiny_model(seed=0), [folder], out, image_size=64, progress=False)
    with pytest.raises(IncompatibleOutputError, match="crop"):
        gq_pipeline.tokenize(make_tiny_model(seed=0), [folder], out, image_size=SIZE, crop="none", progress=False)
    # bf16 changes some tokens: an fp32 output never receives bf16 tokens (refused before any work)
    with pytest.raises(IncompatibleOutputError, match="encoder_precision 'fp32'"):
        gq_pipeline.tokenize(make_tiny_model(seed=0), [folder], out, image_size=SIZE, precision="bf16",
                             progress=False)
    meta = pq.read_schema(glob.glob(os.path.join(out, "parquet", "*.parquet"))[0]).metadata
    assert json.loads(meta[b"gq.preprocess"])["encoder_precision"] == "fp32"


def test_shards_without_any_commit_record_are_refused_by_their_names(folder_run, tmp_path):
    """A run killed after writing shards but before its first commit record leaves no manifest and no units/: the
    shard names (which end in the model fingerprint) are then the only sign of whose tokens they are."""
    import shutil

    folder, images, out, s = folder_run
    orphan = tmp_path / "orphan"
    (orphan / "parquet").mkdir(parents=True)
    shard = sorted(glob.glob(os.path.join(out, "parquet", "*.parquet")))[0]
    shutil.copy(shard, orphan / "parquet")
    with pytest.raises(IncompatibleOutputError, match=rf"holds shards of model\(s\) \['{s['model_fingerprint']}'\]"):
        gq_pipeline.tokenize(make_tiny_model(seed=1), [folder], str(orphan), image_size=SIZE, progress=False)
    # refused before anything was written: the survey reads only, so not even the lease's folder appears
    assert sorted(os.listdir(orphan)) == ["parquet"]


def test_bf16_without_gpu_actors_is_an_error_not_a_silent_fp32_run(ray_cluster, tiny_model, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(rgb_bytes(40, 40))
    with pytest.raises(ValueError, match="bf16 .* GPU actors"):
        gq_pipeline.tokenize(tiny_model, [str(tmp_path / "in")], str(tmp_path / "out"), image_size=SIZE,
                             precision="bf16", progress=False)
    assert not glob.glob(str(tmp_path / "out" / "parquet" / "*.parquet"))


def test_crop_none_and_latents(ray_cluster, tiny_model, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shapes = {"wide.jpg": (40, 90), "tall.png": (72, 40), "square.jpg": (40, 40)}
    for name, (h, w) in shapes.items():
        (src / name).write_bytes(rgb_bytes(h, w, seed=h + w, fmt="PNG" if name.endswith("png") else "JPEG"))
    out = str(tmp_path / "out")
    s = gq_pipeline.tokenize(tiny_model, [str(src)], out, crop="none", latents=True, image_size=SIZE,
                             batch_size=2, progress=False)
    assert s["tokenized"] == 3
    for r in _read_parquet_dir(out):
        data = (src / os.path.basename(r["source"])).read_bytes()
        x = preprocess_image(data, SIZE, "none")[None]
        with torch.no_grad():
            mu, logvar = tiny_model.encode_moments(x)
            idx, _ = tiny_model.quantizer.quantize(mu, logvar)
        assert r["token_shape"] == list(idx.shape[1:]) == [1, x.shape[2] // 8, x.shape[3] // 8]
        assert np.array_equal(np.array(r["tokens"]), idx[0].numpy().reshape(-1))
        lat = np.array(r["latent"], dtype=np.float16).reshape(r["latent_shape"])
        assert r["latent_shape"] == [16, x.shape[2] // 8, x.shape[3] // 8]
        assert np.array_equal(lat, mu[0].numpy().astype(np.float16))
    assert {tuple(r["token_shape"]) for r in _read_parquet_dir(out)} == {(1, 4, 9), (1, 7, 4), (1, 4, 4)}


def test_s3_tars_and_parquet_in_s3_out_via_cli(ray_cluster, moto_s3, s3, tiny_model, tiny_model_dir):
    from jobs.cli import main

    s3.mkdir("gq-in")
    s3.mkdir("gq-out")
    samples = [{"__key__": f"{i:04d}", "jpg": rgb_bytes(40, 44, seed=i), "txt": f"caption {i}",
                "json": json.dumps({"id": i}), "cls": str(i % 3)} for i in range(5)]
    samples.insert(2, {"__key__": "bad", "jpg": b"\xff\xd8 broken", "txt": "x"})
    s3.pipe("gq-in/shards/shard-000.tar", make_wds_tar(samples[:3]))
    s3.pipe("gq-in/shards/shard-001.tar", make_wds_tar(samples[3:]))
    s3.pipe("gq-in/pq/part-0.parquet", make_image_parquet(4, style="hf", bad_rows=(1,)))
    s3.pipe("gq-in/pq/part-1.parquet", make_image_parquet(3, style="img2dataset", seed=50))
    summary = os.path.join(os.path.dirname(tiny_model_dir), "s3_summary.json")
    rc = main(["tokenize", "--model", tiny_model_dir, "--input", "s3://gq-in/shards/shard-{000..001}.tar",
               "s3://gq-in/pq/part-0.parquet", "--output", "s3://gq-out/run1", "--format", "both",
               "--image-size", str(SIZE), "--batch-size", "4", "--storage-options", json.dumps(moto_s3), "--quiet",
               "--summary-json", summary])
    assert rc == 0
    s = json.load(open(summary))
    assert (s["inputs"], s["tokenized"], s["errors"]) == (10, 8, 2) and s["errors_by_kind"] == {"decode": 2}
    files = sorted(s3.find("gq-out/run1"))
    assert not [f for f in files if ".tmp" in f]
    tables = {f: pq.read_table(f, filesystem=s3) for f in files if "/parquet/" in f}
    rows = [r for t in tables.values() for r in t.to_pylist()]
    by_member = {(os.path.basename(r["source"]), r["member"]): r for r in rows}
    r = by_member[("shard-000.tar", "0001")]
    assert (r["txt"], json.loads(r["json"]), r["cls"]) == ("caption 1", {"id": 1}, 1)
    assert np.array_equal(np.array(r["tokens"]), _direct_tokens(tiny_model, samples[1]["jpg"]).reshape(-1))
    pr = by_member[("part-0.parquet", "row=2")]
    assert pr["caption"] == "caption 2" and pr["label"] == 2
    # The webdataset copy holds the pass-through members too.
    import io
    import tarfile

    tar_path = next(f for f in files if f.endswith(".tar") and "webdataset" in f and "index" not in f)
    with tarfile.open(fileobj=io.BytesIO(s3.cat(tar_path))) as tf:
        names = tf.getnames()
    assert any(n.endswith(".tokens.npy") for n in names)
    # A second input set with a column the committed shards lack (part-1 has a `key` column, stored as `input_key`)
    # is refused: one output has one Parquet schema (docs/token-format.md). Into a new output it is fine.
    from gq_pipeline.schema import SchemaConflictError

    with pytest.raises(SchemaConflictError, match="input_key"):
        gq_pipeline.tokenize(tiny_model, ["s3://gq-in/pq/part-1.parquet"], "s3://gq-out/run1", format="both",
                             image_size=SIZE, storage_options=moto_s3, progress=False)
    s2 = gq_pipeline.tokenize(tiny_model, ["s3://gq-in/pq/part-1.parquet"], "s3://gq-out/run2", format="both",
                              image_size=SIZE, storage_options=moto_s3, progress=False)
    assert s2["this_run"] == {"inputs": 3, "tokenized": 3, "errors": 0} and s2["inputs"] == 3
    manifest = json.loads(s3.cat("gq-out/run1/.gq/manifest.json"))
    assert len(manifest["units"]) == 3 and manifest["inputs"] == 10
    p1 = next(iter(pq_tables(s3, "gq-out/run2").values()))
    assert "input_key" in p1.column_names and p1.column("label").type == "int16"


def pq_tables(s3, root):
    return {f: pq.read_table(f, filesystem=s3) for f in s3.find(root) if "/parquet/" in f}


def test_model_and_input_errors_are_clear(tmp_path, tiny_model):
    (tmp_path / "x.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="--config"):
        gq_pipeline.tokenize(str(tmp_path / "x.ckpt"), [str(tmp_path)], str(tmp_path / "o"), progress=False)
    (tmp_path / "notmodel").mkdir()
    with pytest.raises(ValueError, match="neither a GQ bundle"):
        gq_pipeline.tokenize(str(tmp_path / "notmodel"), [str(tmp_path)], str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="memory://"):
        gq_pipeline.tokenize(tiny_model, [str(tmp_path)], "memory://out", progress=False)
    with pytest.raises(ValueError, match="multiple"):
        gq_pipeline.tokenize(tiny_model, [str(tmp_path)], str(tmp_path / "o"), image_size=30, progress=False)


@pytest.mark.parametrize("placement", ["driver", "actors"])
def test_a_model_failing_on_every_image_stops_the_job(ray_cluster, tmp_path, placement):
    from gq_pipeline.job import JobError

    broken = make_tiny_model()
    with torch.no_grad():
        next(broken.encoder.parameters()).fill_(float("nan"))  # every mu is NaN: the quantizer refuses
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(rgb_bytes(40, 40, seed=i))
    out = tmp_path / "out"
    with pytest.raises(JobError, match="NaN"):
        gq_pipeline.tokenize(broken, [str(src)], str(out), image_size=SIZE, progress=False, model_placement=placement)
    assert not glob.glob(str(out / ".gq" / "units" / "*.json"))  # nothing was committed as "model" errors
    assert json.load(open(out / ".gq" / "manifest.json"))["inputs"] == 0


def test_vit_tokens_are_stored_as_g_h_w(ray_cluster, tmp_path):
    import webdataset as wds

    from gq_model import GQConfig, GQModel

    vit = dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4, z_channels=16, double_z=True)
    torch.manual_seed(0)
    model = GQModel(GQConfig(arch="vit", encoder=vit, decoder=vit, codebook_size=1024, group=4)).eval()
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(rgb_bytes(40, 48, seed=i))
    with pytest.raises(ValueError, match="ViT"):
        gq_pipeline.tokenize(model, [str(src)], str(tmp_path / "o"), image_size=32, crop="none", progress=False)
    out = str(tmp_path / "out")
    s = gq_pipeline.tokenize(model, [str(src)], out, image_size=32, format="webdataset", latents=True,
                             progress=False)
    assert s["tokenized"] == 3
    tars = sorted(glob.glob(os.path.join(out, "webdataset", "*.tar")))
    for sample in wds.WebDataset(tars, shardshuffle=False).decode():
        x = preprocess_image((src / os.path.basename(sample["json"]["source"])).read_bytes(), 32)[None]
        with torch.no_grad():
            mu, logvar = model.encode_moments(x)  # [1, L, C]
            idx = model.tokenize(x)[0]  # [L, G]
        assert sample["tokens.npy"].shape == (4, 4, 4) and sample["json"]["token_shape"] == [4, 4, 4]
        assert np.array_equal(sample["tokens.npy"], idx.T.reshape(4, 4, 4).numpy())
        assert np.array_equal(sample["latent.npy"], mu[0].T.reshape(16, 4, 4).numpy().astype(np.float16))


def test_model_placement_choice():
    from gq_pipeline.placement import choose_placement as _model_placement

    assert _model_placement("auto", 0.0, 1, None, None) == "driver"  # one CPU-only node
    assert _model_placement("auto", 1.0, 1, None, None) == "actors"  # GPUs
    assert _model_placement("auto", 0.0, 3, None, None) == "actors"  # several nodes
    assert _model_placement("auto", 0.0, 1, 2, None) == "actors"     # an actor pool asked for
    assert _model_placement("auto", 0.0, 1, None, 1.0) == "actors"
    assert _model_placement("actors", 0.0, 1, None, None) == "actors"
    with pytest.raises(ValueError, match="GPU actors"):
        _model_placement("driver", 1.0, 1, None, None)
    with pytest.raises(ValueError, match="--workers 2"):
        _model_placement("driver", 0.0, 1, 2, None)
    with pytest.raises(ValueError, match="one of"):
        _model_placement("gpu", 0.0, 1, None, None)


def test_an_empty_input_is_an_error_unless_allowed(tmp_path, tiny_model):
    """An input folder without a single image is almost always a wrong path: refused, unless --allow-empty."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no inputs found.*--allow-empty"):
        gq_pipeline.tokenize(tiny_model, [str(tmp_path / "in")], str(tmp_path / "out"), image_size=SIZE,
                             progress=False)
    s = gq_pipeline.tokenize(tiny_model, [str(tmp_path / "in")], str(tmp_path / "out"), image_size=SIZE,
                             progress=False, allow_empty=True)
    assert s["inputs"] == 0 and s["ignored_files"] == 1


def test_an_output_inside_the_input_is_never_read_as_input(tmp_path, tiny_model):
    """The first run writes shards under the input folder; every rerun must still see only the images (it used to
    list gq's own shards and fail with "no image column found")."""
    src = tmp_path / "data"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(rgb_bytes(40, 40, seed=i))
    out = src / "tokens"
    for _ in range(2):
        s = gq_pipeline.tokenize(tiny_model, [str(src)], str(out), image_size=SIZE, format="both", progress=False)
        assert s["inputs"] == s["tokenized"] == 3 and s["units_failed"] == []


def test_workers_that_can_never_be_placed_stop_the_job_after_the_timeout(ray_cluster, tmp_path, tiny_model):
    """An actor asking for more CPUs than any node has waits (an autoscaler may add a node); with none arriving
    within --worker-timeout the job stops with a message saying what is missing, and nothing is committed."""
    from gq_pipeline.job import JobError

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(rgb_bytes(40, 40))
    with pytest.raises(JobError, match=r"only 0 model worker\(s\) ready, fewer than the 1"):
        gq_pipeline.tokenize(tiny_model, [str(src)], str(tmp_path / "out"), image_size=SIZE, progress=False,
                             model_placement="actors", cpus_per_worker=64, worker_timeout_s=3)
    assert not glob.glob(str(tmp_path / "out" / ".gq" / "units" / "*.json"))
