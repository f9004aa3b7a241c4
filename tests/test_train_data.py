"""Training data layer (jobs/training/data.py): sources, decoding, sharding without duplicates, exact resume
positions, and corrupt images skipped and reported. CPU only, tiny images."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.training.data import (BatchStream, ImageTransform, SampleReader, build_index, expand_paths, load_images,
                                make_loader)


def _png_bytes(seed: int, size=(24, 20), fmt="PNG") -> bytes:
    a = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def make_image_folder(root, n: int = 12, corrupt: int = 1) -> list[str]:
    """n images (png/jpg/webp, some in a subfolder) plus ``corrupt`` broken jpgs and a non-image file."""
    os.makedirs(root / "sub", exist_ok=True)
    paths = []
    for i in range(n):
        fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
        p = root / ("sub" if i % 2 else "") / f"img{i:03d}.{ext}"
        p.write_bytes(_png_bytes(i, (24 + i, 20), fmt))
        paths.append(str(p))
    for j in range(corrupt):
        (root / f"broken{j}.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage, not a jpeg")
    (root / "notes.txt").write_text("not an image")
    return paths


def _stream(index, ids=None, **kw):
    defaults = dict(batch_size=2, transform=ImageTransform(16, 20, "random", True),
                    reader=SampleReader(), seed=5)
    defaults.update(kw)
    return BatchStream(index, range(len(index)) if ids is None else ids, **defaults)


def test_folder_index_and_decode(tmp_path):
    make_image_folder(tmp_path, n=6, corrupt=1)
    index = build_index(str(tmp_path))
    assert len(index) == 7  # 6 images + the broken one (found unreadable only when read); notes.txt ignored
    assert len(build_index(str(tmp_path / "sub" / "*.jpg"))) == 1
    good = next(r for r in index.refs if "img000" in r[1])
    t = ImageTransform(16, None, "center")(SampleReader().read(good))
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32 and -1 <= t.min() and t.max() <= 1


def test_transform_resize_crop_flip():
    img = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (32, 1, 3)))  # 64x32 ramp
    t = ImageTransform(16, resize=32, crop="center")(img)  # -> 64x32 (no change), center crop 16
    assert t.shape == (3, 16, 16)
    a = ImageTransform(16, resize=32, crop="random", flip=True)
    r1 = a(img, np.random.default_rng([1, 2, 3]))
    assert torch.equal(r1, a(img, np.random.default_rng([1, 2, 3])))  # determined by the RNG seed
    small = ImageTransform(16, resize=8)(Image.new("RGB", (10, 12)))  # never below the crop size
    assert small.shape == (3, 16, 16)


def test_training_preprocessing_equals_the_tokenizers(tmp_path):
    """Train on exactly the pixels ``gq tokenize`` feeds the model: every awkward image of the pipeline tests
    (CMYK, RGBA on white, palette with transparency, 16-bit, EXIF rotation, GIF, ...) decodes and, with a centre
    crop and no extra resize, transforms to ``preprocess_image``'s tensor bit for bit; bad ones fail to read."""
    from gq_pipeline import preprocess_image
    from tests.helpers import messy_images

    images = messy_images()
    for name, (data, error) in images.items():
        (tmp_path / name).write_bytes(data)
    index = build_index(str(tmp_path))
    reader = SampleReader()
    checked = 0
    for ref in index.refs:
        name = os.path.basename(ref[1])
        data, error = images[name]
        if error is not None:
            with pytest.raises(Exception):
                reader.read(ref)
            continue
        got = ImageTransform(32, None, "center")(reader.read(ref))
        assert torch.equal(got, preprocess_image(data, 32)), name
        checked += 1
    assert checked == sum(e is None for _, e in images.values())
    # a very elongated image takes the tokenizer's crop-box resize path: still identical
    from PIL import Image as PILImage

    from tests.helpers import encode_image

    wide = encode_image(PILImage.fromarray(np.random.default_rng(5).integers(0, 255, (20, 700, 3), np.uint8)), "PNG")
    assert torch.equal(ImageTransform(32, None, "center")(PILImage.open(io.BytesIO(wide))),
                       preprocess_image(wide, 32))
    # the resize step too: resize the shorter side to 48 then centre-crop 32 == tokenizer at 48, centre 32 crop
    data = images["ok_02.jpg"][0]
    big = preprocess_image(data, 48)
    got = ImageTransform(32, 48, "center")(reader.read(next(r for r in index.refs if r[1].endswith("ok_02.jpg"))))
    assert torch.equal(got, big[:, 8:40, 8:40])


def test_corrupt_images_are_skipped_and_reported(tmp_path):
    make_image_folder(tmp_path, n=5, corrupt=1)
    index = build_index(str(tmp_path))
    stream = _stream(index, batch_size=6, shuffle=False)
    batch = stream.make_batch(0)
    assert batch["image"].shape[0] == 5
    assert len(batch["corrupt"]) == 1 and "broken0.jpg" in batch["corrupt"][0]


def test_all_corrupt_batch_takes_next_readable(tmp_path):
    make_image_folder(tmp_path, n=1, corrupt=3)
    index = build_index(str(tmp_path))  # broken0..2 sort before img000
    stream = _stream(index, batch_size=2, shuffle=False)
    batch = stream.make_batch(0)
    assert batch["image"].shape[0] == 1 and len(batch["corrupt"]) >= 2


def test_sharding_has_no_duplicates_across_ranks_and_workers(tmp_path):
    make_image_folder(tmp_path, n=17, corrupt=0)
    index = build_index(str(tmp_path))
    seen = []
    for rank in range(2):
        stream = _stream(index, batch_size=2, rank=rank, world_size=2)
        assert stream.batches_per_epoch == 4  # 17 // 2 ranks = 8 per rank, 4 batches of 2
        loader = make_loader(stream, num_workers=2, seed=0)
        it = iter(loader)
        for _ in range(stream.batches_per_epoch):  # one epoch
            b = next(it)
            assert b["epoch"] == 0
            seen.extend(b["ids"])
        del it
    assert len(seen) == 16 and len(set(seen)) == 16  # disjoint across ranks and workers


def test_epoch_order_is_shuffled_per_epoch_and_reproducible(tmp_path):
    make_image_folder(tmp_path, n=12, corrupt=0)
    index = build_index(str(tmp_path))
    s = _stream(index)
    e0, e1 = s.epoch_order(0), s.epoch_order(1)
    assert sorted(e0) == list(range(12)) and not np.array_equal(e0, e1)
    assert not np.array_equal(e0, np.arange(12))  # explicitly shuffled (the reference was class-sorted)
    assert np.array_equal(e0, _stream(index).epoch_order(0))
    assert np.array_equal(_stream(index, shuffle=False).epoch_order(0), np.arange(12))


def test_resume_position_reproduces_the_stream_with_workers(tmp_path):
    make_image_folder(tmp_path, n=10, corrupt=0)
    index = build_index(str(tmp_path))
    full = iter(make_loader(_stream(index, batch_size=2, repeat=2), num_workers=2, seed=1))
    ref = [next(full) for _ in range(12)]  # 10 x repeat 2 / batch 2 = 10 batches per epoch: crosses into epoch 1
    del full
    resumed = iter(make_loader(_stream(index, batch_size=2, repeat=2, start_batch=4), num_workers=2, seed=1))
    assert ref[-1]["epoch"] == 1
    for want in ref[4:]:
        got = next(resumed)
        assert got["batch"] == want["batch"] and got["ids"] == want["ids"]
        assert torch.equal(got["image"], want["image"])  # random crops/flips too
    del resumed


def test_repeat_spreads_copies_of_an_image(tmp_path):
    make_image_folder(tmp_path, n=3, corrupt=0)
    index = build_index(str(tmp_path))
    s = _stream(index, batch_size=3, repeat=4)
    assert s.batches_per_epoch == 4
    order = s.epoch_order(0)
    assert sorted(order.tolist()) == sorted([0, 1, 2] * 4)


def test_too_small_dataset_explains(tmp_path):
    make_image_folder(tmp_path, n=3, corrupt=0)
    with pytest.raises(ValueError, match="data.repeat"):
        _stream(build_index(str(tmp_path)), batch_size=4)


def test_webdataset_tar_shards(tmp_path):
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:06d}.tar", "w") as tf:
            for i in range(3):
                key = f"s{s}/{i:04d}"
                for name, data in ((f"{key}.jpg", _png_bytes(10 * s + i, fmt="JPEG")),
                                   (f"{key}.seg.png", _png_bytes(99)), (f"{key}.json", b"{}")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    index = build_index(str(tmp_path / "shard-{000000..000001}.tar"))
    assert len(index) == 6 and all(r[0] == "tar" and r[4].endswith(".jpg") for r in index.refs)
    assert index.blocks == [0, 0, 0, 1, 1, 1]
    reader = SampleReader()
    img = reader.read(index.refs[4])
    want = Image.open(io.BytesIO(_png_bytes(11, fmt="JPEG")))
    assert np.array_equal(np.asarray(img), np.asarray(want))
    # block shuffle keeps a shard's samples together within an epoch
    order = _stream(index, batch_size=1).epoch_order(3)
    assert sorted(order[:3].tolist()) in ([0, 1, 2], [3, 4, 5])


def test_parquet_image_bytes_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs = [_png_bytes(i) for i in range(5)] + [b"corrupt"]
    pq.write_table(pa.table({"jpg": pa.array(blobs, pa.binary()), "id": list(range(6))}), tmp_path / "a.parquet",
                   row_group_size=4)
    hf = pa.array([{"bytes": _png_bytes(7), "path": None}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"jpg": hf}), tmp_path / "b.parquet")
    index = build_index(str(tmp_path / "*.parquet"), image_column="jpg")
    assert len(index) == 7 and index.blocks == [0, 0, 0, 0, 1, 1, 2]
    imgs, bad = load_images(index, range(7), ImageTransform(16), SampleReader("jpg"))
    assert imgs.shape == (6, 3, 16, 16) and len(bad) == 1 and "rg1/row1" in bad[0]
    with pytest.raises(ValueError, match="image_column"):
        build_index(str(tmp_path / "a.parquet"), image_column="image")


def test_in_memory_and_skimage_sources():
    mem = [Image.new("RGB", (20, 20), (255, 0, 0)), np.zeros((18, 22, 3), np.uint8), np.zeros((20, 20), np.uint8),
           torch.ones(3, 16, 16), _png_bytes(3)]
    index = build_index(None, memory=mem)
    imgs, bad = load_images(index, range(len(mem)), ImageTransform(16), SampleReader(memory=mem))
    assert imgs.shape == (5, 3, 16, 16) and not bad
    assert torch.allclose(imgs[0, 0], torch.ones(16, 16)) and torch.allclose(imgs[3], torch.ones(3, 16, 16))
    sk = build_index("skimage:astronaut,camera")
    imgs, bad = load_images(sk, range(2), ImageTransform(16, 32), SampleReader())
    assert imgs.shape == (2, 3, 16, 16) and not bad


def test_s3_folder_via_fsspec(tmp_path, monkeypatch):
    moto = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    from jobs.training.engines import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        so = {"endpoint_url": f"http://127.0.0.1:{port}"}
        fs = s3fs.S3FileSystem(**so)
        fs.mkdir("gq-train")
        for i in range(3):
            fs.pipe(f"gq-train/imgs/{i}.png", _png_bytes(i))
        fs.pipe("gq-train/imgs/bad.jpg", b"nope")
        assert expand_paths("s3://gq-train/imgs", so)[0].startswith("s3://")
        index = build_index("s3://gq-train/imgs/", storage_options=so)
        assert len(index) == 4
        imgs, bad = load_images(index, range(4), ImageTransform(16), SampleReader(storage_options=so))
        assert imgs.shape == (3, 3, 16, 16) and len(bad) == 1 and "bad.jpg" in bad[0]
    finally:
        server.stop()


def test_training_reads_a_tar_as_the_tokenizer_does(tmp_path):
    """One reading of a tar (gq_pipeline.sources.group_tar_members): training indexes exactly the samples with an
    image that ``gq tokenize`` tokenizes, the same image member each, and none of those it records as errors."""
    from gq_pipeline.planning import plan_units
    from gq_pipeline.sources import UnitInfo, iter_samples

    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w") as tf:
        def add(name, data=b"", link=None):
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
            else:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if link is None else None)

        add("a/0001.jpg", _png_bytes(1, fmt="JPEG")); add("a/0001.seg.png", _png_bytes(2)); add("a/0001.txt", b"x")
        add("a/0002.png", _png_bytes(3)); add("a/0002.png", _png_bytes(4))  # the same key twice: two samples
        add("a/0003.txt", b"caption only")  # no image: an error record, nothing to train on
        add("a/0004.jpg", _png_bytes(5, fmt="JPEG")); add("a/0004.json", link="../elsewhere.json")  # a link
        add("a/.hidden.jpg", _png_bytes(6)); add("a/noext", b"?")  # skipped by both
        add("b/0005.webp", _png_bytes(7, fmt="WEBP"))

    refs = build_index(str(path)).refs
    tokenized = [s for s in iter_samples(plan_units([str(path)]).units[0], UnitInfo()) if s.error is None]
    assert len(refs) == len(tokenized) == 4
    reader = SampleReader()
    for ref, sample in zip(refs, tokenized):
        assert reader.read_bytes(ref) == sample.data
    assert [r[4] for r in refs] == ["a/0001.jpg", "a/0002.png", "a/0002.png", "b/0005.webp"]
