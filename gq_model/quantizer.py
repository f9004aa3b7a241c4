"""GaussianQuantizer: a trained Gaussian VAE's posterior turned into discrete tokens, with no training.

Each group of m latent channels (mu, sigma) picks the codeword of the fixed Gaussian codebook that maximizes
``sum_a log N(c_a; mu_a, sigma_a^2) - beta * log N(c_a; 0, 1)`` (the reference's inference rule; beta=1 gives the
codeword with the largest importance weight q(c|x)/p(c)). Channel-to-group layout follows the reference's v1 class:
*strided*, so group j of C = m*G channels holds channels {j, j+G, j+2G, ...}. The search itself lives in ``kernels``.
"""
from __future__ import annotations

import torch
from torch import nn

from gq_model.codebook import codebook_fingerprint, gaussian_codebook
from kernels import gq_search, prepare_features

__all__ = ["GaussianQuantizer", "to_groups", "from_groups", "check_moments", "straight_through"]

_LAYOUTS = ("strided", "contiguous")


def check_moments(mu: torch.Tensor, logvar: torch.Tensor, group: int) -> None:
    """Raise a ValueError naming the problem if (mu, logvar) are not a valid GQ posterior for groups of ``group``."""
    if not isinstance(mu, torch.Tensor) or not isinstance(logvar, torch.Tensor):
        raise TypeError("mu and logvar must be torch tensors")
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar shapes differ: {tuple(mu.shape)} vs {tuple(logvar.shape)}")
    if mu.dim() not in (3, 4):
        raise ValueError(f"expected 4-D [B,C,H,W] or 3-D [B,L,C] latents, got {mu.dim()}-D shape {tuple(mu.shape)}")
    if not (mu.is_floating_point() and logvar.is_floating_point()):
        raise TypeError(f"mu/logvar must be floating point, got {mu.dtype} and {logvar.dtype}")
    channels = mu.shape[1] if mu.dim() == 4 else mu.shape[2]
    if channels % group != 0:
        raise ValueError(f"{channels} latent channels are not divisible by the codebook group size {group}")
    if not bool(torch.isfinite(mu).all()):
        raise ValueError("mu contains NaN or Inf")
    if bool(torch.isnan(logvar).any()):
        raise ValueError("logvar contains NaN")


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> [B,H,W,C]; [B,L,C] unchanged."""
    return x.permute(0, 2, 3, 1) if x.dim() == 4 else x


def to_groups(x: torch.Tensor, group: int, layout: str = "strided") -> torch.Tensor:
    """Latent ``[B,C,H,W]`` or ``[B,L,C]`` -> rows ``[B,*spatial,G,m]`` in the reference's channel grouping."""
    x = _channels_last(x)
    g = x.shape[-1] // group
    if layout == "strided":  # channel a*G + j -> (group j, slot a)
        return x.reshape(*x.shape[:-1], group, g).transpose(-1, -2)
    return x.reshape(*x.shape[:-1], g, group)  # contiguous: channel j*m + a


def from_groups(rows: torch.Tensor, dim: int, layout: str = "strided") -> torch.Tensor:
    """Inverse of :func:`to_groups`: ``[B,*spatial,G,m]`` -> ``[B,C,H,W]`` (dim=4) or ``[B,L,C]`` (dim=3)."""
    if layout == "strided":
        rows = rows.transpose(-1, -2)
    x = rows.reshape(*rows.shape[:-2], rows.shape[-2] * rows.shape[-1])
    return x.permute(0, 3, 1, 2).contiguous() if dim == 4 else x.contiguous()


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized latent, as is. Backward: the incoming gradient goes to the sample unchanged."""

    @staticmethod
    def forward(ctx, sample: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(sample: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator of the reference's STE variant (``GaussianQuantRegularizer2``, ``use_ste``).

    The value is exactly ``quantized`` (the codewords the decoder will see at inference); the gradient with respect to
    ``sample`` (mu + sigma * eps) is the identity, so the encoder trains through mu and sigma as in a Gaussian VAE.
    The reference writes ``sample - sample.detach() + quantized``, which has the same gradient but whose value is
    ``quantized`` only up to float rounding; a custom autograd function makes it exact.
    """
    if sample.shape != quantized.shape:
        raise ValueError(f"sample and quantized shapes differ: {tuple(sample.shape)} vs {tuple(quantized.shape)}")
    return _StraightThrough.apply(sample, quantized.to(dtype=sample.dtype, device=sample.device))


class GaussianQuantizer(nn.Module):
    """Training-free vector quantizer for a Gaussian posterior (GQ).

    Args:
        codebook_size: K, the number of codewords (2^N in every reference config).
        group: m, channels quantized jointly by one index (the codeword dimension).
        seed: Sobol scrambling seed of the codebook (42 in the reference).
        beta: weight of the prior term in the score (1.0 in the reference).
        logvar_range: clamp applied to log sigma^2 before use (the reference's [-30, 20]).
        layout: "strided" (reference v1, used by every released model) or "contiguous" (its STE variant).
        backend: passed to :func:`kernels.gq_search` ("auto", "torch", "triton").
    """

    def __init__(self, codebook_size: int = 65536, group: int = 16, seed: int = 42, beta: float = 1.0,
                 logvar_range: tuple[float, float] = (-30.0, 20.0), layout: str = "strided", backend: str = "auto"):
        super().__init__()
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        lo, hi = (float(v) for v in logvar_range)
        if not lo < hi:
            raise ValueError(f"logvar_range must be (low, high) with low < high, got {logvar_range!r}")
        self.codebook_size, self.group, self.seed = int(codebook_size), int(group), int(seed)
        self.beta, self.logvar_range, self.layout, self.backend = float(beta), (lo, hi), layout, backend
        codebook = gaussian_codebook(self.codebook_size, self.group, self.seed)
        # Non-persistent like the reference: regenerated from (K, m, seed), never trusted from a weight file.
        self.register_buffer("codebook", codebook, persistent=False)
        self.register_buffer("features", prepare_features(codebook), persistent=False)
        self._fingerprint = codebook_fingerprint(codebook)

    @property
    def fingerprint(self) -> str:
        """sha256[:16] of the float32 codebook: identifies the token vocabulary."""
        return self._fingerprint

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, group={self.group}, seed={self.seed}, beta={self.beta}, "
                f"layout={self.layout!r}, fingerprint={self.fingerprint}")

    def clamp_logvar(self, logvar: torch.Tensor) -> torch.Tensor:
        return logvar.clamp(*self.logvar_range)

    @torch.no_grad()
    def quantize(self, mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (int64 ``[B,G,H,W]`` or ``[B,L,G]``) and the quantized latent (mu's shape) for a posterior."""
        check_moments(mu, logvar, self.group)
        mu32, lv32 = mu.float(), self.clamp_logvar(logvar.float())
        mu_rows = to_groups(mu32, self.group, self.layout)
        lv_rows = to_groups(lv32, self.group, self.layout)
        grid = mu_rows.shape[:-1]  # [B, *spatial, G]
        flat = gq_search(mu_rows.reshape(-1, self.group), lv_rows.reshape(-1, self.group),
                         self.features.to(mu.device), self.beta, backend=self.backend)
        idx = flat.reshape(grid)
        zhat = from_groups(self.codebook.to(mu.device)[idx], mu.dim(), self.layout).to(mu.dtype)
        indices = idx.permute(0, 3, 1, 2).contiguous() if mu.dim() == 4 else idx
        return indices, zhat

    def dequantize(self, indices: torch.Tensor) -> torch.Tensor:
        """Codewords for ``[B,G,H,W]`` (-> ``[B,G*m,H,W]``) or ``[B,L,G]`` (-> ``[B,L,G*m]``) int indices."""
        if not isinstance(indices, torch.Tensor):
            raise TypeError("indices must be a torch tensor")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.dim() not in (3, 4):
            raise ValueError(f"indices must be [B,G,H,W] or [B,L,G], got shape {tuple(indices.shape)}")
        idx = indices.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.codebook_size):
            raise ValueError(f"indices out of range [0, {self.codebook_size}): min {int(idx.min())}, "
                             f"max {int(idx.max())}")
        rows_idx = idx.permute(0, 2, 3, 1) if idx.dim() == 4 else idx  # [B,*spatial,G]
        rows = self.codebook.to(idx.device)[rows_idx]  # [B,*spatial,G,m]
        return from_groups(rows, idx.dim(), self.layout)

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize(mu, logvar)
