"""Per-image PSNR and SSIM on the [0, 255] scale, matching the reference eval's definitions.

Both take images in [-1, 1] (the model's range) and map them with ``(x + 1) * 127.5``, no rounding; ``clamp=True``
first clips to [-1, 1] (what a saved image would hold), ``clamp=False`` is the reference's unclamped number.
SSIM is the Wang et al. (2004) index with an 11-tap Gaussian window (sigma 1.5), K1=0.01, K2=0.03, data_range 255,
computed only where the window fits ("valid"), averaged over pixels then channels, i.e. what ``pytorch_msssim.ssim``
and ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` report.
SSIM is computed in float64: the E[x^2] - E[x]^2 variance form loses ~1e-4 relative precision in float32 at 255 scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["to_255", "psnr", "ssim", "gaussian_window"]

MSE_FLOOR = 1e-10  # identical images would give PSNR = inf; this caps it at ~148 dB so reports stay finite JSON


def to_255(x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """[-1, 1] -> [0, 255] (float, not rounded)."""
    if clamp:
        x = x.clamp(-1.0, 1.0)
    return (x.double() + 1.0) * 127.5


def psnr(x: torch.Tensor, y: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Per-image PSNR ``[B]`` in dB of reconstruction ``y`` against original ``x`` (both [B,C,H,W] in [-1, 1]).

    The original is clamped too (a no-op for real images), so the metric is symmetric.
    """
    a, b = to_255(x, clamp), to_255(y, clamp)
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(MSE_FLOOR)
    return 10.0 * torch.log10(255.0 ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalized 1-D Gaussian taps centred on the middle sample (float64)."""
    t = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(t ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable valid-mode Gaussian filter, per channel."""
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssim(x: torch.Tensor, y: torch.Tensor, clamp: bool = True, win_size: int = 11, sigma: float = 1.5,
         data_range: float = 255.0, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM ``[B]`` of ``y`` against ``x`` (both [B,C,H,W] in [-1, 1]); H and W must be >= ``win_size``."""
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got {tuple(x.shape[-2:])}")
    a, b = to_255(x, clamp), to_255(y, clamp)
    g = gaussian_window(win_size, sigma).to(a.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_a, mu_b = _blur(a, g), _blur(b, g)
    var_a = _blur(a * a, g) - mu_a ** 2
    var_b = _blur(b * b, g) - mu_b ** 2
    cov = _blur(a * b, g) - mu_a * mu_b
    luminance = (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)
    contrast_structure = (2 * cov + c2) / (var_a + var_b + c2)
    return (luminance * contrast_structure).flatten(2).mean(-1).mean(1)
