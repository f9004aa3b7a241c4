"""gs:// end to end against fake-gcs-server on 127.0.0.1: a folder and a tar in, shards out, resume, read back; and a
run that mixes stores (model and images on S3, shards on GCS) with per-protocol storage options."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

import gq_pipeline
from gq_pipeline import preprocess_image
from gq_pipeline.dataset import TokenDataset, TokenLoader
from tests.helpers import make_wds_tar, rgb_bytes

SIZE = 32


def _direct_tokens(model, data: bytes) -> list[int]:
    return model.tokenize(preprocess_image(data, SIZE)[None])[0].reshape(-1).tolist()


def _outputs(fs, root: str) -> dict[str, bytes]:
    return {f: fs.cat(f) for f in sorted(fs.find(root))}


def test_gcs_folder_and_tar_in_gcs_out_resume_and_read_back(ray_cluster, fake_gcs, gcs, tiny_model, tiny_model_dir,
                                                            tmp_path):
    from gq_model.cli import main

    gcs.mkdir("gq-gcs-in")
    gcs.mkdir("gq-gcs-out")
    images = {f"imgs/{i:02d}.jpg": rgb_bytes(36 + 4 * i, 40, seed=i) for i in range(5)}
    images["imgs/sub/deep.png"] = rgb_bytes(40, 48, seed=9, fmt="PNG")
    images["imgs/broken.jpg"] = b"\xff\xd8\xff not a jpeg"
    gcs.pipe({f"gq-gcs-in/{k}": v for k, v in images.items()})
    samples = [{"__key__": f"s{i}", "jpg": rgb_bytes(44, 40, seed=20 + i), "txt": f"caption {i}"} for i in range(3)]
    gcs.pipe("gq-gcs-in/shards/shard-000.tar", make_wds_tar(samples))
    argv = ["tokenize", "--model", tiny_model_dir, "--input", "gs://gq-gcs-in/imgs",
            "gs://gq-gcs-in/shards/shard-000.tar", "--output", "gs://gq-gcs-out/run", "--format", "both",
            "--image-size", str(SIZE), "--unit-size", "3", "--batch-size", "4",
            "--storage-options", json.dumps({"gs": fake_gcs}), "--quiet", "--summary-json"]
    assert main(argv + [str(tmp_path / "first.json")]) == 0
    s = json.load(open(tmp_path / "first.json"))
    assert (s["inputs"], s["tokenized"], s["errors"]) == (10, 9, 1) and s["errors_by_kind"] == {"decode": 1}
    assert s["units_failed"] == []
    first = _outputs(gcs, "gq-gcs-out/run")
    assert not [f for f in first if ".tmp" in f]
    assert any("/webdataset/" in f and f.endswith(".tar") for f in first)

    # Read back with plain pyarrow over gcsfs: every good image once, tokens as the model gives them.
    rows = [r for f in first if "/parquet/" in f for r in pq.read_table(f, filesystem=gcs).to_pylist()]
    by_source = {(r["source"].split("gq-gcs-in/", 1)[1], r["member"]): r for r in rows}
    expected = {(k, None): v for k, v in images.items() if "broken" not in k}
    expected.update({("shards/shard-000.tar", smp["__key__"]): smp["jpg"] for smp in samples})
    assert set(by_source) == set(expected)
    for k, data in expected.items():
        assert by_source[k]["tokens"] == _direct_tokens(tiny_model, data), k
    assert by_source[("shards/shard-000.tar", "s1")]["txt"] == "caption 1"
    errors = [r for f in first if "/.gq/errors/" in f for r in pq.read_table(f, filesystem=gcs).to_pylist()]
    assert [(e["source"].rsplit("/", 1)[1], e["error"]) for e in errors] == [("broken.jpg", "decode")]

    # The rerun finds every unit committed and leaves every shard as it was (the manifest records the new run).
    assert main(argv + [str(tmp_path / "second.json")]) == 0
    s2 = json.load(open(tmp_path / "second.json"))
    assert s2["this_run"]["inputs"] == 0 and s2["units_skipped"] == s["units_planned"]
    again = _outputs(gcs, "gq-gcs-out/run")
    assert {f: b for f, b in again.items() if not f.endswith("manifest.json")} == \
        {f: b for f, b in first.items() if not f.endswith("manifest.json")}

    # Downstream readers: both formats, two forked loader workers, each sample once.
    for fmt in ("parquet", "webdataset"):
        ds = TokenDataset("gs://gq-gcs-out/run", format=fmt, storage_options={"gs": fake_gcs}, batch_size=2,
                          seed=3)
        keys = [k for batch in TokenLoader(ds, num_workers=2) for k in batch["key"]]
        assert sorted(keys) == sorted(r["key"] for r in rows), fmt


def test_mixed_stores_s3_model_and_images_gcs_shards(ray_cluster, moto_s3, s3, fake_gcs, gcs, tiny_model):
    """One run, two stores: a flat options dict could not serve both (s3fs's ``key`` is an error to gcsfs)."""
    options = {"s3": moto_s3, "gs": fake_gcs}
    s3.mkdir("gq-mixed")
    gcs.mkdir("gq-mixed-out")
    tiny_model.save_pretrained("s3://gq-mixed/model", storage_options=options)
    samples = [{"__key__": f"m{i}", "jpg": rgb_bytes(40, 40, seed=40 + i)} for i in range(4)]
    s3.pipe("gq-mixed/in/shard.tar", make_wds_tar(samples))
    s = gq_pipeline.tokenize("s3://gq-mixed/model", ["s3://gq-mixed/in/shard.tar"], "gs://gq-mixed-out/run",
                             format="webdataset", image_size=SIZE, storage_options=options, progress=False)
    assert (s["inputs"], s["tokenized"], s["errors"]) == (4, 4, 0)
    tar_path = next(f for f in gcs.find("gq-mixed-out/run") if f.endswith(".tar") and "/webdataset/" in f)
    with tarfile.open(fileobj=io.BytesIO(gcs.cat(tar_path))) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    tokens_by_member = {json.loads(members[name[:-len(".tokens.npy")] + ".json"])["member"]:
                        np.load(io.BytesIO(data)).reshape(-1).tolist()
                        for name, data in members.items() if name.endswith(".tokens.npy")}
    assert tokens_by_member == {smp["__key__"]: _direct_tokens(tiny_model, smp["jpg"]) for smp in samples}
    manifest = json.loads(gcs.cat("gq-mixed-out/run/.gq/manifest.json"))
    assert manifest["tokenized"] == 4


def test_a_missing_bucket_is_a_clear_error_and_nothing_is_created(fake_gcs, gcs, moto_s3, s3, tiny_model, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(rgb_bytes(40, 40))
    options = {"s3": moto_s3, "gs": fake_gcs}
    for url in ("gs://gq-no-such-bucket/run", "s3://gq-no-such-bucket/run"):
        with pytest.raises(FileNotFoundError, match="bucket 'gq-no-such-bucket' does not exist"):
            gq_pipeline.tokenize(tiny_model, [str(tmp_path / "in")], url, image_size=SIZE, storage_options=options,
                                 progress=False)
    assert "gq-no-such-bucket" not in {b.rstrip("/") for b in gcs.ls("")}
    assert "gq-no-such-bucket" not in {b.rstrip("/") for b in s3.ls("")}
