"""gq_model.metrics against independent computations: PSNR by hand, SSIM vs scikit-image, FID vs scipy's sqrtm, the
networks' layouts vs the published weight files' key names, exact codebook counts and the advisor's rule."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gq_model.metrics import CodebookUsage, FeatureStats, Histogram, advise, frechet_distance, ms_ssim, psnr, ssim
from gq_model.metrics.frechet import FrechetReference
from gq_model.metrics.advisor import POSTERIOR_SAMPLE_MISS, theorem_bound, theorem_margin_nats
from gq_model.metrics.inception import FIDInceptionV3, load_fid_inception
from gq_model.metrics.lpips_alex import ALEX_CHANNELS, LPIPSAlex, load_lpips_alex


def _pair(b=2, h=32, w=40, seed=0, overshoot=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(b, 3, h, w, generator=g)) * overshoot  # overshoot > 1 leaves [-1, 1]
    return x, y


# ------------------------------------------------------------------------------------------------ PSNR / SSIM
def test_psnr_by_hand_clamped_and_unclamped():
    x, y = _pair(overshoot=1.3)
    assert (y.abs() > 1).any()
    for clamp in (True, False):
        got = psnr(x, y, clamp=clamp).numpy()
        for i in range(x.shape[0]):
            a = (x[i].numpy().astype(np.float64) + 1) * 127.5
            yy = np.clip(y[i].numpy(), -1, 1) if clamp else y[i].numpy()
            b = (yy.astype(np.float64) + 1) * 127.5
            want = 20 * math.log10(255.0 / math.sqrt(np.mean((a - b) ** 2)))
            assert got[i] == pytest.approx(want, rel=1e-6)
    assert not np.allclose(psnr(x, y, clamp=True).numpy(), psnr(x, y, clamp=False).numpy())
    assert torch.isfinite(psnr(x, x)).all()  # identical images: capped, still valid JSON


def test_ssim_matches_skimage():
    skm = pytest.importorskip("skimage.metrics")
    x, y = _pair(b=2, h=32, w=45, seed=1, overshoot=1.2)
    for clamp in (True, False):
        got = ssim(x, y, clamp=clamp).numpy()
        for i in range(2):
            a = (x[i].permute(1, 2, 0).numpy().astype(np.float64) + 1) * 127.5
            yy = y[i].permute(1, 2, 0).numpy().astype(np.float64)
            b = ((np.clip(yy, -1, 1) if clamp else yy) + 1) * 127.5
            want = skm.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                             data_range=255, channel_axis=2)
            assert got[i] == pytest.approx(want, abs=1e-9)
    assert ssim(x, x).numpy() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 11"):
        ssim(x[..., :8, :8], y[..., :8, :8])


# ------------------------------------------------------------------------------------------------ MS-SSIM
def _np_ssim_cs(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean SSIM and mean contrast-structure term of one [H, W] channel pair, by hand: 11x11 Gaussian (sigma 1.5)
    window weights over every fully inside window, population moments, C1 = (0.01*255)^2, C2 = (0.03*255)^2."""
    t = np.arange(11) - 5.0
    g = np.exp(-t ** 2 / 4.5)
    win = np.outer(g, g) / np.outer(g, g).sum()
    view = np.lib.stride_tricks.sliding_window_view

    def mean(z):
        return np.einsum("ijkl,kl->ij", view(z, (11, 11)), win)

    ma, mb = mean(a), mean(b)
    va, vb, cov = mean(a * a) - ma ** 2, mean(b * b) - mb ** 2, mean(a * b) - ma * mb
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    cs = (2 * cov + c2) / (va + vb + c2)
    return float(((2 * ma * mb + c1) / (ma ** 2 + mb ** 2 + c1) * cs).mean()), float(cs.mean())


def _np_halve(z: np.ndarray) -> np.ndarray:
    """2x2 mean; an odd side is zero-padded by one on both sides first, the zeros counted (avg_pool2d's default)."""
    for axis in (0, 1):
        if z.shape[axis] % 2:
            z = np.pad(z, [(1, 1) if ax == axis else (0, 0) for ax in (0, 1)])
    h, w = z.shape[0] // 2 * 2, z.shape[1] // 2 * 2
    return z[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def _np_ms_ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """One image's MS-SSIM by hand, pytorch_msssim's convention (gq_model/metrics/image.py doc)."""
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    per_channel = []
    for c in range(x.shape[0]):
        a = (x[c].double().numpy() + 1) * 127.5
        b = (y[c].double().numpy() + 1) * 127.5
        value = 1.0
        for level, w in enumerate(weights):
            full, cs = _np_ssim_cs(a, b)
            value *= max(cs if level < 4 else full, 0.0) ** w
            a, b = _np_halve(a), _np_halve(b)
        per_channel.append(value)
    return float(np.mean(per_channel))


@pytest.mark.parametrize("h, w", [(256, 256), (257, 300)])
def test_ms_ssim_matches_a_hand_computation(h, w):
    x, y = _pair(b=1, h=h, w=w, seed=2)
    y = y.clamp(-1, 1)
    got = ms_ssim(x, y).item()
    assert got == pytest.approx(_np_ms_ssim(x[0], y[0]), abs=1e-9)
    assert 0.0 < got < 1.0


def test_ms_ssim_properties():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1
    x = F.avg_pool2d(x, 5, 1, 2)  # some structure at every scale
    assert ms_ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)
    noise = torch.randn(x.shape, generator=g)
    values = [ms_ssim(x, x + s * noise, clamp=False).item() for s in (0.01, 0.05, 0.2, 0.5)]
    assert values == sorted(values, reverse=True) and values[0] < 1.0  # more noise, lower MS-SSIM
    # clamping matters for overshooting reconstructions, as for SSIM
    y = x * 4
    assert (y.abs() > 1).any()
    assert ms_ssim(x, y, clamp=True).item() != pytest.approx(ms_ssim(x, y, clamp=False).item(), abs=1e-6)
    # an anti-correlated image has negative cs at the first scale: set to 0 (relu), so MS-SSIM is 0
    assert ssim(x, -x, clamp=False).item() < 0 and ms_ssim(x, -x, clamp=False).item() == 0.0


def test_ms_ssim_at_one_scale_is_ssim():
    x, y = _pair(b=3, h=40, w=33, seed=3)
    one = ms_ssim(x, y, weights=(1.0,), min_size=11)
    assert torch.allclose(one, ssim(x, y).clamp_min(0), rtol=0, atol=1e-12)


def test_ms_ssim_refuses_images_below_256_like_the_reference():
    x, y = _pair(b=1, h=255, w=300)
    with pytest.raises(ValueError, match="at least 256x256"):
        ms_ssim(x, y)
    with pytest.raises(ValueError, match="more than 160 px"):  # pytorch_msssim's own limit, if min_size is lowered
        ms_ssim(x[..., :160, :160], y[..., :160, :160], min_size=11)


# ------------------------------------------------------------------------------------------------ Fréchet distance
def _scipy_fid(mu1, s1, mu2, s2):
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim", [1, 5, 32])
def test_frechet_distance_matches_scipy_sqrtm(dim):
    pytest.importorskip("scipy")
    rng = np.random.default_rng(dim)
    a, b = rng.standard_normal((dim, dim)), rng.standard_normal((dim, dim))
    s1, s2 = a @ a.T + 0.1 * np.eye(dim), b @ b.T + 0.1 * np.eye(dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    ref = FrechetReference(mu1, s1)  # the shared-square-root form rFID uses for several reconstruction sets
    assert ref.distance(mu2, s2) == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)


def test_frechet_distance_singular_covariances():
    # fewer samples than dimensions (rank-deficient, as rFID on < 2048 images): Tr((A A^T B B^T)^1/2) is the nuclear
    # norm of A^T B, an independent exact value
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((40, 6)), rng.standard_normal((40, 6))
    s1, s2 = a @ a.T, b @ b.T
    mu = np.zeros(40)
    nuclear = np.linalg.svd(a.T @ b, compute_uv=False).sum()
    want = np.trace(s1) + np.trace(s2) - 2 * nuclear
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(mu, s1, mu[:3], s2)


def test_feature_stats_merge_equals_numpy_cov():
    rng = np.random.default_rng(4)
    feats = rng.standard_normal((37, 64)) + 0.5
    one, part1, part2 = FeatureStats(64), FeatureStats(64), FeatureStats(64)
    one.add(torch.from_numpy(feats).float())
    part1.add(torch.from_numpy(feats[:20]).float())
    part2.add(torch.from_numpy(feats[20:]).float())
    merged = FeatureStats(64).load({k: part1.state()[k] + part2.state()[k] for k in ("n", "sum", "outer")})
    f32 = feats.astype(np.float32).astype(np.float64)
    for s in (one, merged):
        mean, cov = s.mean_cov()
        np.testing.assert_allclose(mean, f32.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(cov, np.cov(f32, rowvar=False), rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------------------------------------ FID Inception
def _pytorch_fid_keys() -> dict[str, tuple | None]:
    """The key names of pt_inception-2015-12-05-6726825d.pth as published (torchvision Inception3 tree, 1008
    classes, no AuxLogits), written out from the documented block structure; some shapes spot-checked."""
    a = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
         "branch_pool"]
    b = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
    c = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3"] + [f"branch7x7dbl_{i}" for i in range(1, 6)] + \
        ["branch_pool"]
    d = ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"]
    e = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
         "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
    convs = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    for block, names in [("Mixed_5b", a), ("Mixed_5c", a), ("Mixed_5d", a), ("Mixed_6a", b), ("Mixed_6b", c),
                         ("Mixed_6c", c), ("Mixed_6d", c), ("Mixed_6e", c), ("Mixed_7a", d), ("Mixed_7b", e),
                         ("Mixed_7c", e)]:
        convs += [f"{block}.{n}" for n in names]
    keys = {f"{p}.{s}": None for p in convs for s in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean",
                                                      "bn.running_var")}
    keys.update({"fc.weight": (1008, 2048), "fc.bias": (1008,)})
    keys.update({
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1), "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch_pool.conv.weight": (64, 288, 1, 1), "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7), "Mixed_6e.branch7x7dbl_2.conv.weight": (192, 192, 7, 1),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3), "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
        "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "Mixed_7c.branch_pool.bn.running_var": (192,),
    })
    return keys


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return FIDInceptionV3().eval()


def test_inception_keys_are_the_published_layout(inception):
    expected = _pytorch_fid_keys()
    sd = {k: v for k, v in inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert sorted(sd) == sorted(expected) and len(sd) == 472
    for k, shape in expected.items():
        if shape is not None:
            assert tuple(sd[k].shape) == shape, k


def test_inception_loads_published_style_files_strictly(inception, tmp_path):
    # the published file predates BatchNorm's num_batches_tracked: a plain dict without it must load strictly
    sd = {k: v.clone() for k, v in inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["fc.bias"] += 1.0
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, path)
    with pytest.warns(UserWarning, match="not the published 6726825d"):
        net, info = load_fid_inception(str(tmp_path))  # a directory finds the standard file name
    assert torch.equal(net.fc.bias, sd["fc.bias"]) and info["official"] is False and len(info["sha256"]) == 64
    FIDInceptionV3().load_state_dict(inception.state_dict(), strict=True)  # with num_batches_tracked too
    del sd["Mixed_6c.branch7x7dbl_3.bn.running_mean"]
    with pytest.raises(RuntimeError, match="Missing key"):
        FIDInceptionV3().load_state_dict(sd, strict=True)
    with pytest.raises(FileNotFoundError):
        load_fid_inception(str(tmp_path / "nope.pth"))


def test_inception_pool3_shape_and_fid_pooling_variants(inception):
    with torch.no_grad():
        feats = inception(torch.rand(2, 3, 40, 56) * 2 - 1)  # resized to 299 internally
        assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
        # Mixed_7b averages without the padding, Mixed_7c max-pools (the TF graph's quirks)
        x = torch.rand(1, 2048, 5, 5)
        pool_b = inception.Mixed_7b.branch_pool
        want_b = pool_b(F.avg_pool2d(x[:, :1280], 3, 1, 1, count_include_pad=False))
        assert torch.allclose(inception.Mixed_7b(x[:, :1280])[:, -192:], want_b, atol=1e-6)
        want_c = inception.Mixed_7c.branch_pool(F.max_pool2d(x, 3, 1, 1))
        assert torch.allclose(inception.Mixed_7c(x)[:, -192:], want_c, atol=1e-6)
        want_a = inception.Mixed_5b.branch_pool(F.avg_pool2d(x[:, :192], 3, 1, 1, count_include_pad=False))
        assert torch.allclose(inception.Mixed_5b(x[:, :192])[:, -32:], want_a, atol=1e-6)


# ------------------------------------------------------------------------------------------------ LPIPS-Alex
def _save_lpips_files(tmp_path, seed=0):
    torch.manual_seed(seed)
    net = LPIPSAlex()
    sd = net.state_dict()
    backbone = {k[len("net."):]: v for k, v in sd.items() if k.startswith("net.")}
    backbone.update({"classifier.1.weight": torch.zeros(4, 9), "classifier.1.bias": torch.zeros(4)})
    heads = {k: v.abs() for k, v in sd.items() if k.startswith("lin")}  # LPIPS heads are non-negative
    torch.save(backbone, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(heads, tmp_path / "alex.pth")
    return backbone, heads


def _lpips_by_hand(backbone, heads, x, y):
    """LPIPS-Alex written out from the paper/architecture, straight from the two state dicts."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(z):
        z = (z - shift) / scale
        out = []
        cfg = [(0, 4, 2, True), (3, 1, 2, True), (6, 1, 1, False), (8, 1, 1, False), (10, 1, 1, False)]
        for i, (idx, stride, pad, pool_after) in enumerate(cfg):
            z = F.relu(F.conv2d(z, backbone[f"features.{idx}.weight"], backbone[f"features.{idx}.bias"], stride, pad))
            out.append(z)
            if pool_after:
                z = F.max_pool2d(z, 3, 2)
        return out

    total = 0
    for i, (a, b) in enumerate(zip(taps(x), taps(y))):
        na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + F.conv2d((na - nb) ** 2, heads[f"lin{i}.model.1.weight"]).mean((2, 3))
    return total.view(-1)


def test_lpips_alex_layout_loading_and_value(tmp_path):
    backbone, heads = _save_lpips_files(tmp_path)
    shapes = {"features.0.weight": (64, 3, 11, 11), "features.3.weight": (192, 64, 5, 5),
              "features.6.weight": (384, 192, 3, 3), "features.8.weight": (256, 384, 3, 3),
              "features.10.weight": (256, 256, 3, 3)}
    for k, s in shapes.items():
        assert tuple(backbone[k].shape) == s and tuple(backbone[k.replace("weight", "bias")].shape) == (s[0],)
    assert sorted(heads) == [f"lin{i}.model.1.weight" for i in range(5)]
    assert [tuple(heads[f"lin{i}.model.1.weight"].shape) for i in range(5)] == [(1, c, 1, 1) for c in ALEX_CHANNELS]
    model, info = load_lpips_alex(str(tmp_path))
    assert info["heads"].endswith("alex.pth") and model.train().training is False  # pinned to eval: no dropout
    x, y = _pair(b=3, h=64, w=64, seed=5)
    y = y.clamp(-1, 1)
    with torch.no_grad():
        d = model(x, y)
        assert d.shape == (3,) and (d > 0).all()
        assert torch.allclose(d, _lpips_by_hand(backbone, heads, x, y), rtol=1e-5, atol=1e-7)
        assert torch.allclose(model(x, x), torch.zeros(3), atol=1e-7)
        assert model(x[:, :, :32, :32], y[:, :, :32, :32]).shape == (3,)  # the tiny test images still work


def test_lpips_alex_missing_and_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="alex.pth.*alexnet"):
        load_lpips_alex(str(tmp_path))
    backbone, heads = _save_lpips_files(tmp_path)
    torch.save({**backbone, "features.12.weight": torch.zeros(1)}, tmp_path / "alexnet-owt-7be5be79.pth")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_lpips_alex(str(tmp_path))
    torch.save(backbone, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save({"lin0.model.1.weight": heads["lin0.model.1.weight"]}, tmp_path / "alex.pth")
    with pytest.raises(ValueError, match="alex.pth keys"):
        load_lpips_alex(str(tmp_path))


# ------------------------------------------------------------------------------------------------ codebook usage
def test_usage_summary_is_the_one_vocabulary():
    """Manifests, the sink, gq inspect and gq demo report usage in these words (gq_model.metrics.usage_summary)."""
    from gq_model.metrics.codebook_usage import usage_summary

    counts = np.array([2, 1, 3, 0, 0, 0, 0, 6])
    p = np.array([2, 1, 3, 6]) / 12
    h = float(-(p * np.log2(p)).sum())
    s = usage_summary(counts, scope="this run")
    assert s == {"scope": "this run", "tokens": 12, "codebook_size": 8, "used": 4, "usage": 0.5,
                 "entropy_bits": round(h, 4), "perplexity": round(2 ** h, 2)}
    raw = usage_summary(torch.as_tensor(counts), 16, rounded=False)
    assert raw["codebook_size"] == 16 and raw["usage"] == 0.25 and raw["entropy_bits"] == pytest.approx(h)
    assert usage_summary(np.zeros(4, np.int64))["used"] == 0


def test_codebook_usage_counts_are_exact():
    # K=8, two groups, [B=2, G=2, h=1, w=3]: group 0 uses {0,0,1,2,2,2}, group 1 uses {7,7,7,7,7,7}
    idx = torch.tensor([[[[0, 0, 1]], [[7, 7, 7]]], [[[2, 2, 2]], [[7, 7, 7]]]])
    u = CodebookUsage(8, 2)
    u.add(idx, group_dim=1)
    assert u.counts.tolist() == [[2, 1, 3, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 6]]
    r = u.report()
    p = np.array([2, 1, 3, 6]) / 12  # pooled over groups
    h = float(-(p * np.log2(p)).sum())
    assert r["tokens"] == 12 and r["used"] == 4 and r["usage"] == 0.5
    assert r["entropy_bits"] == pytest.approx(h) and r["perplexity"] == pytest.approx(2 ** h)
    g0 = np.array([2, 1, 3]) / 6
    assert r["per_group"][0]["usage"] == 3 / 8
    assert r["per_group"][0]["perplexity"] == pytest.approx(2 ** float(-(g0 * np.log2(g0)).sum()))
    assert r["per_group"][1] == {"usage": 1 / 8, "perplexity": 1.0, "entropy_bits": 0.0}
    # [B, L, G] layout: the same tokens give the same counts
    v = CodebookUsage(8, 2)
    v.add(idx.flatten(2).permute(0, 2, 1), group_dim=-1)
    assert torch.equal(v.counts, u.counts)
    # uniform use of all codewords: perplexity == K
    w = CodebookUsage(8, 1)
    w.add(torch.arange(8).repeat(3).view(1, 1, 4, 6), group_dim=1)
    assert w.report()["perplexity"] == pytest.approx(8.0) and w.report()["usage"] == 1.0
    with pytest.raises(ValueError, match="outside"):
        w.add(torch.tensor([[[[8]]]]), group_dim=1)


# ------------------------------------------------------------------------------------------------ advisor
def test_histogram_quantiles_and_merge():
    rng = np.random.default_rng(6)
    vals = rng.gamma(4.0, 3.0, 20000)
    h1, h2 = Histogram(0, 64, 4096), Histogram(0, 64, 4096)
    h1.add(torch.from_numpy(vals[:7000]))
    h2.add(torch.from_numpy(vals[7000:]))
    h = Histogram(0, 64, 4096).load({
        "counts": h1.counts + h2.counts, "moments": h1.moments + h2.moments,
        "extremes": torch.maximum(h1.extremes, h2.extremes)})
    for q in (0.01, 0.5, 0.9, 0.99):
        assert abs(h.quantile(q) - np.quantile(vals, q)) <= 64 / 4096 + 1e-9
    s = h.summary()
    assert s["count"] == 20000 and s["mean"] == pytest.approx(vals.mean()) and s["std"] == pytest.approx(vals.std())
    assert s["max"] == pytest.approx(vals.max()) and s["min"] == pytest.approx(vals.min())
    big = Histogram(0, 4, 16)
    big.add(torch.tensor([1.0, 2.0, 100.0]))
    assert big.quantile(1.0) == 100.0  # overflow -> the exact maximum, never understated
    assert big.fraction_above(2.5) == pytest.approx(1 / 3)


def test_theorem_margin_inverts_the_bound():
    for delta in (0.5, POSTERIOR_SAMPLE_MISS, 1e-3):
        for c1 in (0.0, 0.7):
            t = theorem_margin_nats(delta, c1)
            assert theorem_bound(t, c1) == pytest.approx(delta, rel=1e-9)
    assert POSTERIOR_SAMPLE_MISS == pytest.approx(0.3173105, rel=1e-6)
    # default: ln ln(1/delta) - ln sqrt(2/pi) + c1 + 1/2 = 0.8637 + c1 nats = 1.246 bits at c1 = 0
    assert theorem_margin_nats() / math.log(2) == pytest.approx(1.2461, abs=1e-3)
    with pytest.raises(ValueError):
        theorem_margin_nats(1.5)


@pytest.mark.parametrize("log2k, verdict", [(12, "sufficient"), (13, "sufficient"), (11, "marginal"),
                                            (10, "marginal"), (9, "insufficient")])
def test_advisor_on_synthetic_kl(log2k, verdict):
    h = Histogram(0, 64, 4096)
    h.add(torch.full((5000,), 10.0))  # every group spends exactly 10 bits
    adv = advise(h, 2 ** log2k, c1=0.0)
    assert adv["rate_bits"] == pytest.approx(10.0)
    assert adv["required_bits"] == pytest.approx(10.0 + 1.2461, abs=1e-3)
    assert adv["recommended_codebook_size"] == 2 ** 12 and adv["guideline_log2"] == 10
    assert adv["verdict"] == verdict and adv["suffices"] == (verdict == "sufficient")
    assert adv["fraction_groups_over_log2k"] == (1.0 if log2k < 10 else 0.0)


def test_advisor_uses_the_tail_and_c1():
    h = Histogram(0, 64, 4096)
    vals = torch.cat([torch.full((9800,), 14.0), torch.full((200,), 15.5)])  # 2% of groups spend 15.5 bits
    h.add(vals)
    adv = advise(h, 2 ** 16, c1=0.0)  # p99 = 15.5 -> 16.75 required -> 2^17
    assert adv["rate_bits"] == pytest.approx(15.5, abs=1 / 64) and adv["recommended_log2"] == 17
    assert adv["verdict"] == "marginal" and 0 < adv["bound_at_this_k"] < 1
    assert advise(h, 2 ** 16, c1=0.0, percentile=50)["recommended_log2"] == 16  # the median group: 14 + 1.25
    # a larger |mu|*sigma needs a larger margin: c1 = 1 adds 1/ln 2 = 1.44 bits -> 18.19 -> 2^19
    assert advise(h, 2 ** 16, c1=1.0)["recommended_log2"] == 19
