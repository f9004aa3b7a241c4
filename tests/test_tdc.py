import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gq_model import TDCRegularizer
from gq_model.tdc import kl_bits_per_group
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
