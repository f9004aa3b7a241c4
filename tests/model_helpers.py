"""Model-side helpers the tests share: the small reference checkpoint (its YAML and a Lightning ``.ckpt`` writer), a
pickle that runs code when loaded, LPIPS weight files, a stand-in feature model, and a token comparison.

Unlike ``tests/helpers.py`` this module imports torch (the stand-in is an ``nn.Module``), so only model tests import it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gq_model import GQModel


SMALL_REFERENCE_YAML = """
model:
  base_learning_rate: 1.0e-4
  target: pit.models.autoencoder.AutoencodingEngine
  params:
    input_key: img
    regularizer_config:
      target: pit.quantization.gaussian.GaussianQuantRegularizer
      params: {format: bchw, group: 8, n_samples: 1024, backend: cuda}
    encoder_config:
      target: pit.modules.unet.Encoder
      params:
        attn_type: vanilla
        double_z: true
        z_channels: 16
        resolution: 32
        in_channels: 3
        out_ch: 3
        ch: 32
        ch_mult: [1, 2, 2, 2]
        num_res_blocks: 1
        attn_resolutions: [8]
        dropout: 0.0
    decoder_config:
      target: pit.modules.unet.Decoder
      params: ${model.params.encoder_config.params}
"""


def write_lightning_checkpoint(model: GQModel, path: Path, extra_keys=None):
    """Save ``model`` as the reference code's PyTorch Lightning checkpoint would: its weights among loss and
    discriminator weights, plus ``extra_keys``."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["loss.logvar"] = torch.zeros(())
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    state["loss.discriminator.main.3.initialized"] = torch.tensor(1, dtype=torch.uint8)
    state.update(extra_keys or {})
    torch.save({"epoch": 3, "global_step": 12345, "pytorch-lightning_version": "2.2.2", "state_dict": state,
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}]}, path)


class WritesMarker:
    """Unpickling this runs ``exec``, which writes the marker file: what an attacker's checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def image_batch(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` random images in [-1, 1], shape (n, 3, size, size)."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def same_tokens(a: GQModel, b: GQModel, size: int = 32) -> bool:
    """Whether both models give equal tokens for the same random images."""
    x = image_batch(size=size)
    return torch.equal(a.tokenize(x), b.tokenize(x))


def write_lpips_files(folder, seed: int = 0) -> tuple[str, str]:
    """Random weights in the published formats: torchvision vgg16 state dict and LPIPS vgg.pth."""
    from gq_model.losses.lpips import LPIPS_CHANNELS, VGG16Features

    g = torch.Generator().manual_seed(seed)
    vgg = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in VGG16Features().state_dict().items()}
    vgg["classifier.6.weight"] = torch.zeros(10, 4)  # torchvision files carry the classifier too: ignored
    vgg["classifier.6.bias"] = torch.zeros(10)
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(LPIPS_CHANNELS)}
    vgg_path, lin_path = str(folder / "vgg16-397923af.pth"), str(folder / "vgg.pth")
    torch.save(vgg, vgg_path)
    torch.save(lin, lin_path)
    return vgg_path, lin_path


class StandInFeatureModel(nn.Module):
    """A random-weight stand-in for a frozen vision foundation model: patch tokens plus a CLS token."""

    def __init__(self, dim: int = 24, patch: int = 8):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1)
