"""LPIPS (VGG16 variant) in plain torch, with the published weight files resolved by :mod:`gq_model.weights`.

Two files are needed, exactly as published (each from an explicit path, else gq's cache, else (the heads) an installed
``lpips`` package, else a verified download; ``gq weights fetch lpips-vgg`` pre-fetches them):

* torchvision's ``vgg16`` ImageNet state dict (``vgg16-397923af.pth``): keys ``features.{0,2,5,...,28}.{weight,bias}``
  (``classifier.*`` is ignored);
* the LPIPS v0.1 linear heads ``vgg.pth`` (from the ``lpips`` package or the taming copy): keys
  ``lin0.model.1.weight`` .. ``lin4.model.1.weight`` of shape ``[1, C, 1, 1]``.

The distance is the usual one: inputs in [-1, 1] are shifted/scaled, the five relu{1_2,2_2,3_3,4_3,5_3} activations are
unit-normalized over channels, their squared difference is weighted per channel by the linear heads, averaged over
space and summed over layers, giving ``[B, 1, 1, 1]``. The module is frozen and pinned to eval mode (``train()`` is a
no-op), so the heads' dropout is never active (the reference's rank-0 image logger switched it on: gq-reference.md §4.1).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from gq_model.weights import FILES, Resolved, WeightsUnavailable, check_explicit_digest, resolve_group

__all__ = ["VGG16Features", "LPIPS", "LinearHead", "unit_normalize", "build_lpips", "resolve_lpips_files",
           "load_resolved", "load_state_dict_file", "WeightsUnavailable"]

log = logging.getLogger(__name__)

# torchvision vgg16 "D" configuration: conv widths, "M" = max-pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# Slice ends (exclusive indices into ``features``) after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_SLICE_ENDS = (4, 9, 16, 23, 30)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def load_state_dict_file(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """A tensor state dict from a local path or fsspec URL, read with ``weights_only=True`` (no arbitrary pickle)."""
    return _load_with_digest(url, storage_options)[0]


def _load_with_digest(url: str,
                      storage_options: Mapping[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256 of the file's bytes), from one read."""
    import fsspec

    from gq_model.storage import options_for

    with fsspec.open(os.fspath(url), "rb", **options_for(url, storage_options)) as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{url}: expected a state dict, got {type(sd).__name__}")
    return sd, digest


class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features`` with the same module indices (so its state-dict keys load as is)."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                c_in = int(v)
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs, start = [], 0
        for end in _SLICE_ENDS:
            for i in range(start, end):
                x = self.features[i](x)
            outs.append(x)
            start = end
        return outs


class LinearHead(nn.Module):
    """``model = Sequential(Dropout, Conv1x1(C -> 1, bias=False))``: the LPIPS ``NetLinLayer`` key layout."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, stride=1, padding=0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Scale every feature vector (dim 1) to unit length, as LPIPS does before comparing (shared by VGG and AlexNet)."""
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """Perceptual distance ``[B,1,1,1]`` between two image batches in [-1, 1]. Frozen and always in eval mode."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        for k, c in enumerate(LPIPS_CHANNELS):
            setattr(self, f"lin{k}", LinearHead(c))
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "LPIPS":  # pinned: LPIPS is a fixed metric, never trained
        return super().train(False)

    def load_weights(self, vgg_state: Mapping[str, torch.Tensor], lin_state: Mapping[str, torch.Tensor]) -> None:
        """Load torchvision ``vgg16`` weights (``features.*``) and LPIPS heads (``lin{k}.model.1.weight``), strictly."""
        feats = {k: v for k, v in vgg_state.items() if k.startswith("features.")}
        missing, unexpected = self.net.load_state_dict(feats, strict=False)
        if missing or unexpected:
            raise ValueError(f"not a torchvision vgg16 state dict: missing {missing[:4]}, unexpected {unexpected[:4]}")
        lin = {k: v for k, v in lin_state.items() if k.startswith("lin")}
        expected = {f"lin{k}.model.1.weight" for k in range(len(LPIPS_CHANNELS))}
        if set(lin) != expected:
            raise ValueError(f"not an LPIPS vgg.pth: expected keys {sorted(expected)}, got {sorted(lin)[:6]}")
        for k in range(len(LPIPS_CHANNELS)):
            getattr(self, f"lin{k}").load_state_dict({"model.1.weight": lin[f"lin{k}.model.1.weight"]}, strict=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS(x, y) per image, ``[B,1,1,1]``; differentiable in both inputs."""
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = None
        for k, (a, b) in enumerate(zip(fx, fy)):
            d = (unit_normalize(a) - unit_normalize(b)) ** 2
            v = getattr(self, f"lin{k}")(d).mean(dim=(2, 3), keepdim=True)
            total = v if total is None else total + v
        return total


TRAINING_WAYS_OUT = (
    "or give the files explicitly: loss.lpips.vgg_path=<vgg16-397923af.pth> loss.lpips.lin_path=<vgg.pth>;",
    "or train without the perceptual loss, on purpose: loss.perceptual_weight=0",
)


def resolve_lpips_files(vgg_path: str | None = None, lin_path: str | None = None,
                        storage_options: Mapping[str, Any] | None = None, *, purpose: str | None = None,
                        ways_out: Sequence[str] = TRAINING_WAYS_OUT, **resolve_kw) -> dict[str, Resolved]:
    """The two LPIPS-VGG files (keys ``vgg16`` and ``lpips-vgg-heads``), each from its explicit path or else the
    cache / installed lpips package / a verified download (:mod:`gq_model.weights`); :class:`WeightsUnavailable`
    naming the files, URLs, hashes and ways out when they cannot be had. Cheap when they are cached: call it before
    building anything expensive."""
    return resolve_group("lpips-vgg", {"vgg16": vgg_path, "lpips-vgg-heads": lin_path}, purpose=purpose,
                         ways_out=ways_out, storage_options=storage_options, **resolve_kw)


def load_resolved(r: Resolved, storage_options: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a resolved weight file. An explicit file is hashed as it is read and compared with the
    published digest (a warning when it differs); the other sources were verified when they were resolved."""
    if r.source != "explicit":
        return load_state_dict_file(r.path)
    sd, digest = _load_with_digest(r.path, storage_options)
    check_explicit_digest(FILES[r.key], r.path, digest)
    return sd


def build_lpips(vgg_path: str | None = None, lin_path: str | None = None,
                storage_options: Mapping[str, Any] | None = None, *,
                resolved: Mapping[str, Resolved] | None = None, **resolve_kw) -> LPIPS:
    """An LPIPS-VGG with the published weights, frozen. Never ``None``: weights that cannot be found or fetched
    raise :class:`WeightsUnavailable` (the perceptual term is never silently dropped).

    ``vgg_path`` / ``lin_path``: explicit files (local or fsspec URLs); unset ones resolve through the cache, an
    installed lpips package, then a verified download. ``resolved``: the result of :func:`resolve_lpips_files`.
    """
    files = resolved if resolved is not None else resolve_lpips_files(vgg_path, lin_path, storage_options,
                                                                      **resolve_kw)
    for key, r in files.items():
        log.info("LPIPS %s: %s (%s%s)", key, r.path, r.source, ", verified" if r.verified else "")
    model = LPIPS()
    model.load_weights(load_resolved(files["vgg16"], storage_options),
                       load_resolved(files["lpips-vgg-heads"], storage_options))
    return model
