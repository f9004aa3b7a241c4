import pytest
import torch

from gq_model import codebook_fingerprint, gaussian_codebook
from gq_model.codebook import bits_per_index
from kernels import prepare_features

# sha256[:16] of the reference's float32 prior_samples (gq-reference.md §1.2).
REFERENCE_FINGERPRINTS = {
    (65536, 16, 42): "effbb50723ff7d93",
    (65536, 8, 42): "e8a016842c323b79",
    (65536, 4, 42): "984ac78517a6dfa0",
    (1024, 16, 42): "e24915c3b42d625f",
}


@pytest.mark.parametrize("key", sorted(REFERENCE_FINGERPRINTS))
def test_codebook_is_bit_identical_to_reference(key):
    k, m, seed = key
    cb = gaussian_codebook(k, m, seed=seed)
    assert cb.dtype == torch.float32 and cb.shape == (k, m)
    assert codebook_fingerprint(cb) == REFERENCE_FINGERPRINTS[key]


def test_codebook_statistics_and_first_row():
    cb = gaussian_codebook(65536, 16, seed=42)
    expected_row0 = torch.tensor([2.808758, -1.257058, 0.926777, -0.203346, 0.071053])
    assert torch.allclose(cb[0, :5], expected_row0, atol=1e-6)
    assert torch.isfinite(cb).all()
    assert abs(cb.std().item() - 1.0) < 1e-3
    assert torch.unique(cb, dim=0).shape[0] == 65536  # all rows distinct
    assert -4.68 < cb.min().item() < -4.66 and 4.66 < cb.max().item() < 4.68


def test_codebook_matches_scipy_ppf_path():
    scipy_stats = pytest.importorskip("scipy.stats")
    u = torch.quasirandom.SobolEngine(8, scramble=True, seed=7).draw(512)
    expected = torch.from_numpy(scipy_stats.norm.ppf(u.numpy().astype("float64"))).float()
    assert torch.equal(gaussian_codebook(512, 8, seed=7), expected)


def test_seed_changes_codebook_and_copies_are_independent():
    a = gaussian_codebook(256, 4, seed=1)
    b = gaussian_codebook(256, 4, seed=2)
    assert not torch.equal(a, b)
    a.zero_()
    assert not torch.equal(gaussian_codebook(256, 4, seed=1), a)  # the cache was not mutated


@pytest.mark.parametrize("bad", [(0, 4), (-1, 4), (16, 0), (16, 30000), (2.5, 4)])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        gaussian_codebook(*bad)


def test_features_and_bits():
    cb = gaussian_codebook(64, 4)
    f = prepare_features(cb)
    assert f.shape == (64, 8) and torch.equal(f[:, 4:], cb * cb)
    assert bits_per_index(65536) == 16 and bits_per_index(1000) == 9 and bits_per_index(2) == 1
