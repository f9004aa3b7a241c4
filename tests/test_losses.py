"""Training losses (gq_model.losses): LPIPS weight loading, the PatchGAN/ActNorm discriminator, VF alignment, and the
adaptive-weight layer probe. All CPU, all small."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gq_model.losses import (LPIPS, ActNorm, NLayerDiscriminator, VFAlignmentLoss, adaptive_weight, build_lpips,
                             feature_grid, hinge_d_loss, load_feature_model)
from gq_model.losses.lpips import VGG16Features
from tests.model_helpers import StandInFeatureModel, write_lpips_files


def test_vgg16_keys_match_torchvision_layout():
    keys = list(VGG16Features().state_dict())
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert keys == [f"features.{i}.{w}" for i in convs for w in ("weight", "bias")]
    with torch.device("meta"):
        assert sum(p.numel() for p in LPIPS().parameters()) == 14_716_160  # the reference's LPIPS-VGG count


def test_lpips_loads_published_formats_and_computes(tmp_path):
    vgg_path, lin_path = write_lpips_files(tmp_path)
    lp = build_lpips(vgg_path, lin_path)
    assert isinstance(lp, LPIPS)
    assert torch.equal(lp.lin2.model[1].weight, torch.load(lin_path)["lin2.model.1.weight"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    d = lp(x, y)
    assert d.shape == (2, 1, 1, 1)
    assert torch.all(d > 0) and torch.allclose(lp(x, x), torch.zeros(2, 1, 1, 1), atol=1e-6)
    d.sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in lp.parameters())


def test_lpips_is_pinned_to_eval(tmp_path):
    lp = build_lpips(*write_lpips_files(tmp_path))
    nn.Sequential(lp).train()  # a recursive train() (the reference's image-logger bug) must not enable dropout
    assert not lp.training and not lp.lin0.model[0].training
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    assert torch.equal(lp(x, y), lp(x, y))  # dropout off: deterministic


def test_lpips_without_weights_is_an_error_never_silently_off(tmp_path, monkeypatch):
    """Nothing given, nothing cached, downloads off: an error naming the files and the ways out (never None)."""
    from gq_model.weights import WeightsUnavailable

    monkeypatch.setenv("GQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GQ_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match=r"(?s)vgg16-397923af\.pth.*lpips-v0\.1-vgg\.pth.*"
                                                 r"gq weights fetch lpips-vgg.*loss\.perceptual_weight=0"):
        build_lpips(None, None)
    vgg_path, _ = write_lpips_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # an explicit path is used as given, or fails
        build_lpips(vgg_path, str(tmp_path / "missing" / "vgg.pth"))


def test_lpips_explicit_files_that_are_not_the_published_ones_warn(tmp_path):
    with pytest.warns(RuntimeWarning, match="not the published vgg16-397923af.pth"):
        build_lpips(*write_lpips_files(tmp_path))


def test_lpips_rejects_wrong_files(tmp_path):
    vgg_path, lin_path = write_lpips_files(tmp_path)
    with pytest.raises(ValueError, match="vgg.pth"):
        build_lpips(vgg_path, vgg_path)
    with pytest.raises(ValueError, match="vgg16"):
        build_lpips(lin_path, lin_path)


def test_lpips_reads_fsspec_urls(tmp_path):
    import fsspec

    vgg_path, lin_path = write_lpips_files(tmp_path)
    fs = fsspec.filesystem("memory")
    for src, name in ((vgg_path, "vgg16.pth"), (lin_path, "vgg.pth")):
        with open(src, "rb") as f, fs.open(f"/lpips-test/{name}", "wb") as g:
            g.write(f.read())
    lp = build_lpips("memory://lpips-test/vgg16.pth", "memory://lpips-test/vgg.pth")
    assert lp is not None


def test_discriminator_reference_size_and_shapes():
    with torch.device("meta"):
        ref = NLayerDiscriminator(3, 160, 6, use_actnorm=True)
    assert sum(p.numel() for p in ref.parameters()) == 95_892_961  # gq-reference.md §3.1
    d = NLayerDiscriminator(3, ndf=8, n_layers=2)
    assert len(d.actnorms()) == 2 and not d.actnorm_initialized
    assert d.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    assert not d.actnorm_initialized  # eval forwards never initialize
    with pytest.warns(RuntimeWarning, match="lazily"):
        d.train()(torch.randn(2, 3, 32, 32))  # the reference's lazy fallback, with a warning
    assert d.actnorm_initialized


def test_actnorm_data_init_is_explicit_and_identical_for_the_same_batch():
    x = torch.randn(4, 3, 32, 32) * 3 + 1
    torch.manual_seed(0)
    a = NLayerDiscriminator(3, 8, 2)
    torch.manual_seed(0)
    b = NLayerDiscriminator(3, 8, 2)
    a.init_actnorm(x)
    b.init_actnorm(x)
    assert a.actnorm_initialized
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    # after init every ActNorm output is standardized per channel on that batch
    h, outs = x, []
    for layer in a.main:
        h = layer(h)
        if isinstance(layer, ActNorm):
            outs.append(h.detach().clone())  # the next LeakyReLU works in place
    for o in outs:
        flat = o.transpose(0, 1).reshape(o.shape[1], -1)
        assert torch.allclose(flat.mean(1), torch.zeros(o.shape[1]), atol=1e-4)
        assert torch.allclose(flat.std(1), torch.ones(o.shape[1]), atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a.train()(x)  # initialized: no lazy init, no warning


def test_hinge_and_adaptive_weight():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
    assert float(adaptive_weight(2.0, 1.0, 0.75)) == pytest.approx(0.75 * 2.0 / (1.0 + 1e-4))
    assert float(adaptive_weight(1.0, 0.0, 1.0)) == pytest.approx(1e4)  # clamped at max_value


def test_feature_grid_forms():
    tokens = torch.randn(2, 1 + 16, 5)
    g = feature_grid(tokens)
    assert g.shape == (2, 5, 4, 4) and torch.equal(g[:, :, 0, 1], tokens[:, 2])
    assert feature_grid({"x_norm_patchtokens": torch.randn(2, 9, 3)}).shape == (2, 3, 3, 3)
    assert feature_grid(torch.randn(2, 7, 3, 3)).shape == (2, 7, 3, 3)
    with pytest.raises(ValueError):
        feature_grid(torch.randn(2, 7, 3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_load_feature_model_torchscript_and_import_spec(tmp_path):
    path = tmp_path / "feat.pt"
    torch.jit.script(StandInFeatureModel()).save(str(path))
    m = load_feature_model(str(path))
    assert not m.training and all(not p.requires_grad for p in m.parameters())
    assert feature_grid(m(torch.randn(1, 3, 32, 32))).shape == (1, 24, 4, 4)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(StandInFeatureModel(), (torch.randn(2, 3, 32, 32),),
                                  dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(tmp_path / "feat.pt2"))
    m1 = load_feature_model(str(tmp_path / "feat.pt2"))
    assert feature_grid(m1(torch.randn(3, 3, 32, 32))).shape == (3, 24, 4, 4)
    m2 = load_feature_model("torch.nn:Identity")
    assert isinstance(m2, nn.Identity)
    with pytest.raises(ValueError, match="not a TorchScript"):
        (tmp_path / "junk.pt").write_bytes(b"junk")
        load_feature_model(str(tmp_path / "junk.pt"))


def test_vf_loss_margins():
    vf = VFAlignmentLoss(distmat_margin=0.25, cos_margin=0.5)
    f = torch.randn(2, 6, 4, 4)
    loss, logs = vf(f.clone(), f)
    assert float(loss) == 0.0 and logs["vf_cos"] == 0.0
    zp = torch.randn(2, 6, 8, 8, requires_grad=True)  # resized to the 4x4 feature grid
    loss, _ = vf(zp, -f)
    assert float(loss.detach()) > 0.5
    loss.backward()
    assert zp.grad is not None and zp.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_layer_probe_weight_grad_matches_autograd(kind):
    from jobs.training.losses import LayerProbe

    torch.manual_seed(0)
    layer = nn.Conv2d(5, 3, 3, padding=1) if kind == "conv" else nn.Linear(7, 4)
    x = torch.randn(2, 5, 6, 6) if kind == "conv" else torch.randn(2, 9, 7)
    probe = LayerProbe(layer)
    y = layer(x)
    loss = (y.tanh() * torch.randn_like(y)).sum()
    expected = torch.autograd.grad(loss, layer.weight, retain_graph=True)[0].norm()
    assert torch.allclose(probe.weight_grad_norm(loss), expected, rtol=1e-5)
