"""Fréchet distance between Gaussians fitted to feature sets (FID), with mergeable running statistics.

FID = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}). pytorch-fid evaluates the last term with
``scipy.linalg.sqrtm`` of the non-symmetric product; here it is computed as the sum of square roots of the eigenvalues
of the *symmetric* PSD matrix S1^{1/2} S2 S1^{1/2} (same eigenvalues as S1 S2), in float64 with torch's ``eigh``
(several times faster than numpy's OpenBLAS one at 2048x2048 here). That is exact in exact arithmetic, needs no scipy,
never produces the complex parts sqrtm warns about, and stays defined when the covariances are singular (fewer images
than 2048 features).

Statistics are kept as float64 sums (n, sum x, sum x x^T) so that shards from Ray workers or torchrun ranks merge by
plain addition; the covariance is the unbiased one (``np.cov(rowvar=False)``), as pytorch-fid uses.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["frechet_distance", "FrechetReference", "FeatureStats"]


def _clip_eigenvalues(w: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with round-off noise removed: below dim * eps * max they are zero. Without this
    the square roots of ~1e-14 noise (rank-deficient covariances) would add ~1e-7 each to the trace."""
    tol = float(w.abs().max()) * w.numel() * torch.finfo(torch.float64).eps if w.numel() else 0.0
    return torch.where(w > tol, w, torch.zeros_like(w))


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((m + m.T) / 2.0)
    return (v * torch.sqrt(_clip_eigenvalues(w))) @ v.T


def _as64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, np.float64))


def _check(mu: torch.Tensor, sigma: torch.Tensor) -> None:
    if tuple(sigma.shape) != (mu.numel(), mu.numel()):
        raise ValueError(f"shape mismatch: mu {tuple(mu.shape)}, sigma {tuple(sigma.shape)}")


class FrechetReference:
    """One side's Gaussian, with S^{1/2} computed once: rFID compares several reconstruction sets with the same
    originals, and the 2048x2048 eigendecomposition is the expensive step."""

    def __init__(self, mu, sigma):
        self.mu, self.sigma = _as64(mu).reshape(-1), torch.atleast_2d(_as64(sigma))
        _check(self.mu, self.sigma)
        self.root = _psd_sqrt(self.sigma)

    def distance(self, mu, sigma) -> float:
        """Fréchet distance from this Gaussian to N(mu, sigma)."""
        mu, sigma = _as64(mu).reshape(-1), torch.atleast_2d(_as64(sigma))
        _check(mu, sigma)
        if mu.shape != self.mu.shape:
            raise ValueError(f"shape mismatch: mu {tuple(self.mu.shape)} vs {tuple(mu.shape)}")
        middle = self.root @ sigma @ self.root
        tr_covmean = float(torch.sqrt(_clip_eigenvalues(torch.linalg.eigvalsh((middle + middle.T) / 2.0))).sum())
        diff = self.mu - mu
        return float(diff @ diff + torch.trace(self.sigma) + torch.trace(sigma) - 2.0 * tr_covmean)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (array-likes; computed in float64)."""
    return FrechetReference(mu1, sigma1).distance(mu2, sigma2)


class FeatureStats:
    """Running (n, sum, sum of outer products) of feature vectors, float64."""

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.n = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def add(self, feats: torch.Tensor) -> None:
        f = feats.detach().to("cpu", torch.float64).reshape(-1, self.dim)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.n}")
        mean = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return mean.numpy(), cov.numpy()

    # --- merge support (the evaluator packs these into its state dict)
    def state(self) -> dict[str, torch.Tensor]:
        return {"n": torch.tensor([float(self.n)], dtype=torch.float64), "sum": self.sum, "outer": self.outer}

    def load(self, state: dict[str, torch.Tensor]) -> "FeatureStats":
        self.n = int(round(float(state["n"][0])))
        self.sum = state["sum"].to(torch.float64).clone()
        self.outer = state["outer"].to(torch.float64).clone()
        return self
