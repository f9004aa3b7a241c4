"""LPIPS with the AlexNet backbone (``lpips.LPIPS(net="alex")``, version 0.1), the variant the reference eval reports.

Why our own: the ``lpips`` package needs torchvision and downloads the ImageNet backbone at construction; neither works
here. This module rebuilds the documented metric from two files, given as a directory (``gq eval --lpips-weights``) or
resolved by :mod:`gq_model.weights` (gq's cache, an installed lpips package for the heads, a verified download;
``gq weights fetch lpips-alex`` pre-fetches them):

* torchvision's AlexNet state dict (``alexnet-owt-7be5be79.pth``): only ``features.{0,3,6,8,10}.*`` are used,
  ``classifier.*`` is accepted and ignored; the five ReLU outputs (64, 192, 384, 256, 256 channels) are the taps;
* the LPIPS linear heads (``alex.pth`` from the lpips package, keys ``lin{0..4}.model.1.weight`` ``[1, C, 1, 1]``).

Metric (Zhang et al. 2018): inputs in [-1, 1] are shifted/scaled by the fixed ScalingLayer constants, each tap is
unit-normalized over channels (eps 1e-10), the squared difference is weighted per channel by the non-negative head,
averaged over space and summed over the five taps. The module is pinned to eval mode, so the heads' dropout is off.

The linear heads, the channel normalization and the weight-file reader are the training LPIPS's
(``gq_model.losses.lpips``, VGG variant); only the AlexNet feature stack is added here.
"""
from __future__ import annotations

import posixpath

import fsspec
import torch
from torch import nn

from gq_model.losses.lpips import LinearHead, load_resolved, unit_normalize
from gq_model.weights import Resolved, resolve_group

__all__ = ["AlexNetFeatures", "LPIPSAlex", "load_lpips_alex", "build_lpips_alex", "ALEX_CHANNELS",
           "find_lpips_files", "EVAL_WAYS_OUT"]

EVAL_WAYS_OUT = ("or point gq eval at a directory holding alexnet*.pth and alex.pth: --lpips-weights DIR;",
                 "or skip LPIPS on purpose: --no-lpips")

ALEX_CHANNELS = (64, 192, 384, 256, 256)
# The ScalingLayer constants of LPIPS: ImageNet mean/std expressed for inputs in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class AlexNetFeatures(nn.Module):
    """torchvision's ``alexnet().features`` with identical indices, returning the five ReLU outputs."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),      # 0, 1  -> tap 1
            nn.MaxPool2d(kernel_size=3, stride=2),                                 # 2
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),               # 3, 4  -> tap 2
            nn.MaxPool2d(kernel_size=3, stride=2),                                 # 5
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),              # 6, 7  -> tap 3
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),              # 8, 9  -> tap 4
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),              # 10, 11 -> tap 5
        )
        self._taps = (1, 4, 7, 9, 11)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._taps:
                out.append(x)
        return out


class LPIPSAlex(nn.Module):
    """LPIPS distance per image: ``forward(x, y)`` with both in [-1, 1] -> ``[B]``."""

    def __init__(self):
        super().__init__()
        self.net = AlexNetFeatures()
        for i, c in enumerate(ALEX_CHANNELS):  # keys lin{i}.model.1.weight, as in alex.pth
            setattr(self, f"lin{i}", LinearHead(c))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = 0.0
        for i, (a, b) in enumerate(zip(fx, fy)):
            d = (unit_normalize(a) - unit_normalize(b)) ** 2
            total = total + getattr(self, f"lin{i}")(d).mean(dim=(2, 3))
        return total.view(-1)

    def train(self, mode: bool = True) -> "LPIPSAlex":  # a fixed metric: the heads' dropout must never be active
        return super().train(False)


def find_lpips_files(directory: str) -> tuple[str, str]:
    """(AlexNet backbone URL, ``alex.pth`` URL) inside a local or fsspec ``directory``; FileNotFoundError naming
    what is missing. The backbone is the first ``alexnet*.pth`` in sorted order."""
    fs, root = fsspec.core.url_to_fs(str(directory))
    heads = posixpath.join(root, "alex.pth")
    if not fs.isfile(heads) and fs.isfile(posixpath.join(root, "lpips-v0.1-alex.pth")):  # gq's cache names it so
        heads = posixpath.join(root, "lpips-v0.1-alex.pth")
    backbones = sorted(fs.glob(posixpath.join(root, "alexnet*.pth")))
    missing = []
    if not fs.isfile(heads):
        missing.append("alex.pth (LPIPS v0.1 linear heads)")
    if not backbones:
        missing.append("alexnet*.pth (torchvision AlexNet state dict, e.g. alexnet-owt-7be5be79.pth)")
    if missing:
        raise FileNotFoundError(f"{directory}: missing " + " and ".join(missing))
    return fs.unstrip_protocol(backbones[0]), fs.unstrip_protocol(heads)


def load_lpips_alex(directory: str) -> tuple[LPIPSAlex, dict]:
    """LPIPS-Alex from a directory holding ``alexnet*.pth`` and ``alex.pth``; both loaded strictly (CPU). Files that
    are not the published ones load with a warning (their LPIPS is not comparable with published numbers)."""
    backbone_path, heads_path = find_lpips_files(directory)
    return _load(Resolved("alexnet", backbone_path, "explicit"), Resolved("lpips-alex-heads", heads_path, "explicit"))


def build_lpips_alex(directory: str | None = None, **resolve_kw) -> tuple[LPIPSAlex, dict]:
    """LPIPS-Alex from ``directory`` when given, else from gq's weight resolution (cache -> installed lpips package
    -> verified download); :class:`gq_model.weights.WeightsUnavailable` with the ways out when they cannot be had."""
    if directory:
        return load_lpips_alex(directory)
    resolve_kw.setdefault("ways_out", EVAL_WAYS_OUT)
    resolve_kw.setdefault("purpose", "gq eval's LPIPS")
    files = resolve_group("lpips-alex", **resolve_kw)
    return _load(files["alexnet"], files["lpips-alex-heads"])


def _load(backbone_file: Resolved, heads_file: Resolved) -> tuple[LPIPSAlex, dict]:
    backbone_path, heads_path = backbone_file.path, heads_file.path
    backbone = load_resolved(backbone_file)
    heads = load_resolved(heads_file)
    other = sorted(k for k in backbone if not k.startswith(("features.", "classifier.")))
    if other:
        raise ValueError(f"{backbone_path}: unexpected keys for a torchvision AlexNet: {other[:5]}")
    model = LPIPSAlex()
    heads_only = {k: v for k, v in model.state_dict().items() if k.startswith("lin")}
    if set(heads) != set(heads_only):
        raise ValueError(f"{heads_path}: expected LPIPS alex.pth keys {sorted(heads_only)}, got {sorted(heads)[:6]}")
    model.load_state_dict({**{f"net.{k}": v for k, v in backbone.items() if k.startswith("features.")}, **heads},
                          strict=True)
    return model.eval().requires_grad_(False), {"backbone": backbone_path, "heads": heads_path,
                                                "sources": [backbone_file.source, heads_file.source]}
