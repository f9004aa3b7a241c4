"""The fixed Gaussian codebook shared by every GQ model.

GQ never learns its codebook: encoder and decoder agree on K pseudo-random Gaussian vectors that both sides can
regenerate from (K, m, seed). The reference draws them as a *scrambled Sobol* sequence mapped through the inverse normal
CDF in float64 and stored as float32; i.i.d. ``randn`` would give a different table and make an official checkpoint's
tokens meaningless. The table is not stored in reference checkpoints, so it must be regenerated bit-exactly; its
fingerprint (sha256 of the float32 bytes) travels with every bundle and token shard so a mismatch is caught early.
"""
from __future__ import annotations

import functools
import hashlib

import torch

__all__ = ["gaussian_codebook", "codebook_fingerprint", "bits_per_index"]

# SobolEngine supports at most this many dimensions.
_MAX_SOBOL_DIM = 21201


@functools.lru_cache(maxsize=16)
def _cached_codebook(codebook_size: int, dim: int, seed: int) -> torch.Tensor:
    engine = torch.quasirandom.SobolEngine(dimension=dim, scramble=True, seed=seed)
    uniforms = engine.draw(codebook_size)  # float32 in (0, 1), exactly as the reference draws them
    # float64 inverse normal CDF, then float32: bit-identical to scipy.stats.norm.ppf on the same uniforms.
    table = torch.special.ndtri(uniforms.double()).float().contiguous()
    table.requires_grad_(False)
    return table


def gaussian_codebook(codebook_size: int, dim: int, seed: int = 42) -> torch.Tensor:
    """Return the GQ codebook: float32 ``[codebook_size, dim]``, bit-identical to the reference's ``prior_samples``.

    A fresh tensor is returned each call (the cached master copy is never handed out, so callers may mutate theirs).
    """
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 1:
        raise ValueError(f"codebook_size must be a positive int, got {codebook_size!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= _MAX_SOBOL_DIM:
        raise ValueError(f"codebook dim must be an int in [1, {_MAX_SOBOL_DIM}], got {dim!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return _cached_codebook(codebook_size, dim, seed).clone()


def codebook_fingerprint(codebook: torch.Tensor) -> str:
    """First 16 hex digits of sha256 over the float32 bytes of ``codebook`` (the reference doc's fingerprint)."""
    data = codebook.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def bits_per_index(codebook_size: int) -> int:
    """floor(log2 K): the reference's TDC target in bits (exact for powers of two, floored otherwise)."""
    return int(codebook_size).bit_length() - 1
