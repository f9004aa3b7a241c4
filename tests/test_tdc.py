import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gq_model import TDCRegularizer
from gq_model.quantizer import GaussianQuantizer, straight_through
from gq_model.tdc import TDC_VARIANTS, kl_bits_per_group
from tests.oracles import tdc_reference_step


def _batch(seed, shape=(2, 8, 3, 3), scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) - 1.0


def test_bits_per_group_formula_and_strided_grouping():
    mu, logvar = _batch(0)
    bits = kl_bits_per_group(mu, logvar, group=4)  # [B,H,W,G=2]
    assert bits.shape == (2, 3, 3, 2)
    per_channel = 1.4426 * 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)
    # group j holds channels j, j+G, j+2G, j+3G with G = 8/4 = 2
    expected_g1 = per_channel[:, [1, 3, 5, 7]].sum(1)
    assert torch.allclose(bits[..., 1], expected_g1, atol=1e-6)


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_loss_and_controller_updates_follow_reference_rule(scale):
    tdc = TDCRegularizer(codebook_size=16, group=4, tolerance=0.5, lam_factor=1.01).train()
    lam, lam_min, lam_max = 1.0, 1.0, 1.0
    for step in range(40):
        mu, logvar = _batch(step, scale=scale)
        mu.requires_grad_(True)
        loss, stats = tdc(mu, logvar)
        bits = kl_bits_per_group(mu.detach(), logvar, 4)
        ref_loss, lam_n, lam_min_n, lam_max_n = tdc_reference_step(bits, lam, lam_min, lam_max, target=4.0)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
        assert (stats["lam"], stats["lam_min"], stats["lam_max"]) == pytest.approx((lam, lam_min, lam_max))
        lam, lam_min, lam_max = lam_n, lam_min_n, lam_max_n
        assert (tdc.lam.item(), tdc.lam_min.item(), tdc.lam_max.item()) == pytest.approx((lam, lam_min, lam_max))
        loss.backward()
        assert mu.grad is not None and torch.isfinite(mu.grad).all()
    assert 1.0 <= tdc.lam_max.item() <= 1000.0 and 1e-3 <= tdc.lam_min.item() <= 1.0


def test_lambda_max_can_decrease_and_lam_is_clamped():
    tdc = TDCRegularizer(codebook_size=2 ** 20, group=4, lam_factor=2.0).train()
    tdc.lam_max.fill_(8.0)
    mu, logvar = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)  # KL 0 bits: far below the 20-bit target
    for _ in range(40):
        tdc(mu, logvar)
    assert tdc.lam_max.item() == 1.0  # the reference's release-era no-op bug kept lam_max from decreasing
    assert tdc.lam.item() == pytest.approx(1e-7)
    assert tdc.lam_min.item() == pytest.approx(1e-3)


def test_eval_mode_never_mutates_and_update_flag_overrides():
    tdc = TDCRegularizer(codebook_size=16, group=4).eval()
    mu, logvar = _batch(1, scale=3.0)
    before = {k: v.clone() for k, v in tdc.state_dict().items()}
    tdc(mu, logvar)
    assert all(torch.equal(before[k], v) for k, v in tdc.state_dict().items())
    tdc.train()
    tdc(mu, logvar, update=False)
    assert all(torch.equal(before[k], v) for k, v in tdc.state_dict().items())
    tdc.eval()
    tdc(mu, logvar, update=True)
    assert tdc.lam.item() != 1.0


def test_lambdas_are_saved_and_restored():
    a = TDCRegularizer(codebook_size=16, group=4).train()
    for i in range(5):
        a(*_batch(i, scale=3.0))
    b = TDCRegularizer(codebook_size=16, group=4)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"lam", "lam_min", "lam_max"}
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_blc_layout_and_bad_inputs():
    tdc = TDCRegularizer(codebook_size=256, group=4)
    loss, stats = tdc(torch.zeros(2, 5, 8), torch.zeros(2, 5, 8))
    assert loss.item() == 0.0 and stats["bits_mean"] == 0.0
    with pytest.raises(ValueError):
        tdc(torch.zeros(2, 5, 6), torch.zeros(2, 5, 6))
    with pytest.raises(ValueError):
        TDCRegularizer(codebook_size=256, group=4, lam_factor=1.0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tdc = TDCRegularizer(codebook_size=16, group=4).train()
        # each rank sees a different batch; rank 1's is far above the band, rank 0's far below
        mu, logvar = _batch(rank, scale=0.1 if rank == 0 else 4.0)
        _, stats = tdc(mu, logvar)
        results[rank] = (stats["bits_mean"], stats["bits_min"], stats["bits_max"],
                         tdc.lam.item(), tdc.lam_min.item(), tdc.lam_max.item())
    finally:
        dist.destroy_process_group()


def test_statistics_are_all_reduced_across_ranks():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_distributed_worker, args=(2, _free_port(), results), nprocs=2, join=True)
        r0, r1 = results[0], results[1]
    assert r0 == pytest.approx(r1)  # identical statistics and controller states on both ranks
    bits = [kl_bits_per_group(*_batch(r, scale=0.1 if r == 0 else 4.0), 4) for r in range(2)]
    allbits = torch.cat([b.flatten() for b in bits])
    assert r0[0] == pytest.approx(allbits.double().mean().item(), rel=1e-6)
    assert r0[1] == pytest.approx(allbits.min().item(), rel=1e-6)
    assert r0[2] == pytest.approx(allbits.max().item(), rel=1e-6)


def test_gradient_accumulation_pools_micro_batch_statistics():
    """With accumulate=True the update at the step's last micro-batch sees the pooled mean/min/max of all of the
    step's micro-batches: exactly the controllers a single batch of their concatenation would give."""
    hi = _batch(3, scale=6.0)  # far above the 4-bit target
    lo = _batch(4, scale=0.01)  # far below it
    mu_all, lv_all = torch.cat([hi[0], lo[0]]), torch.cat([hi[1], lo[1]])
    pooled, single, last_only = (TDCRegularizer(codebook_size=16, group=4) for _ in range(3))
    _, s1 = pooled(*hi, update=False, accumulate=True)
    _, s2 = pooled(*lo, update=True, accumulate=True)
    single(mu_all, lv_all, update=True)
    last_only(*lo, update=True)
    for name in ("lam", "lam_min", "lam_max"):
        assert float(getattr(pooled, name)) == float(getattr(single, name)), name
    # the last micro-batch alone would have moved lam the other way; logged stats stay per micro-batch
    assert float(pooled.lam) > 1.0 > float(last_only.lam)
    assert s1["bits_mean"] > 4 > s2["bits_mean"]
    # the next step starts a fresh pool; an evaluation call (accumulate=False) never touches it
    pooled(*hi, update=False, accumulate=False)
    assert pooled._pending is None


# --------------------------------------------------------------------------- gq2 (GaussianQuantRegularizer2) variant
def _hand_posterior():
    """[B=2, C=4, H=1, W=2] posterior whose contiguous groups (m=2: channels {0,1} and {2,3}) fall below, inside and
    above the 4 +- 0.5 bit band of K=16, and whose strided groups ({0,2}, {1,3}) would give other values."""
    mu = torch.tensor([[[[3.0, 2.0]], [[0.0, 1.0]], [[0.5, 0.2]], [[0.5, 2.4]]],
                       [[[1.7, 0.1]], [[1.6, 0.3]], [[2.6, 0.0]], [[1.0, 0.0]]]])
    logvar = torch.tensor([[[[0.0, -0.5]], [[0.2, 0.0]], [[-1.0, 0.0]], [[0.0, 0.1]]],
                           [[[0.0, 0.0]], [[0.0, -0.2]], [[0.3, 0.0]], [[-0.4, -2.0]]]])
    return mu, logvar


def _hand_group_bits(mu, logvar, m):
    """Per-group KL in bits with contiguous groups, as plain Python loops: {(b, h, w, j): bits}."""
    b_, c_, h_, w_ = mu.shape
    out = {}
    for b in range(b_):
        for h in range(h_):
            for w in range(w_):
                for j in range(c_ // m):
                    total = 0.0
                    for a in range(m):
                        c = j * m + a
                        u, lv = float(mu[b, c, h, w]), float(logvar[b, c, h, w])
                        total += 1.4426 * 0.5 * (u * u + math.exp(lv) - 1.0 - lv)
                    out[(b, h, w, j)] = total
    return out


def _gq2(**kw):
    return TDCRegularizer(codebook_size=16, group=2, tolerance=0.5, lam_factor=1.01, **TDC_VARIANTS["gq2"], **kw)


def test_gq2_loss_matches_a_hand_computation():
    mu, logvar = _hand_posterior()
    bits = _hand_group_bits(mu, logvar, 2)
    target, tol = 4.0, 0.5
    bands = ["above" if r > target + tol else "below" if r < target - tol else "in" for r in bits.values()]
    assert {"above", "below", "in"} <= set(bands), bands  # the posterior exercises all three weights
    lam, lam_min, lam_max = 2.0, 0.25, 3.0
    weighted = [(lam_max if r > target + tol else lam_min if r < target - tol else 1.0) * r for r in bits.values()]
    expected_gq2 = lam * sum(weighted) / len(weighted)  # mean over all 2*1*2*2 = 8 groups
    expected_sum = lam * sum(weighted) / mu.shape[0]  # what the v1 reduction gives for the same groups

    tdc = _gq2()
    for name, v in (("lam", lam), ("lam_min", lam_min), ("lam_max", lam_max)):
        getattr(tdc, name).fill_(v)
    loss, stats = tdc(mu, logvar, update=True)
    assert loss.item() == pytest.approx(expected_gq2, rel=1e-6)
    assert (stats["lam"], stats["lam_min"], stats["lam_max"]) == (lam, lam_min, lam_max)
    # the controllers see the contiguous groups' statistics ...
    values = list(bits.values())
    assert (stats["bits_mean"], stats["bits_min"], stats["bits_max"]) == pytest.approx(
        (sum(values) / len(values), min(values), max(values)), rel=1e-6)
    # ... and step by the usual rule: mean 3.19 < 4 -> lam / f; a group above 4.5 -> lam_max * f; one below 3.5 ->
    # lam_min / f
    assert sum(values) / len(values) < target and max(values) > target + tol and min(values) < target - tol
    assert (tdc.lam.item(), tdc.lam_max.item(), tdc.lam_min.item()) == pytest.approx(
        (lam / 1.01, lam_max * 1.01, lam_min / 1.01))

    v1_sum = TDCRegularizer(codebook_size=16, group=2, layout="contiguous", reduction="sum_per_image")
    for name, v in (("lam", lam), ("lam_min", lam_min), ("lam_max", lam_max)):
        getattr(v1_sum, name).fill_(v)
    assert v1_sum(mu, logvar, update=False)[0].item() == pytest.approx(expected_sum, rel=1e-6)
    # the strided grouping pairs other channels: a different loss for the same posterior
    strided = TDCRegularizer(codebook_size=16, group=2, **{**TDC_VARIANTS["gq2"], "layout": "strided"})
    for name, v in (("lam", lam), ("lam_min", lam_min), ("lam_max", lam_max)):
        getattr(strided, name).fill_(v)
    assert strided(mu, logvar, update=False)[0].item() != pytest.approx(expected_gq2, rel=1e-3)


def test_gq2_gradient_is_the_mean_reduced_weighted_kl():
    mu, logvar = _hand_posterior()
    mu.requires_grad_(True)
    tdc = _gq2()
    tdc.lam_max.fill_(3.0)
    loss, _ = tdc(mu, logvar, update=False)
    loss.backward()
    # d/dmu of lam * mean(w * R): w * 1.4426 * mu / n_groups per channel (the weights are constants, as in the reference)
    mu0 = mu.detach()
    bits = _hand_group_bits(mu0, logvar, 2)
    expected = torch.zeros_like(mu0)
    for (b, h, w, j), r in bits.items():
        wgt = 3.0 if r > 4.5 else 1.0  # lam_max above the band; 1 inside it, and lam_min (still 1.0) below it
        for a in range(2):
            expected[b, j * 2 + a, h, w] = wgt * 1.4426 * float(mu0[b, j * 2 + a, h, w]) / len(bits)
    assert torch.allclose(mu.grad, expected, rtol=1e-5, atol=1e-7)


def test_gq2_controller_ranges():
    tdc = _gq2()
    assert (tdc.lam_min_range, tdc.lam_max_range) == ((1e-7, 1.0), (1.0, 1e7))
    tdc.lam_max.fill_(5e6)
    tdc.lam_min.fill_(2e-7)
    mu, logvar = _hand_posterior()  # groups above and below the band
    for _ in range(200):
        tdc(mu, logvar, update=True)
    assert tdc.lam_max.item() == pytest.approx(1e7) and tdc.lam_min.item() == pytest.approx(1e-7)


# --------------------------------------------------------------------------- release-era lam_max behaviour
@pytest.mark.parametrize("variant", ["gq", "gq2"])
def test_lam_max_only_grows_is_the_release_era_rule(variant):
    """With lam_max_only_grows, "no group above the band" leaves lam_max unchanged instead of dividing it by f."""
    kw = {k: v for k, v in TDC_VARIANTS[variant].items()}
    zero = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)  # 0 bits per group: nothing above the 4-bit band
    high = _batch(7, shape=(1, 4, 2, 2), scale=6.0)           # far above it
    fixed = TDCRegularizer(codebook_size=16, group=4, lam_factor=2.0, **kw)
    buggy = TDCRegularizer(codebook_size=16, group=4, lam_factor=2.0, lam_max_only_grows=True, **kw)
    for t in (fixed, buggy):
        t.lam_max.fill_(8.0)
    history = {"fixed": [], "buggy": []}
    for x in [zero] * 2 + [high] * 3 + [zero] * 3:
        for name, t in (("fixed", fixed), ("buggy", buggy)):
            t(*x, update=True)
            history[name].append(t.lam_max.item())
    assert history["fixed"] == [4.0, 2.0, 4.0, 8.0, 16.0, 8.0, 4.0, 2.0]
    assert history["buggy"] == [8.0, 8.0, 16.0, 32.0, 64.0, 64.0, 64.0, 64.0]
    # the other two controllers follow the same rule either way
    assert (fixed.lam.item(), fixed.lam_min.item()) == (buggy.lam.item(), buggy.lam_min.item())
    # still capped at the variant's maximum
    cap = kw["lam_max_range"][1]
    buggy.lam_max.fill_(cap / 1.5)
    buggy(*high, update=True)
    assert buggy.lam_max.item() == cap
    assert TDCRegularizer(codebook_size=16, group=4).lam_max_only_grows is False  # off by default


def test_reduction_and_layout_are_checked():
    with pytest.raises(ValueError, match="reduction"):
        TDCRegularizer(codebook_size=16, group=4, reduction="sum")
    with pytest.raises(ValueError, match="layout"):
        TDCRegularizer(codebook_size=16, group=4, layout="interleaved")


# --------------------------------------------------------------------------- straight-through estimator
def test_straight_through_value_is_the_codeword_and_gradient_is_identity():
    g = torch.Generator().manual_seed(5)
    mu = torch.randn(2, 4, 3, 3, generator=g).requires_grad_(True)
    logvar = (torch.randn(2, 4, 3, 3, generator=g) - 1.0).requires_grad_(True)
    quantizer = GaussianQuantizer(codebook_size=256, group=4, layout="contiguous")
    _, zq = quantizer.quantize(mu.detach(), logvar.detach())
    eps = torch.randn(mu.shape, generator=g)
    std = torch.exp(0.5 * logvar)
    out = straight_through(mu + std * eps, zq)
    assert torch.equal(out, zq)  # exactly the codewords: the forward is a copy, no arithmetic
    assert out.requires_grad and not zq.requires_grad
    upstream = torch.randn(mu.shape, generator=g)
    (out * upstream).sum().backward()
    assert torch.allclose(mu.grad, upstream)  # d out / d mu = identity
    assert torch.allclose(logvar.grad, upstream * eps * 0.5 * std.detach(), rtol=1e-5, atol=1e-7)  # through the sample
    with pytest.raises(ValueError, match="shapes differ"):
        straight_through(mu, zq[:1])
