import pytest
import torch

from gq_model import GaussianQuantizer, gaussian_codebook
from gq_model.quantizer import from_groups, to_groups
from kernels.reference import reference_search  # the reference's float32 torch backend
from tests.oracles import oracle_indices


def _posterior(shape, seed=0, sigma=0.5):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g) * 0.8
    logvar = torch.full(shape, 2 * torch.log(torch.tensor(sigma)).item()) + 0.3 * torch.randn(shape, generator=g)
    return mu, logvar


def test_strided_grouping_matches_reference_layout():
    # m=8, C=16: sub-codebook 0 <- channels 0,2,...,14; sub-codebook 1 <- channels 1,3,...,15 (gq-reference.md §1.4)
    x = torch.arange(16.0).reshape(1, 16, 1, 1)
    rows = to_groups(x, 8)  # [1,1,1,G=2,m=8]
    assert rows[0, 0, 0, 0].tolist() == list(range(0, 16, 2))
    assert rows[0, 0, 0, 1].tolist() == list(range(1, 16, 2))
    assert torch.equal(from_groups(rows, 4), x)
    contiguous = to_groups(x, 8, "contiguous")
    assert contiguous[0, 0, 0, 1].tolist() == list(range(8, 16))
    assert torch.equal(from_groups(contiguous, 4, "contiguous"), x)
    blc = torch.arange(32.0).reshape(1, 2, 16)
    assert torch.equal(from_groups(to_groups(blc, 4), 3), blc)


@pytest.mark.parametrize("group,channels", [(16, 16), (8, 16), (4, 16)])
def test_quantize_bchw_matches_float64_oracle(group, channels):
    q = GaussianQuantizer(codebook_size=4096, group=group)
    mu, logvar = _posterior((3, channels, 5, 7), seed=group)
    indices, zhat = q.quantize(mu, logvar)
    g = channels // group
    assert indices.shape == (3, g, 5, 7) and indices.dtype == torch.int64
    rows_mu = to_groups(mu, group).reshape(-1, group)
    rows_lv = to_groups(logvar, group).reshape(-1, group)
    best, clear = oracle_indices(rows_mu, rows_lv, q.codebook, 1.0)
    got = indices.permute(0, 2, 3, 1).reshape(-1)
    assert clear.float().mean() > 0.99
    assert torch.equal(got[clear], best[clear])
    # zhat is the chosen codewords in the reference's inverse layout, and dequantize reproduces it exactly
    assert torch.equal(q.dequantize(indices), zhat)
    assert torch.equal(to_groups(zhat, group).reshape(-1, group), q.codebook[got])


def test_identical_to_reference_float32_algorithm():
    q = GaussianQuantizer(codebook_size=2048, group=16)
    mu, logvar = _posterior((2, 16, 8, 8), seed=3)
    indices, _ = q.quantize(mu, logvar)
    rows_mu = to_groups(mu, 16).reshape(-1, 16)
    rows_lv = to_groups(logvar, 16).reshape(-1, 16)
    ref = reference_search(rows_mu, rows_lv, q.codebook, 1.0)
    _, clear = oracle_indices(rows_mu, rows_lv, q.codebook, 1.0)
    assert torch.equal(indices.permute(0, 2, 3, 1).reshape(-1)[clear], ref[clear])


def test_blc_layout_and_beta_zero_is_mahalanobis_nearest_neighbour():
    q = GaussianQuantizer(codebook_size=1024, group=4, beta=0.0)
    mu, logvar = _posterior((2, 6, 8), seed=5)
    indices, zhat = q.quantize(mu, logvar)
    assert indices.shape == (2, 6, 2) and zhat.shape == mu.shape
    rows_mu, rows_lv = to_groups(mu, 4).reshape(-1, 4), to_groups(logvar, 4).reshape(-1, 4)
    d = (((q.codebook[None] - rows_mu[:, None]) ** 2) * torch.exp(-rows_lv)[:, None]).sum(-1)
    best, clear = oracle_indices(rows_mu, rows_lv, q.codebook, 0.0)
    assert torch.equal(d.argmin(1)[clear], indices.reshape(-1)[clear])
    assert torch.equal(q.dequantize(indices), zhat)


def test_fewer_than_eight_rows_works():  # the reference crashes below 8 rows
    q = GaussianQuantizer(codebook_size=256, group=16)
    mu, logvar = _posterior((1, 16, 1, 1))
    indices, zhat = q.quantize(mu, logvar)
    assert indices.shape == (1, 1, 1, 1) and zhat.shape == (1, 16, 1, 1)


def test_logvar_is_clamped_like_reference():
    q = GaussianQuantizer(codebook_size=512, group=4)
    mu, _ = _posterior((1, 4, 3, 3))
    huge = torch.full_like(mu, 80.0)  # clamps to 20: sigma huge, so beta=1 picks the largest-norm codeword
    a, _ = q.quantize(mu, huge)
    b, _ = q.quantize(mu, torch.full_like(mu, 20.0))
    assert torch.equal(a, b)
    tiny_a, _ = q.quantize(mu, torch.full_like(mu, -90.0))
    tiny_b, _ = q.quantize(mu, torch.full_like(mu, -30.0))
    assert torch.equal(tiny_a, tiny_b)


def test_real_codebook_with_trained_like_posteriors():
    q = GaussianQuantizer(codebook_size=65536, group=16)
    assert q.fingerprint == "effbb50723ff7d93"
    mu, logvar = _posterior((1, 16, 8, 8), seed=11)  # 64 rows against the full 2^16 codebook
    indices, _ = q.quantize(mu, logvar)
    rows_mu, rows_lv = to_groups(mu, 16).reshape(-1, 16), to_groups(logvar, 16).reshape(-1, 16)
    best, clear = oracle_indices(rows_mu, rows_lv, q.codebook, 1.0)
    assert clear.all()
    assert torch.equal(indices.reshape(-1), best)


def test_codebook_is_not_in_state_dict_and_is_reference_codebook():
    q = GaussianQuantizer(codebook_size=1024, group=16)
    assert q.state_dict() == {}
    assert torch.equal(q.codebook, gaussian_codebook(1024, 16, 42))


@pytest.mark.parametrize("make,err", [
    (lambda: (torch.zeros(1, 16, 2, 2), torch.zeros(1, 16, 2, 3)), ValueError),       # shape mismatch
    (lambda: (torch.zeros(16, 2), torch.zeros(16, 2)), ValueError),                   # rank 2
    (lambda: (torch.zeros(1, 12, 2, 2), torch.zeros(1, 12, 2, 2)), ValueError),       # not divisible by group
    (lambda: (torch.zeros(1, 16, 2, 2, dtype=torch.int64),) * 2, TypeError),          # integer dtype
    (lambda: (torch.full((1, 16, 2, 2), float("nan")), torch.zeros(1, 16, 2, 2)), ValueError),
    (lambda: (torch.zeros(1, 16, 2, 2), torch.full((1, 16, 2, 2), float("nan"))), ValueError),
])
def test_bad_inputs_raise_clear_errors(make, err):
    q = GaussianQuantizer(codebook_size=64, group=16)
    with pytest.raises(err):
        q.quantize(*make())


def test_dequantize_rejects_bad_indices():
    q = GaussianQuantizer(codebook_size=64, group=16)
    with pytest.raises(ValueError, match="out of range"):
        q.dequantize(torch.full((1, 1, 2, 2), 64))
    with pytest.raises(TypeError):
        q.dequantize(torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError):
        q.dequantize(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        GaussianQuantizer(codebook_size=64, group=16, layout="diagonal")
