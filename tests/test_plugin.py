"""gq as a plugin: ``GQTokenizer`` inside real Ray Data, HF ``datasets`` and WebDataset pipelines, and ``GQShardSink``
output read back by gq's own readers (docs/plugin.md).

Reference tokens are always ``GQModel.tokenize`` on gq's preprocessing of the same input, compared bit for bit:
both sides run the same float32 CPU computation in the same process or a worker of the same build.
"""
from __future__ import annotations

import glob
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from gq_pipeline import GQShardSink, GQTokenizer, preprocess_array, preprocess_image, preprocess_pil
from gq_pipeline.preprocess import preprocess_array_uint8, preprocess_pil_uint8, preprocess_uint8
from tests.helpers import encode_image, make_tiny_model, make_wds_tar, messy_images, rgb_bytes, smooth_rgb

SIZE = 32
SHAPES = [(40, 48), (48, 40), (36, 36), (44, 60), (40, 40)]
CORRUPT = b"\xff\xd8\xff\xe0 this is not a jpeg"


def ref_tokens(model, x: torch.Tensor) -> np.ndarray:
    """The reference: ``GQModel.tokenize`` of one preprocessed image, flat, as the token dtype."""
    return model.tokenize(x[None])[0].numpy().reshape(-1).astype(np.uint16)


@pytest.fixture(scope="module")
def jpegs():
    return {f"img{i}.jpg": rgb_bytes(h, w, seed=i) for i, (h, w) in enumerate(SHAPES)}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, jpegs):
    root = tmp_path_factory.mktemp("plugin_images")
    for name, data in jpegs.items():
        (root / name).write_bytes(data)
    (root / "notes.txt").write_text("not an image")
    return str(root)


@pytest.fixture(scope="module")
def tok(tiny_model):
    return GQTokenizer(tiny_model, image_size=SIZE, batch_size=2)


def _expected(model, jpegs):
    return {name: ref_tokens(model, preprocess_image(data, SIZE)) for name, data in jpegs.items()}


# ---------------------------------------------------------------------------------------------- preprocessing
def test_preprocess_pil_equals_bytes_path_on_every_awkward_image():
    """``Image.open(bytes)`` through preprocess_pil gives exactly the bytes path's pixels (EXIF, palette, alpha,
    16-bit, CMYK, animated)."""
    for name, (data, err) in messy_images().items():
        if err is not None:
            continue
        want, size = preprocess_uint8(data, SIZE)
        got, got_size = preprocess_pil_uint8(Image.open(io.BytesIO(data)), SIZE)
        assert np.array_equal(got, want) and got_size == size, name
        assert torch.equal(preprocess_pil(Image.open(io.BytesIO(data)), SIZE), preprocess_image(data, SIZE)), name


def test_preprocess_array_equals_bytes_path_for_plain_pixels():
    rgb = smooth_rgb(40, 52, 3)
    png = encode_image(Image.fromarray(rgb), "PNG")
    assert torch.equal(preprocess_array(rgb, SIZE), preprocess_image(png, SIZE))
    rgba = np.dstack([rgb, np.where(np.arange(52) < 20, 0, 255).astype(np.uint8)[None].repeat(40, 0)])
    png = encode_image(Image.fromarray(rgba, "RGBA"), "PNG")
    assert np.array_equal(preprocess_array_uint8(rgba, SIZE)[0], preprocess_uint8(png, SIZE)[0])  # on white
    gray = rgb[:, :, 0]
    png = encode_image(Image.fromarray(gray), "PNG")
    assert np.array_equal(preprocess_array_uint8(gray, SIZE)[0], preprocess_uint8(png, SIZE)[0])
    assert preprocess_array_uint8(gray, SIZE, crop="none")[0].shape == (3, 32, 40)


# ---------------------------------------------------------------------------------------------- direct calls
def test_every_batch_type_and_value_type_bit_identical(tiny_model, tok, jpegs):
    """dict of lists / numpy, pyarrow, pandas; bytes, HF structs, PIL, HWC arrays; a corrupt and a wrong-dtype
    cell get error values and their neighbours are tokenized."""
    import pandas as pd

    names = list(jpegs)
    data = [jpegs[n] for n in names]
    want = _expected(tiny_model, jpegs)
    cells = [data[0], CORRUPT, {"bytes": data[1], "path": "x.jpg"}, Image.open(io.BytesIO(data[2])),
             np.asarray(Image.open(io.BytesIO(data[3]))), np.zeros((8, 8, 3), np.float32), data[4]]
    expect = [want[names[0]], None, want[names[1]], want[names[2]], want[names[3]], None, want[names[4]]]

    def check(tokens, errors):
        for i, w in enumerate(expect):
            if w is None:
                assert errors[i] is not None and (tokens[i] is None or len(tokens[i]) == 0)
            else:
                assert errors[i] is None and np.array_equal(np.asarray(tokens[i], np.uint16), w), i
        assert errors[1].startswith("decode: ") and errors[5].startswith("unsupported: ")

    out = tok({"image": cells, "id": list(range(7))})
    check(out["tokens"], out["gq_error"])
    assert out["id"] == list(range(7)) and out["gq_model"][0] == tiny_model.model_fingerprint
    assert out["tokens"][0].dtype == np.uint16 and list(out["token_shape"][0]) == [1, 4, 4]
    assert out["gq_width"][0] == 48 and out["gq_height"][0] == 40
    obj = np.empty(7, object)
    obj[:] = cells
    out = tok({"image": obj})
    assert out["tokens"].dtype == object and out["token_shape"].shape == (7, 3)
    check(out["tokens"], list(out["gq_error"]))
    table = tok(pa.table({"image": pa.array(data[:1] + [CORRUPT], pa.binary())}))
    assert table.schema.field("tokens").type == pa.list_(pa.uint16())
    assert table.schema.metadata[b"gq.model_fingerprint"] == tiny_model.model_fingerprint.encode()
    assert table.schema.field("tokens").metadata[b"gq.codebook_fingerprint"] == tiny_model.fingerprint.encode()
    assert table.column("tokens").null_count == 1 and table.column("gq_error").null_count == 1
    assert np.array_equal(np.asarray(table.column("tokens")[0].as_py(), np.uint16), want[names[0]])
    df = tok(pd.DataFrame({"image": data[:1] + [CORRUPT], "caption": ["a", "b"]}))
    assert df.attrs["gq"]["gq.model_fingerprint"] == tiny_model.model_fingerprint
    assert np.array_equal(df["tokens"].iloc[0], want[names[0]]) and df["tokens"].iloc[1] is None
    assert list(df["caption"]) == ["a", "b"] and df["gq_error"].iloc[1].startswith("decode: ")
    with pytest.raises(ValueError, match="already has column"):
        tok(out)


def test_model_failing_on_one_image_marks_that_row(tiny_model, jpegs, monkeypatch):
    """A model error on one image is a ``model`` error value on that row alone; on every image it raises."""
    import gq_pipeline.worker as worker  # the plugin runs the model through the worker's ModelRunner

    t = GQTokenizer(tiny_model, image_size=SIZE, batch_size=4)
    real = worker.encode_uint8
    bad = preprocess_uint8(jpegs["img1.jpg"], SIZE)[0]

    def flaky(model, images, *a, **kw):
        if any(np.array_equal(im, bad) for im in images):
            raise RuntimeError("boom")
        return real(model, images, *a, **kw)

    monkeypatch.setattr(worker, "encode_uint8", flaky)
    out = t({"image": [jpegs["img0.jpg"], jpegs["img1.jpg"], jpegs["img2.jpg"]]})
    assert out["gq_error"][0] is None and out["gq_error"][2] is None
    assert out["gq_error"][1] == "model: RuntimeError: boom" and out["tokens"][1] is None
    with pytest.raises(RuntimeError, match="fails on every image"):
        t({"image": [jpegs["img1.jpg"]]})


def test_out_of_memory_halves_the_plugins_batch_as_gq_tokenize_does(tiny_model, jpegs, monkeypatch):
    """The plugin batches like gq tokenize's workers: a real CPU allocator failure on batches of more than two
    images halves the batch (kept for later calls) and every image still gets its tokens, equal to a plain run's."""
    import torch

    images = [jpegs[f"img{i}.jpg"] for i in range(3)] * 2
    want = GQTokenizer(tiny_model, image_size=SIZE, batch_size=8)({"image": images})["tokens"]
    t = GQTokenizer(tiny_model, image_size=SIZE, batch_size=8)
    encode = t.model.encode_moments

    def allocate_too_much_for_big_batches(x):
        if x.shape[0] > 2:
            torch.empty(1 << 50, dtype=torch.uint8)  # raises RuntimeError from torch's CPU allocator
        return encode(x)

    monkeypatch.setattr(t.model, "encode_moments", allocate_too_much_for_big_batches)  # t.model is the fixture's
    out = t({"image": images})
    assert all(e is None for e in out["gq_error"])
    assert all(np.array_equal(a, b) for a, b in zip(out["tokens"], want))
    runner = t._runner()
    assert runner.batch_size <= 2 and runner.oom_halvings >= 1


# ---------------------------------------------------------------------------------------------- Ray Data
def _data_context_snapshot():
    from ray.data import DataContext

    return {k: v for k, v in vars(DataContext.get_current()).items() if isinstance(v, (int, float, str, bool))}


def test_ray_read_binary_files_actor_pool(ray_cluster, tiny_model, tiny_model_dir, image_dir, jpegs, tmp_path):
    import ray
    from ray.data import ActorPoolStrategy

    (tmp_path / "bad.jpg").write_bytes(CORRUPT)
    for name in ("img0.jpg", "img1.jpg", "img2.jpg"):
        (tmp_path / name).write_bytes(jpegs[name])
    (tmp_path / "skip.txt").write_text("filtered out")
    before = _data_context_snapshot()
    ds = (ray.data.read_binary_files(str(tmp_path), include_paths=True)
          .filter(lambda r: r["path"].endswith(".jpg"))
          .map_batches(GQTokenizer, fn_constructor_kwargs={"model": tiny_model_dir, "image_size": SIZE,
                                                            "image_column": "bytes"},
                       compute=ActorPoolStrategy(size=1), batch_size=4, num_cpus=1))
    rows = {os.path.basename(r["path"]): r for r in ds.take_all()}
    assert _data_context_snapshot() == before
    assert sorted(rows) == ["bad.jpg", "img0.jpg", "img1.jpg", "img2.jpg"]
    want = _expected(tiny_model, {k: jpegs[k] for k in ("img0.jpg", "img1.jpg", "img2.jpg")})
    for name, w in want.items():
        assert rows[name]["gq_error"] is None and np.array_equal(rows[name]["tokens"], w)
        assert list(rows[name]["token_shape"]) == [1, 4, 4]
    assert rows["bad.jpg"]["gq_error"].startswith("decode: ") and len(rows["bad.jpg"]["tokens"]) == 0


def test_ray_read_images_arrays(ray_cluster, tiny_model, image_dir, jpegs):
    """``read_images`` pixels: tokens equal preprocess_array on the same pixels, and (plain RGB JPEGs, no EXIF)
    the bytes path's tokens."""
    import ray

    ds = ray.data.read_images(image_dir, include_paths=True).map_batches(
        GQTokenizer, fn_constructor_kwargs={"model": tiny_model, "image_size": SIZE}, batch_size=8,
        batch_format="pyarrow", concurrency=1)
    rows = ds.take_all()
    assert len(rows) == len(jpegs)
    want = _expected(tiny_model, jpegs)
    for r in rows:
        name = os.path.basename(r["path"])
        pixels = np.asarray(Image.open(os.path.join(image_dir, name)))
        assert np.array_equal(r["image"], pixels)
        assert np.array_equal(np.asarray(r["tokens"], np.uint16), ref_tokens(tiny_model, preprocess_array(pixels,
                                                                                                          SIZE)))
        assert np.array_equal(np.asarray(r["tokens"], np.uint16), want[name])


# ---------------------------------------------------------------------------------------------- GQShardSink
def _tokenized(ray, model, src_dir, batch_format="pyarrow"):
    return ray.data.read_binary_files(src_dir, include_paths=True).map_batches(
        GQTokenizer, fn_constructor_kwargs={"model": model, "image_size": SIZE, "image_column": "bytes"},
        batch_size=4, batch_format=batch_format, concurrency=1)


@pytest.fixture(scope="module")
def sink_input(tmp_path_factory, jpegs):
    root = tmp_path_factory.mktemp("sink_in")
    for name, data in jpegs.items():
        (root / name).write_bytes(data)
    (root / "broken.jpg").write_bytes(CORRUPT)
    return str(root)


@pytest.mark.parametrize("batch_format", ["pyarrow", "numpy"])
def test_sink_output_read_by_gq_readers(ray_cluster, tiny_model, tiny_model_dir, jpegs, sink_input, tmp_path,
                                        capsys, batch_format):
    import ray

    from gq_model.cli import main
    from gq_pipeline import TokenDataset

    out = str(tmp_path / "tokens")
    sink = GQShardSink(out, tiny_model_dir, format="both", image_size=SIZE, rows_per_shard=3)
    _tokenized(ray, tiny_model, sink_input, batch_format).write_datasink(sink)
    assert not os.path.exists(os.path.join(out, ".gq", "tmp"))
    manifest = json.load(open(os.path.join(out, ".gq", "manifest.json")))
    assert (manifest["inputs"], manifest["tokenized"], manifest["errors"]) == (6, 5, 1)
    assert manifest["errors_by_kind"] == {"decode": 1} and manifest["model_fingerprint"] == tiny_model.model_fingerprint
    want = {os.path.join(sink_input, k): v for k, v in _expected(tiny_model, jpegs).items()}
    for fmt in ("parquet", "webdataset"):
        got = {s["source"]: s for s in TokenDataset(out, format=fmt, shuffle=False)}
        assert sorted(got) == sorted(want)
        for src, w in want.items():
            assert np.array_equal(got[src]["tokens"].numpy().reshape(-1), w)
            assert tuple(got[src]["tokens"].shape) == (1, 4, 4)
    meta = pq.read_schema(glob.glob(os.path.join(out, "parquet", "*.parquet"))[0]).metadata
    assert meta[b"gq.model_fingerprint"] == tiny_model.model_fingerprint.encode()
    errors = pq.read_table(glob.glob(os.path.join(out, ".gq", "errors", "*.parquet"))[0])
    assert errors.column("error").to_pylist() == ["decode"]
    assert errors.column("source").to_pylist() == [os.path.join(sink_input, "broken.jpg")]
    capsys.readouterr()
    assert main(["inspect", out, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 5 and report["problems"] == [] and report["errors"]["total"] == 1
    png = str(tmp_path / "png")
    assert main(["decode", "--model", tiny_model_dir, "--input", out, "--out", png]) == 0
    assert len(glob.glob(os.path.join(png, "*.png"))) == 6  # 5 samples + grid


def test_sink_refuses_rows_of_another_model(ray_cluster, tiny_model, sink_input, tmp_path):
    """Rows tokenized by a second model make the write fail; the output gets no shard and no staging leftovers."""
    import ray

    other = make_tiny_model(seed=1)
    assert other.model_fingerprint != tiny_model.model_fingerprint
    out = str(tmp_path / "tokens")
    with pytest.raises(Exception, match="refusing to mix"):
        _tokenized(ray, other, sink_input).write_datasink(GQShardSink(out, tiny_model, image_size=SIZE))
    assert glob.glob(os.path.join(out, "**", "*.parquet"), recursive=True) == []
    assert not os.path.exists(os.path.join(out, ".gq", "tmp")) and not os.path.exists(os.path.join(out, ".gq", "manifest.json"))
    # a correct write to the same output still works, and a second write is refused unless appending
    tok = GQTokenizer(tiny_model, image_size=SIZE, image_column="bytes")
    _tokenized(ray, tiny_model, sink_input).write_datasink(GQShardSink(out, tok, key_column=None))
    assert len(glob.glob(os.path.join(out, ".gq", "units", "*.json"))) >= 1
    with pytest.raises(Exception, match="already holds"):
        _tokenized(ray, tiny_model, sink_input).write_datasink(GQShardSink(out, tok))


# ---------------------------------------------------------------------------------------------- HF datasets
def test_hf_map_bytes_structs_pil(tiny_model, jpegs, tmp_path):
    import datasets

    names = list(jpegs)
    want = _expected(tiny_model, jpegs)
    tok = GQTokenizer(tiny_model, image_size=SIZE, batch_size=2)
    data = [jpegs[n] for n in names] + [CORRUPT]
    ds = datasets.Dataset.from_dict({"image": data, "name": names + ["bad"]})
    out = ds.map(tok, batched=True, batch_size=3)
    for i, n in enumerate(names):
        assert out[i]["gq_error"] is None and np.array_equal(np.asarray(out[i]["tokens"], np.uint16), want[n])
    assert out[len(names)]["gq_error"].startswith("decode: ") and out[len(names)]["tokens"] is None
    out.save_to_disk(str(tmp_path / "saved"))
    back = datasets.load_from_disk(str(tmp_path / "saved"))
    assert np.array_equal(np.asarray(back[0]["tokens"], np.uint16), want[names[0]])
    out.to_parquet(str(tmp_path / "out.parquet"))
    table = pq.read_table(str(tmp_path / "out.parquet"))
    assert table.schema.field("tokens").type.value_type == pa.uint16()
    assert np.array_equal(np.asarray(table.column("tokens")[1].as_py(), np.uint16), want[names[1]])

    structs = ds.cast_column("image", datasets.Image(decode=False))
    assert isinstance(structs[0]["image"], dict)
    good = structs.select(range(len(names)))
    out = good.map(tok, batched=True, batch_size=2)
    for i, n in enumerate(names):
        assert np.array_equal(np.asarray(out[i]["tokens"], np.uint16), want[n])
    pil = good.cast_column("image", datasets.Image())
    assert isinstance(pil[0]["image"], Image.Image)
    out = pil.map(tok, batched=True, batch_size=2)
    for i, n in enumerate(names):
        assert np.array_equal(np.asarray(out[i]["tokens"], np.uint16), want[n])


def test_hf_map_num_proc_keeps_parent_off_the_device(tiny_model, jpegs):
    import datasets

    names = list(jpegs)
    want = _expected(tiny_model, jpegs)
    tok = GQTokenizer(tiny_model, image_size=SIZE, batch_size=2)
    ds = datasets.Dataset.from_dict({"image": [jpegs[n] for n in names]})
    out = ds.map(tok, batched=True, batch_size=2, num_proc=2)
    for i, n in enumerate(names):
        assert np.array_equal(np.asarray(out[i]["tokens"], np.uint16), want[n])
    assert tok.device is None and not torch.cuda.is_initialized()


# ---------------------------------------------------------------------------------------------- WebDataset
def test_webdataset_stage_over_a_tar(tiny_model, jpegs, tmp_path):
    import webdataset as wds

    names = list(jpegs)
    want = _expected(tiny_model, jpegs)
    samples = [{"__key__": f"s{i}", "jpg": jpegs[n], "txt": n} for i, n in enumerate(names)]
    samples.insert(2, {"__key__": "broken", "jpg": CORRUPT, "txt": "broken"})
    tar = tmp_path / "shard-000000.tar"
    tar.write_bytes(make_wds_tar(samples))
    tok = GQTokenizer(tiny_model, image_size=SIZE, batch_size=4)
    got = list(wds.WebDataset(str(tar), shardshuffle=False).compose(tok.wds_stage(3)))
    assert [s["__key__"] for s in got] == [s["__key__"] for s in samples]
    for s in got:
        name = s["txt"].decode() if isinstance(s["txt"], bytes) else s["txt"]
        if name == "broken":
            assert s["gq_error"].startswith("decode: ") and s["tokens"] is None
        else:
            assert s["gq_error"] is None and np.array_equal(s["tokens"], want[name])
    # decoded samples (webdataset's own decoder would raise on the broken one, so it is left out first)
    decoded = list(wds.WebDataset(str(tar), shardshuffle=False).select(lambda s: s["__key__"] != "broken")
                   .decode("pil").map(tok.tokenize_sample))
    assert np.array_equal(decoded[0]["tokens"], want[names[0]])


def test_sink_key_column_and_pass_through(ray_cluster, tiny_model, jpegs, tmp_path):
    """``key_column`` values become the sample keys; other columns (a caption) travel into the shards."""
    import ray

    from gq_pipeline import TokenDataset

    names = list(jpegs)
    tok = GQTokenizer(tiny_model, image_size=SIZE)
    items = [{"id": f"k{i:03d}", "image": jpegs[n], "caption": f"picture {n}"} for i, n in enumerate(names)]
    ds = ray.data.from_items(items).map_batches(GQTokenizer, fn_constructor_kwargs={"model": tiny_model,
                                                                                     "image_size": SIZE},
                                                batch_format="pyarrow", concurrency=1)
    out = str(tmp_path / "keyed")
    ds.write_datasink(GQShardSink(out, tok, format="both", key_column="id"))
    want = _expected(tiny_model, jpegs)
    got = {s["key"]: s for s in TokenDataset(out, format="parquet", shuffle=False)}
    assert sorted(got) == [it["id"] for it in items]
    for it, n in zip(items, names):
        assert got[it["id"]]["caption"] == it["caption"]
        assert np.array_equal(got[it["id"]]["tokens"].numpy().reshape(-1), want[n])
    wds_keys = sorted(s["key"] for s in TokenDataset(out, format="webdataset", shuffle=False))
    assert wds_keys == [it["id"] for it in items]


def test_latents_and_crop_none(tiny_model, jpegs):
    """``latents=True`` adds μ (float16) and its shape; ``crop="none"`` gives per-image grids in one batch."""
    tok = GQTokenizer(tiny_model, image_size=SIZE, crop="none", latents=True)
    data = [jpegs["img0.jpg"], jpegs["img3.jpg"]]  # 40x48 and 44x60: different grids
    table = tok(pa.table({"image": pa.array(data, pa.binary())}))
    for i, d in enumerate(data):
        x = preprocess_image(d, SIZE, "none")
        want = ref_tokens(tiny_model, x)
        assert np.array_equal(np.asarray(table.column("tokens")[i].as_py(), np.uint16), want)
        mu, _ = tiny_model.encode_moments(x[None])
        shape = table.column("latent_shape")[i].as_py()
        assert shape == list(mu.shape[1:]) and table.column("token_shape")[i].as_py()[1:] == shape[1:]
        got = np.asarray(table.column("latent")[i].as_py(), np.float32).reshape(shape)
        np.testing.assert_allclose(got, mu[0].detach().numpy(), rtol=2e-3, atol=2e-3)  # float16 storage
    assert table.schema.field("latent").type == pa.list_(pa.float16())


def test_sink_from_read_images_numpy_batches(ray_cluster, tiny_model, image_dir, jpegs, tmp_path):
    """Ray tensor columns (read_images pixels, numpy-format tokens) in several blocks; keys from the pixels."""
    import ray

    from gq_pipeline import TokenDataset

    tok = GQTokenizer(tiny_model, image_size=SIZE)
    ds = ray.data.read_images(image_dir).map_batches(
        GQTokenizer, fn_constructor_kwargs={"model": tiny_model, "image_size": SIZE}, batch_size=2, concurrency=1)
    out = str(tmp_path / "from_pixels")
    ds.write_datasink(GQShardSink(out, tok, format="parquet", rows_per_shard=100))
    got = sorted(s["tokens"].numpy().reshape(-1).astype(np.uint16).tobytes()
                 for s in TokenDataset(out, shuffle=False))
    want = sorted(w.tobytes() for w in _expected(tiny_model, jpegs).values())
    assert got == want
    keys = [s["key"] for s in TokenDataset(out, shuffle=False)]
    assert len(set(keys)) == len(jpegs) and all(k.startswith("sample-") for k in keys)
