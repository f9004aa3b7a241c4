"""GQModel, bundles and the official-checkpoint loader, with real files (local, memory://, s3:// via moto)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gq_model import GQConfig, GQModel
from gq_model.bundle import CONFIG_NAME, WEIGHTS_NAME
from gq_model.reference_config import preset_config
from tests.helpers import TINY_ATTN_ENCODER, make_tiny_attn_model
from tests.model_helpers import SMALL_REFERENCE_YAML, write_lightning_checkpoint

REPO = Path(__file__).resolve().parents[1]


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_tokenize_detokenize_shapes_and_consistency():
    model = make_tiny_attn_model()
    x = images()
    idx = model.tokenize(x)
    assert idx.shape == (2, 1, 4, 4) and idx.dtype == torch.int64
    assert model.token_shape(32) == (1, 4, 4)
    x_hat = model.detokenize(idx)
    assert x_hat.shape == x.shape
    # detokenize(tokenize(x)) is the decoder applied to the quantized latent
    _, zhat = model.quantize(x)
    assert torch.allclose(x_hat, model.decode_latent(zhat))
    assert torch.allclose(model.reconstruct(x), x_hat)
    # the Gaussian-VAE view: mu is deterministic, samples are not
    assert torch.equal(model.encode_latent(x), model.encode_moments(x)[0])
    g = torch.Generator().manual_seed(1)
    assert not torch.equal(model.encode_latent(x, sample=True, generator=g), model.encode_latent(x))
    # tokenize never mutates the model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert torch.equal(model.tokenize(x), idx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad,err", [
    (torch.zeros(2, 4, 32, 32), ValueError),           # 4 channels
    (torch.zeros(3, 32, 32), ValueError),              # rank 3
    (torch.zeros(1, 3, 30, 32), ValueError),           # not a multiple of 8
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError),
    (torch.full((1, 3, 32, 32), float("nan")), ValueError),
    (torch.zeros(0, 3, 32, 32), ValueError),
    ([[0.0]], TypeError),
])
def test_bad_images_raise_clear_errors(bad, err):
    with pytest.raises(err):
        make_tiny_attn_model().tokenize(bad)


def test_detokenize_rejects_wrong_layout():
    model = make_tiny_attn_model()
    with pytest.raises(ValueError, match="groups"):
        model.detokenize(torch.zeros(1, 2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        model.detokenize(torch.zeros(1, 16, 1, dtype=torch.long))


def test_bundle_round_trip_local_and_memory(tmp_path):
    model = make_tiny_attn_model(seed=3)
    x = images(seed=4)
    for url in (str(tmp_path / "bundle"), "memory://gq-test/bundle"):
        model.save_pretrained(url)
        loaded = GQModel.from_pretrained(url)
        assert torch.equal(loaded.tokenize(x), model.tokenize(x))
        assert loaded.model_fingerprint == model.model_fingerprint
        assert loaded.fingerprint == model.fingerprint
    files = sorted(os.listdir(tmp_path / "bundle"))
    assert files == [CONFIG_NAME, WEIGHTS_NAME]  # no temporaries left, no pickle


def test_bundle_refuses_other_codebook(tmp_path):
    import json
    model = make_tiny_attn_model()
    model.save_pretrained(tmp_path / "b")
    cfg_path = tmp_path / "b" / CONFIG_NAME
    meta = json.loads(cfg_path.read_text())
    meta["config"]["seed"] = 7  # same weights, claims another codebook
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"seed=7.*fingerprint|differs from the codebook"):
        GQModel.from_pretrained(tmp_path / "b")


def test_bundle_missing_and_truncated_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        GQModel.from_pretrained(tmp_path / "nowhere")
    make_tiny_attn_model().save_pretrained(tmp_path / "b")
    weights = tmp_path / "b" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        GQModel.from_pretrained(tmp_path / "b")
    (tmp_path / "b" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GQModel.from_pretrained(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="built-in"):
        GQModel.from_pretrained("no-such-builtin-model")


def test_bundle_round_trip_s3(moto_s3, s3):
    """A bundle on S3 (moto on 127.0.0.1) with explicit fsspec storage options, also through the pipeline's loader."""
    from gq_pipeline.job import load_model

    s3.mkdir("gq-models")
    model = make_tiny_attn_model(seed=5)
    model.save_pretrained("s3://gq-models/tiny", storage_options=moto_s3, note="s3 test")
    assert "model.safetensors" in [p.rsplit("/", 1)[-1] for p in s3.ls("gq-models/tiny")]
    loaded = GQModel.from_pretrained("s3://gq-models/tiny", storage_options=moto_s3)
    x = images(seed=6)
    assert torch.equal(loaded.tokenize(x), model.tokenize(x))
    via_loader = load_model("s3://gq-models/tiny", storage_options=moto_s3)
    assert torch.equal(via_loader.tokenize(x), model.tokenize(x))


def test_reference_checkpoint_with_its_yaml(tmp_path):
    yaml_path = tmp_path / "small_gq.yaml"
    yaml_path.write_text(SMALL_REFERENCE_YAML)
    source = make_tiny_attn_model(seed=9, codebook_size=1024, group=8)
    write_lightning_checkpoint(source, tmp_path / "small.ckpt", {"some.unknown.weight": torch.zeros(2)})
    model = GQModel.from_reference_checkpoint(str(tmp_path / "small.ckpt"), str(yaml_path))
    assert model.config.group == 8 and model.config.codebook_size == 1024
    assert model.load_report.loaded == len(source.state_dict())
    assert len(model.load_report.ignored) == 3 and model.load_report.unexpected == ["some.unknown.weight"]
    x = images(seed=2)
    assert model.tokenize(x).shape == (2, 2, 4, 4)
    assert torch.equal(model.tokenize(x), source.tokenize(x))
    # gq convert writes a bundle that tokenizes identically
    out = tmp_path / "converted"
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "convert", str(tmp_path / "small.ckpt"), str(out),
                        "--config", str(yaml_path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert torch.equal(GQModel.from_pretrained(out).tokenize(x), source.tokenize(x))


def test_reference_checkpoint_errors(tmp_path):
    yaml_path = tmp_path / "small_gq.yaml"
    yaml_path.write_text(SMALL_REFERENCE_YAML)
    # a checkpoint of another architecture / width
    wider = dict(TINY_ATTN_ENCODER, ch=64)
    other = GQModel(GQConfig(arch="unet", encoder=wider, decoder=wider, codebook_size=1024, group=8))
    write_lightning_checkpoint(other, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="another architecture"):
        GQModel.from_reference_checkpoint(str(tmp_path / "other.ckpt"), str(yaml_path))
    # truncated file
    write_lightning_checkpoint(make_tiny_attn_model(codebook_size=1024, group=8), tmp_path / "ok.ckpt")
    data = (tmp_path / "ok.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt|not a readable"):
        GQModel.from_reference_checkpoint(str(tmp_path / "cut.ckpt"), str(yaml_path))
    with pytest.raises(FileNotFoundError):
        GQModel.from_reference_checkpoint(str(tmp_path / "missing.ckpt"), str(yaml_path))
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        GQModel.from_reference_checkpoint(str(tmp_path / "empty.ckpt"), str(yaml_path))
    # pickled non-tensor objects are refused unless trusted
    torch.save({"state_dict": dict(make_tiny_attn_model(codebook_size=1024, group=8).state_dict()),
                "hyper_parameters": Path("x")}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="trust_checkpoint"):
        GQModel.from_reference_checkpoint(str(tmp_path / "pickled.ckpt"), str(yaml_path))
    assert GQModel.from_reference_checkpoint(str(tmp_path / "pickled.ckpt"), str(yaml_path),
                                             trust_checkpoint=True).config.group == 8
    with pytest.raises(ValueError, match="exactly one"):
        GQModel.from_reference_checkpoint(str(tmp_path / "ok.ckpt"))


def test_official_sized_checkpoint_via_preset(tmp_path):
    """The full sd3unet_gq_0.25 architecture (86,974,627 params) round-trips through a Lightning-style .ckpt."""
    torch.manual_seed(0)
    source = GQModel(GQConfig.from_reference(preset_config("sd3unet_gq_0.25"))).eval()
    assert sum(p.numel() for p in source.parameters()) == 86_974_627
    assert source.fingerprint == "effbb50723ff7d93"
    write_lightning_checkpoint(source, tmp_path / "sd3unet_gq_0.25.ckpt")
    model = GQModel.from_reference_checkpoint(str(tmp_path / "sd3unet_gq_0.25.ckpt"), preset="sd3unet_gq_0.25")
    x = images(n=1, size=64, seed=1)
    idx = model.tokenize(x)
    assert idx.shape == (1, 1, 8, 8)
    assert torch.equal(idx, source.tokenize(x))


def test_convert_help():
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "convert", "--help"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0 and "--preset" in r.stdout


def test_vit_model_tokens_and_clamp():
    vit = dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4, z_channels=16, double_z=True)
    torch.manual_seed(0)
    model = GQModel(GQConfig(arch="vit", encoder=vit, decoder=vit, codebook_size=1024, group=4,
                             clamp_range=(-1.0, 1.0))).eval()
    x = images(n=2, size=32)
    idx = model.tokenize(x)
    assert idx.shape == (2, 16, 4)  # [B, L, G]
    out = model.detokenize(idx)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match="32x32"):
        model.tokenize(images(n=1, size=64))


def test_tokenize_warns_on_zero_one_images_and_refuses_pixel_values():
    """[0, 1] images (ToTensor() without * 2 - 1) and 0..255 pixels used to be tokenized without a word."""
    import warnings

    model = make_tiny_attn_model()
    x = images()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a proper [-1, 1] batch warns nothing
        model.tokenize(x)
        model.tokenize(x.clamp(-1.05, 1.05) * 1.05)  # resampling overshoot is tolerated
    with pytest.warns(UserWarning, match=r"\[0, 1\].*x \* 2 - 1") as rec:
        model.tokenize((x + 1) / 2)
    assert rec[0].filename == __file__  # points at the caller's line, not at torch's no_grad wrapper
    with pytest.raises(ValueError, match=r"\[-1, 1\].*x / 127.5 - 1"):
        model.tokenize((x + 1) * 127.5)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.tokenize(x * 1.5)
