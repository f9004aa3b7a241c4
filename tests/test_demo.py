"""The built-in ``demo`` model and ``gq demo`` (issue 7)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

BUILTIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gq_model", "builtin", "demo")


@pytest.fixture(scope="module")
def demo_model():
    from gq_model import GQModel

    return GQModel.from_pretrained("demo")


def test_builtin_bundle_loads_by_name_with_the_official_layout(demo_model):
    from gq_model.bundle import resolve_model_url

    assert os.path.samefile(resolve_model_url("demo"), BUILTIN)
    c = demo_model.config
    assert c.arch == "unet"
    assert c.encoder["z_channels"] == 16
    assert c.group == 16
    assert c.codebook_size == 65536
    assert demo_model.downsample_factor == 8
    assert demo_model.fingerprint == "effbb50723ff7d93"
    size = sum(os.path.getsize(os.path.join(BUILTIN, n)) for n in ("config.json", "model.safetensors"))
    assert size <= 15 * 1024 * 1024
    card = open(os.path.join(BUILTIN, "MODEL_CARD.md"), encoding="utf-8").read()
    assert "effbb50723ff7d93" in card and "jobs/demo_model.yaml" in card


def test_builtin_model_reconstructs_a_held_out_image(demo_model):
    """chelsea is never trained on; the demo model must still give a recognizable reconstruction."""
    import skimage.data
    import torch
    from PIL import Image

    im = Image.fromarray(skimage.data.chelsea()).resize((192, 128), Image.BICUBIC)
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        tokens = demo_model.tokenize(x)
        assert tokens.shape == (1, 1, 16, 24) and tokens.dtype == torch.int64
        y = demo_model.detokenize(tokens).clamp(-1, 1)
    mse = float(((x - y) * 127.5).pow(2).mean())
    assert 10 * np.log10(255.0 ** 2 / mse) > 19.0  # 22.3 dB for the shipped model


def test_gq_demo_end_to_end(ray_cluster, tmp_path):
    from jobs.cli import main

    out = tmp_path / "demo-out"
    assert main(["demo", "--out", str(out), "--num-images", "4", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == 5  # 4 images + the corrupt file
    assert summary["tokenized"] == 4 and summary["errors"] == 1
    assert summary["tokens"] == 4 * 1024  # 256 px / f=8 -> 32x32 tokens per image
    assert summary["codebook_fingerprint"] == "effbb50723ff7d93"
    assert len(summary["psnr_db"]) == 4 and summary["mean_psnr_db"] > 15  # the shipped model reconstructs
    usage = summary["codebook_usage"]
    assert 0 < usage["used"] <= summary["tokens"] and usage["codebook_size"] == 65536
    from PIL import Image

    for name in ("demo-grid.png", "demo-grid-small.png", "codebook-usage.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    with Image.open(out / "demo-grid.png") as im:  # originals above reconstructions, 256 px each
        assert im.size[0] >= 4 * 256 and im.size[1] >= 2 * 256
    assert list((out / "tokens" / "parquet").glob("*.parquet"))
    assert list((out / "tokens" / "webdataset").glob("*.tar"))
    manifest = json.loads((out / "tokens" / ".gq" / "manifest.json").read_text())
    assert manifest["tokenized"] + manifest["errors"] == manifest["inputs"] == 5
    assert manifest["errors_by_kind"] == {"decode": 1}
    # the Parquet and WebDataset shards hold the same tokens
    from gq_pipeline.dataset import TokenDataset

    by_fmt = {}
    for fmt in ("parquet", "webdataset"):
        ds = TokenDataset(str(out / "tokens" / fmt), format=fmt, shuffle=False, batch_size=8)
        by_fmt[fmt] = {k: t.numpy() for b in ds for k, t in zip(b["key"], b["tokens"])}
    assert by_fmt["parquet"].keys() == by_fmt["webdataset"].keys() and len(by_fmt["parquet"]) == 4
    for k, v in by_fmt["parquet"].items():
        assert np.array_equal(v, by_fmt["webdataset"][k])


def test_demo_rejects_bad_image_count(tmp_path):
    from jobs.demo import write_inputs

    with pytest.raises(ValueError, match="num-images"):
        write_inputs(str(tmp_path), 0)
