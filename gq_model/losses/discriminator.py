"""PatchGAN discriminator with ActNorm, the hinge loss and the adaptive GAN weight (the reference's recipe, §4.1).

ActNorm is data-initialized (per-channel loc = -mean, scale = 1/std of its input). The reference does that lazily on
each rank's first forward, after DDP's parameter broadcast, so ranks start from different loc/scale (§9.10). Here the
initialization is an explicit call, :meth:`NLayerDiscriminator.init_actnorm`, which a trainer runs on the *same* batch
on every rank before the model is wrapped for data parallelism; forward only falls back to lazy initialization when
nobody did that, with a warning.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ActNorm", "NLayerDiscriminator", "hinge_d_loss", "vanilla_d_loss", "adaptive_weight"]


class ActNorm(nn.Module):
    """``scale * (x + loc)`` per channel; ``initialized`` (uint8 buffer) records whether data-init ran."""

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> None:
        flat = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1)
        mean, std = flat.mean(dim=1), flat.std(dim=1)
        self.loc.data.copy_((-mean).view_as(self.loc).to(self.loc.dtype))
        self.scale.data.copy_((1.0 / (std + 1e-6)).view_as(self.scale).to(self.scale.dtype))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and int(self.initialized) == 0:
            warnings.warn("ActNorm initialized lazily from this rank's batch; call init_actnorm() on a shared batch "
                          "first so every rank starts identical", RuntimeWarning, stacklevel=2)
            self.data_init(x)
        return self.scale * (x + self.loc)


def _weights_init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)


class NLayerDiscriminator(nn.Module):
    """pix2pix PatchGAN: ``n_layers`` stride-2 4x4 convs (the first without norm), one stride-1 conv, a 1-channel
    stride-1 conv. ``ndf=160, n_layers=6, use_actnorm=True`` is the reference's 95,892,961-parameter model.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = True):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm has its own bias
        kw, pad = 4, 1
        seq: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kw, stride=2, padding=pad), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=2, padding=pad, bias=use_bias), norm(ndf * mult),
                    nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=1, padding=pad, bias=use_bias), norm(ndf * mult),
                nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=pad)]
        self.main = nn.Sequential(*seq)
        self.apply(_weights_init)

    def actnorms(self) -> list[ActNorm]:
        return [m for m in self.modules() if isinstance(m, ActNorm)]

    @property
    def actnorm_initialized(self) -> bool:
        return all(int(m.initialized) == 1 for m in self.actnorms())

    @torch.no_grad()
    def init_actnorm(self, x: torch.Tensor) -> None:
        """Data-initialize every ActNorm from batch ``x`` (run the same ``x`` on all ranks for identical results)."""
        h = x
        for layer in self.main:
            if isinstance(layer, ActNorm):
                layer.data_init(h)
            h = layer(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_weight(nll_grad_norm: torch.Tensor | float, other_grad_norm: torch.Tensor | float, scale: float,
                    max_value: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """``clamp(|grad nll| / (|grad other| + eps), 0, max_value) * scale``, detached (the VQGAN balancing rule)."""
    a = torch.as_tensor(nll_grad_norm, dtype=torch.float32)
    b = torch.as_tensor(other_grad_norm, dtype=torch.float32)
    return (torch.clamp(a / (b + eps), 0.0, max_value) * scale).detach()
