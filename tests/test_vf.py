"""VF alignment (the reference's `_vf` variant): the plain-torch DINOv2 and its strict local weight loading, the
positional-embedding resampling, the VF loss and its adaptive weight against hand computations, the `_vf` recipe, and
a 2-step CPU training run with a tiny DINOv2 loaded from a file. No network: every weight file is written here."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gq_model.dinov2 import DINOv2, DINOV2_SIZES, dinov2, dinov2_vitl14, resample_pos_embed
from gq_model.losses import VFAlignmentLoss, adaptive_weight

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(size=None, embed_dim=32, depth=2, num_heads=4, img_size=28)  # 2x2 stored position grid


def _random_state(seed: int = 0, **arch) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = DINOv2(**{k: v for k, v in {**TINY, **arch}.items() if k != "size"})
    return {k: torch.randn(v.shape, generator=g) * (0.3 if v.dim() > 1 else 0.1) + (1.0 if "norm" in k and
            k.endswith("weight") else 0.0) for k, v in model.state_dict().items()}


def _official_file(tmp_path, state) -> str:
    """facebookresearch layout: the same names plus mask_token, a torch pickle of tensors."""
    path = str(tmp_path / "dinov2_tiny_pretrain.pth")
    torch.save({**state, "mask_token": torch.zeros(1, state["cls_token"].shape[-1])}, path)
    return path


def _timm_file(tmp_path, state) -> str:
    path = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def _hand_forward(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int, depth: int) -> torch.Tensor:
    """DINOv2 written out from its definition, for a stored grid equal to the input grid: [B, D, h, w]."""
    w = state["patch_embed.proj.weight"]
    d, p = w.shape[0], w.shape[-1]
    b, _, hh, ww = x.shape
    gh, gw = hh // p, ww // p
    # patch k (row-major) is the dot product of its pixels with each filter, plus the bias
    patches = x.reshape(b, 3, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, 3 * p * p)
    tok = patches @ w.reshape(d, -1).t() + state["patch_embed.proj.bias"]
    t = torch.cat([state["cls_token"].expand(b, 1, d), tok], 1) + state["pos_embed"]

    def ln(v, k):
        return F.layer_norm(v, (d,), state[f"{k}.weight"], state[f"{k}.bias"], eps=1e-6)

    for i in range(depth):
        pre = f"blocks.{i}."
        h = ln(t, pre + "norm1")
        qkv = h @ state[pre + "attn.qkv.weight"].t() + state[pre + "attn.qkv.bias"]
        q, k, v = qkv.split(d, dim=-1)
        hd = d // heads
        q, k, v = (u.reshape(b, -1, heads, hd).transpose(1, 2) for u in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        att = att.transpose(1, 2).reshape(b, -1, d)
        att = att @ state[pre + "attn.proj.weight"].t() + state[pre + "attn.proj.bias"]
        t = t + state[pre + "ls1.gamma"] * att
        h = ln(t, pre + "norm2")
        m = F.gelu(h @ state[pre + "mlp.fc1.weight"].t() + state[pre + "mlp.fc1.bias"])
        m = m @ state[pre + "mlp.fc2.weight"].t() + state[pre + "mlp.fc2.bias"]
        t = t + state[pre + "ls2.gamma"] * m
    t = ln(t, "norm")
    return t[:, 1:].transpose(1, 2).reshape(b, d, gh, gw)


# --------------------------------------------------------------------------- DINOv2 network and weights


def test_vitl14_layout_and_parameter_count():
    with torch.device("meta"):
        model = DINOv2(**dict(zip(("embed_dim", "depth", "num_heads"), DINOV2_SIZES["vitl14"])))
    sd = model.state_dict()
    assert sum(v.numel() for v in sd.values()) == 304_367_616  # the reference's foundation_model.model.* count
    assert tuple(sd["pos_embed"].shape) == (1, 1370, 1024) and tuple(sd["cls_token"].shape) == (1, 1, 1024)
    assert tuple(sd["patch_embed.proj.weight"].shape) == (1024, 3, 14, 14)
    assert tuple(sd["blocks.23.attn.qkv.weight"].shape) == (3072, 1024)
    assert tuple(sd["blocks.0.ls1.gamma"].shape) == (1024,)
    assert tuple(sd["blocks.0.mlp.fc1.weight"].shape) == (4096, 1024)
    assert len(sd) == 4 + 24 * 14 + 2


@pytest.mark.parametrize("layout", ["official", "timm"])
def test_tiny_dinov2_loads_strictly_and_matches_a_hand_forward(tmp_path, layout):
    state = _random_state(0, img_size=42)  # 3x3 stored grid
    path = (_official_file if layout == "official" else _timm_file)(tmp_path, state)
    model = dinov2(**{**TINY, "img_size": 42}, weights=path).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.rand(2, 3, 42, 42) * 2 - 1
    with torch.no_grad():
        grid = model(x)
        feats = model.forward_features(x)
    assert grid.shape == (2, 32, 3, 3)
    torch.testing.assert_close(grid, _hand_forward(state, x, heads=4, depth=2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats["x_norm_patchtokens"], grid.flatten(2).transpose(1, 2))
    assert feats["x_norm_clstoken"].shape == (2, 32)


def test_missing_unexpected_and_misshapen_keys_are_refused(tmp_path):
    state = _random_state(1)
    missing = dict(state)
    del missing["blocks.1.ls2.gamma"]
    with pytest.raises(ValueError, match=r"1 missing key\(s\): blocks\.1\.ls2\.gamma"):
        dinov2(**TINY, weights=_timm_file(tmp_path, missing))
    extra = {**state, "head.weight": torch.zeros(10, 32)}
    with pytest.raises(ValueError, match=r"unexpected key\(s\): head\.weight"):
        dinov2(**TINY, weights=_official_file(tmp_path, extra))
    with pytest.raises(ValueError, match=r"shape mismatch.*pos_embed: file \(1, 5, 32\) vs model \(1, 10, 32\)"):
        dinov2(**{**TINY, "img_size": 42}, weights=_timm_file(tmp_path, state))
    with pytest.raises(ValueError, match="missing key"):  # a register-token or other variant: named, not guessed
        dinov2(**{**TINY, "depth": 3}, weights=_timm_file(tmp_path, state))
    model = dinov2(**TINY, random_init=True)
    with pytest.raises(ValueError, match="strictly only"):
        model.load_state_dict(state, strict=False)
    with pytest.raises(ValueError, match="missing key"):
        model.load_state_dict(missing)  # the plain torch API goes through the same check
    model.load_state_dict({**state, "mask_token": torch.zeros(1, 32)})


def test_no_weights_no_download(tmp_path):
    with pytest.raises(ValueError, match="local file.*nothing is downloaded"):
        dinov2_vitl14()
    with pytest.raises(FileNotFoundError, match="not found.*nothing is downloaded"):
        dinov2(**TINY, weights=str(tmp_path / "absent.safetensors"))
    with pytest.raises(ValueError, match="unknown DINOv2 size"):
        dinov2("vitg14", random_init=True)
    junk = tmp_path / "junk.pth"
    torch.save({"model": {"a": [1, 2]}}, junk)
    with pytest.raises(Exception):  # not tensors: weights_only refuses or the check names it
        dinov2(**TINY, weights=str(junk))


def test_pos_embed_resampled_for_the_224_grid():
    """The released models store a 37x37 grid (518 px); at the reference's 224 px the grid is 16x16: the patch part is
    resampled (bicubic, antialiased, timm's convention), the CLS entry kept."""
    torch.manual_seed(0)
    d = 8
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 37), torch.linspace(-1, 1, 37), indexing="ij")
    ramp = torch.stack([xx, yy] + [torch.full_like(xx, 0.5)] * (d - 2), -1).reshape(1, 37 * 37, d)
    pos = torch.cat([torch.randn(1, 1, d), ramp], 1)
    out = resample_pos_embed(pos, (16, 16))
    assert out.shape == (1, 1 + 256, d)
    assert torch.equal(out[:, 0], pos[:, 0])
    grid = out[0, 1:].reshape(16, 16, d)
    torch.testing.assert_close(grid[..., 2:], torch.full((16, 16, d - 2), 0.5), rtol=0, atol=1e-5)  # constants stay
    # a linear ramp stays a monotone ramp symmetric about the centre, spanning nearly [-1, 1]
    row = grid[8, :, 0]
    assert torch.all(row[1:] > row[:-1]) and float(row[0]) < -0.9 and float(row[-1]) > 0.9
    torch.testing.assert_close(grid[:, :, 0], -grid.flip(1)[:, :, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(grid[:, :, 1], grid[:, :, 0].t(), rtol=0, atol=1e-5)
    assert resample_pos_embed(pos, (37, 37)) is pos

    model = dinov2(**{**TINY, "img_size": 518}, random_init=True).eval()  # 37x37 stored
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 32, 16, 16)
        with pytest.raises(ValueError, match="256x256 is not a multiple of the patch size 14"):
            model(torch.zeros(1, 3, 256, 256))  # the VF loss resizes 256 -> 224 first


# --------------------------------------------------------------------------- the VF loss and its weight


def test_vf_loss_against_a_hand_computation():
    """B=1, D=2, 2 positions: zp columns (3, 4), (1, 0); feature columns (0, 1), (1, 1)."""
    zp = torch.tensor([[3.0, 1.0], [4.0, 0.0]]).reshape(1, 2, 1, 2)
    f = torch.tensor([[0.0, 1.0], [1.0, 1.0]]).reshape(1, 2, 1, 2)
    z1, z2 = (0.6, 0.8), (1.0, 0.0)
    f1, f2 = (0.0, 1.0), (1 / math.sqrt(2), 1 / math.sqrt(2))

    def dot(a, b):
        return a[0] * b[0] + a[1] * b[1]

    zs = [[dot(a, b) for b in (z1, z2)] for a in (z1, z2)]
    fs = [[dot(a, b) for b in (f1, f2)] for a in (f1, f2)]
    distmat = sum(max(abs(zs[i][j] - fs[i][j]) - 0.25, 0.0) for i in range(2) for j in range(2)) / 4
    cos = (max(1 - 0.5 - dot(z1, f1), 0.0) + max(1 - 0.5 - dot(z2, f2), 0.0)) / 2
    # by hand: zs = [[1, .6], [.6, 1]], fs = [[1, .7071], [.7071, 1]]: no pair beyond 0.25; cos: relu(.5-.8) = 0,
    # relu(.5-.7071) = 0 -> both 0. With z2 = (0, -1) both terms bite.
    assert distmat == 0.0 and cos == 0.0
    loss, logs = VFAlignmentLoss(0.25, 0.5)(zp, f)
    assert float(loss) == pytest.approx(0.0, abs=1e-7)

    zp2 = torch.tensor([[3.0, 0.0], [4.0, -1.0]]).reshape(1, 2, 1, 2)
    z2 = (0.0, -1.0)
    zs = [[dot(a, b) for b in (z1, z2)] for a in (z1, z2)]
    distmat = sum(max(abs(zs[i][j] - fs[i][j]) - 0.25, 0.0) for i in range(2) for j in range(2)) / 4
    cos = (max(0.5 - dot(z1, f1), 0.0) + max(0.5 - dot(z2, f2), 0.0)) / 2
    assert distmat > 0 and cos > 0  # |-.8 - .7071| - .25 = 1.2571 twice; cos: relu(.5 + .7071) / 2
    assert distmat == pytest.approx(2 * (0.8 + 1 / math.sqrt(2) - 0.25) / 4)
    loss, logs = VFAlignmentLoss(0.25, 0.5)(zp2, f)
    assert logs["vf_distmat"] == pytest.approx(distmat, rel=1e-6)
    assert logs["vf_cos"] == pytest.approx(cos, rel=1e-6)
    assert float(loss) == pytest.approx(distmat + cos, rel=1e-6)
    # distmat_weight / cos_weight scale the two terms
    loss_w, _ = VFAlignmentLoss(0.25, 0.5, distmat_weight=2.0, cos_weight=0.5)(zp2, f)
    assert float(loss_w) == pytest.approx(2 * distmat + 0.5 * cos, rel=1e-6)


def test_vf_loss_resizes_the_projected_latent_bilinearly_to_the_feature_grid():
    torch.manual_seed(0)
    zp, f = torch.randn(2, 6, 8, 8), torch.randn(2, 6, 4, 4)
    loss, _ = VFAlignmentLoss()(zp, f)
    small = F.interpolate(zp, size=(4, 4), mode="bilinear", align_corners=False)
    ref, _ = VFAlignmentLoss()(small, f)
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)


def test_adaptive_vf_weight_formula_from_encoder_conv_out_gradients():
    """vf_w = clamp(|dnll/dW| / (|dvf/dW| + 1e-4), 0, 1e8) * 0.2 with W = encoder.conv_out.weight, by autograd."""
    from jobs.training.losses import LayerProbe

    torch.manual_seed(0)
    conv_out = torch.nn.Conv2d(8, 4, 3, padding=1)
    proj = torch.nn.Conv2d(4, 6, 1, bias=False)
    probe = LayerProbe(conv_out)
    h = torch.randn(2, 8, 8, 8)
    z = conv_out(h)
    nll = (z - 1.0).abs().sum() / 2
    vf, _ = VFAlignmentLoss()(proj(z), torch.randn(2, 6, 4, 4))
    g_nll = torch.autograd.grad(nll, conv_out.weight, retain_graph=True)[0].norm()
    g_vf = torch.autograd.grad(vf, conv_out.weight, retain_graph=True)[0].norm()
    expected = min(max(float(g_nll) / (float(g_vf) + 1e-4), 0.0), 1e8) * 0.2
    got = adaptive_weight(probe.weight_grad_norm(nll), probe.weight_grad_norm(vf), 0.2, 1e8)
    assert float(got) == pytest.approx(expected, rel=1e-4)
    assert not got.requires_grad
    assert float(adaptive_weight(torch.tensor(3.0), torch.tensor(0.0), 0.2, 1e8)) == pytest.approx(3e4 * 0.2)
    assert float(adaptive_weight(torch.tensor(1e9), torch.tensor(0.0), 0.2, 1e8)) == pytest.approx(1e8 * 0.2)


# --------------------------------------------------------------------------- the _vf recipe and a training run


def test_vf_recipe_config():
    from jobs.training.config import build_gq_config, load_config

    cfg = load_config(os.path.join(REPO, "configs", "train_sd3unet_gq_0.25_vf.yaml"))
    vf = cfg.loss.vf
    assert vf.enabled and vf.model == "gq_model.dinov2:dinov2" and vf.model_kwargs.size == "vitl14"
    assert (vf.weight, vf.adaptive, vf.distmat_margin, vf.cos_margin, vf.distmat_weight, vf.cos_weight,
            vf.input_size, vf.max_weight) == (0.2, True, 0.25, 0.5, 1.0, 1.0, 224, 1e8)
    assert vf.model_kwargs.weights is None  # a local file the user names; never fetched
    assert build_gq_config(cfg).arch == "unet" and build_gq_config(cfg).z_channels == 16
    base = load_config(os.path.join(REPO, "configs", "train_sd3unet_gq_0.25.yaml"))
    for section in ("optim", "data", "deepspeed"):
        assert cfg[section] == base[section], section
    assert cfg.loss.disc == base.loss.disc and cfg.loss.kl_weight == base.loss.kl_weight


def test_vf_recipe_without_weights_stops_before_training(tmp_path):
    from jobs.training.loop import train

    overrides = [f"run.out_dir={tmp_path / 'run'}", "loss.perceptual_weight=0", "deepspeed.enabled=false",
                 "data.train=skimage:", "run.max_steps=1", "run.progress=false", "run.tensorboard=false"]
    with pytest.raises(ValueError, match="DINOv2 needs its pretrained weights"):
        train(os.path.join(REPO, "configs", "train_sd3unet_gq_0.25_vf.yaml"), overrides)
    ckpts = tmp_path / "run" / "checkpoints"
    assert not ckpts.exists() or not any(ckpts.iterdir())


def test_two_step_cpu_training_with_a_tiny_dinov2(tmp_path):
    from jobs.training.loop import train
    from tests.helpers import read_step_metrics

    weights = _timm_file(tmp_path, _random_state(3))  # 2x2 stored grid, resampled to 4x4 at 56 px
    out = str(tmp_path / "run")
    cfg = {
        "model": {"arch": "unet", "encoder": {"ch": 32, "out_ch": 3, "ch_mult": [1, 1, 2], "num_res_blocks": 1,
                                             "attn_resolutions": [], "dropout": 0.0, "resolution": 32,
                                             "in_channels": 3, "z_channels": 4, "double_z": True},
                  "codebook_size": 256, "group": 4},
        "loss": {"perceptual_weight": 0.0, "disc": {"enabled": False},
                 "vf": {"enabled": True, "model": "gq_model.dinov2:dinov2",
                        "model_kwargs": {**TINY, "weights": weights}, "input_size": 56}},
        "data": {"train": "skimage:", "image_size": 32, "resize": 64, "holdout": 2, "batch_size": 2,
                 "num_workers": 0},
        "deepspeed": {"enabled": False},
        "run": {"out_dir": out, "max_steps": 2, "ckpt_every": 0, "log_every": 1, "image_every": 0,
                "progress": False, "tensorboard": False, "export_bundle": False, "threads": 1},
    }
    train(cfg)
    rows = read_step_metrics(out)
    assert sorted(rows) == [1, 2]
    for r in rows.values():
        for k in ("vf_loss", "vf_weight", "vf_distmat", "vf_cos", "nll"):
            assert np.isfinite(r[k]), k
        assert r["vf_loss"] > 0 and r["vf_weight"] > 0
