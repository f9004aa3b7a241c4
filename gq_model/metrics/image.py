"""Per-image PSNR and SSIM on the [0, 255] scale, matching the reference eval's definitions.

Both take images in [-1, 1] (the model's range) and map them with ``(x + 1) * 127.5``, no rounding; ``clamp=True``
first clips to [-1, 1] (what a saved image would hold), ``clamp=False`` is the reference's unclamped number.
SSIM is the Wang et al. (2004) index with an 11-tap Gaussian window (sigma 1.5), K1=0.01, K2=0.03, data_range 255,
computed only where the window fits ("valid"), averaged over pixels then channels, i.e. what ``pytorch_msssim.ssim``
and ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` report.
SSIM is computed in float64: the E[x^2] - E[x]^2 variance form loses ~1e-4 relative precision in float32 at 255 scale.

MS-SSIM follows ``pytorch_msssim.ms_ssim`` (the reference eval's, with ``data_range=255``): 5 scales with Wang et al.'s
(2003) weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333); at each of the first four scales the mean contrast-structure
term ``cs`` of the same valid-mode 11/1.5 Gaussian SSIM, at the last the full SSIM; negative values are set to 0
(``relu``) before the weighted geometric mean, per image and channel, then averaged over channels; between scales
``avg_pool2d(kernel 2, stride 2, padding = side % 2)`` with zero padding counted (PyTorch's default). The reference eval
reports it only for H, W >= 256 (NaN otherwise), so :func:`ms_ssim` refuses smaller images (:data:`MS_SSIM_MIN_SIZE`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["to_255", "psnr", "ssim", "ms_ssim", "gaussian_window", "MS_SSIM_WEIGHTS", "MS_SSIM_MIN_SIZE"]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_MIN_SIZE = 256  # the reference eval's condition; 5 scales of an 11-tap window need > 160 px
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


def _ssim_cs(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, c1: float, c2: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(SSIM, contrast-structure term), each the mean over the valid region, per image and channel ``[B, C]``."""
    mu_a, mu_b = _blur(a, g), _blur(b, g)
    var_a = _blur(a * a, g) - mu_a ** 2
    var_b = _blur(b * b, g) - mu_b ** 2
    cov = _blur(a * b, g) - mu_a * mu_b
    luminance = (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)
    contrast_structure = (2 * cov + c2) / (var_a + var_b + c2)
    return (luminance * contrast_structure).flatten(2).mean(-1), contrast_structure.flatten(2).mean(-1)


def ssim(x: torch.Tensor, y: torch.Tensor, clamp: bool = True, win_size: int = 11, sigma: float = 1.5,
         data_range: float = 255.0, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM ``[B]`` of ``y`` against ``x`` (both [B,C,H,W] in [-1, 1]); H and W must be >= ``win_size``."""
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got {tuple(x.shape[-2:])}")
    a, b = to_255(x, clamp), to_255(y, clamp)
    g = gaussian_window(win_size, sigma).to(a.device)
    return _ssim_cs(a, b, g, (k1 * data_range) ** 2, (k2 * data_range) ** 2)[0].mean(1)


def ms_ssim(x: torch.Tensor, y: torch.Tensor, clamp: bool = True, weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
            win_size: int = 11, sigma: float = 1.5, data_range: float = 255.0, k1: float = 0.01, k2: float = 0.03,
            min_size: int = MS_SSIM_MIN_SIZE) -> torch.Tensor:
    """Per-image MS-SSIM ``[B]`` of ``y`` against ``x`` (both [B,C,H,W] in [-1, 1]), ``pytorch_msssim``'s convention
    (module doc). ``ValueError`` when H or W is below ``min_size`` (the reference reports NaN there); with a single
    weight it is SSIM with negative values set to 0."""
    if min(x.shape[-2:]) < min_size:
        raise ValueError(f"MS-SSIM is reported for images of at least {min_size}x{min_size} (as the reference eval "
                         f"does), got {tuple(x.shape[-2:])}")
    if min(x.shape[-2:]) <= (win_size - 1) * 2 ** (len(weights) - 1):  # pytorch_msssim's own condition
        raise ValueError(f"{len(weights)} MS-SSIM scales of a {win_size}-tap window need more than "
                         f"{(win_size - 1) * 2 ** (len(weights) - 1)} px, got {tuple(x.shape[-2:])}")
    a, b = to_255(x, clamp), to_255(y, clamp)
    g = gaussian_window(win_size, sigma).to(a.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    w = torch.tensor(weights, dtype=torch.float64, device=a.device)
    terms = []
    for level in range(len(weights)):
        full, cs = _ssim_cs(a, b, g, c1, c2)
        if level < len(weights) - 1:
            terms.append(cs.clamp_min(0.0))
            pad = [s % 2 for s in a.shape[-2:]]
            a, b = F.avg_pool2d(a, 2, padding=pad), F.avg_pool2d(b, 2, padding=pad)
    terms.append(full.clamp_min(0.0))
    per_channel = torch.prod(torch.stack(terms) ** w.view(-1, 1, 1), dim=0)  # [B, C]
    return per_channel.mean(1)
