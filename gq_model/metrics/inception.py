"""The FID InceptionV3 (pool3, 2048-d) in plain torch, loading the standard ``pt_inception-2015-12-05-6726825d.pth``.

Why our own: torchvision (and with it pytorch-fid / torch-fidelity) cannot be installed next to the CPU torch used
here. The weight file is given explicitly (``gq eval --inception-weights``) or resolved by :mod:`gq_model.weights`
(gq's cache, else a download checked against the file name's SHA-256 prefix; ``gq weights fetch fid-inception``).
rFID is only comparable across papers if the *TF 2015-12-05 Inception graph* is
used, so this module reproduces the layout that file was published for: torchvision's ``Inception3`` module tree
(``num_classes=1008``, no auxiliary head) with the Mixed blocks swapped for the FID variants, which differ from the
torchvision ones only in pooling:

* Mixed_5b/5c/5d (A), Mixed_6b..6e (C), Mixed_7b (E_1): the pooling branch averages with ``count_include_pad=False``;
* Mixed_7c (E_2): the pooling branch uses a 3x3 *max* pool (what the TF graph does);
* every conv is ``conv`` (no bias) + ``bn`` (eps 1e-3) + ReLU, so keys read ``Mixed_5b.branch1x1.conv.weight``.

The state-dict keys therefore equal the published file's, and a user's downloaded copy loads with ``strict=True``.
Input: images in [-1, 1], resized bilinearly to 299x299 (``align_corners=False``) like pytorch-fid with
``resize_input=True, normalize_input=False``.
"""
from __future__ import annotations

import hashlib
import io
import posixpath
import warnings

import fsspec
import torch
import torch.nn.functional as F
from torch import nn

from gq_model.weights import FILES, resolve_group

__all__ = ["FIDInceptionV3", "load_fid_inception", "build_fid_inception", "FID_WEIGHTS_NAME",
           "FID_WEIGHTS_SHA256_PREFIX", "EVAL_WAYS_OUT"]

FID_WEIGHTS_NAME = FILES["fid-inception"].name
# torch.hub names weight files <name>-<first 8 hex digits of the file's sha256>.pth.
FID_WEIGHTS_SHA256_PREFIX = FILES["fid-inception"].sha256_prefix
EVAL_WAYS_OUT = (f"or give the file: --inception-weights {FID_WEIGHTS_NAME};", "or skip rFID on purpose: --no-fid")


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 0.001, as TF) -> ReLU; children named ``conv``/``bn`` like the weight file."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    # TF's AVG pool excludes the zero padding from the mean; torchvision's default would include it.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches (64 + 64 + 96 + pool_features channels)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35->17 reduction: strided 3x3, strided double 3x3 and a max pool (384 + 96 + cin channels)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorized 7x7 convolutions (4 x 192 channels)."""

    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """17->8 reduction (320 + 192 + cin channels)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 heads (320 + 768 + 768 + 192 = 2048 channels).

    ``pool="avg"`` is FIDInceptionE_1 (Mixed_7b), ``pool="max"`` is FIDInceptionE_2 (Mixed_7c).
    """

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 as used for FID: ``forward`` returns the 2048-d pool3 features ``[B, 2048]``.

    ``fc`` (1008 classes, the TF graph's) is kept only so that the published state dict loads strictly.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """pool3 features of images ``x`` [B,3,H,W] in [-1, 1] (resized bilinearly to 299 unless ``resize=False``)."""
        if resize:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def load_fid_inception(url: str) -> tuple[FIDInceptionV3, dict]:
    """Build the network and load the weight file at ``url`` (local path or fsspec URL; a directory means
    ``<dir>/pt_inception-2015-12-05-6726825d.pth``) strictly, on CPU, with ``weights_only=True``.

    Returns (model in eval mode, info). ``info["sha256"]`` is the file's digest and ``info["official"]`` whether it
    starts with the published prefix; a different file still loads (for tests and custom networks) but with a warning,
    because its FID values are not comparable with published ones.
    """
    fs, path = fsspec.core.url_to_fs(str(url))
    if fs.isdir(path):
        path = posixpath.join(path, FID_WEIGHTS_NAME)
    if not fs.isfile(path):
        raise FileNotFoundError(f"FID Inception weights not found: {url}")
    data = fs.cat_file(path)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{url} does not hold a state dict (got {type(state).__name__})")
    model = FIDInceptionV3()
    model.load_state_dict(state, strict=True)
    digest = hashlib.sha256(data).hexdigest()
    official = digest.startswith(FID_WEIGHTS_SHA256_PREFIX)
    if not official:
        warnings.warn(f"{posixpath.basename(path)}: sha256 {digest[:8]}... is not the published "
                      f"{FID_WEIGHTS_SHA256_PREFIX}...: rFID will not be comparable with published numbers",
                      stacklevel=2)
    return model.eval().requires_grad_(False), {"path": fs.unstrip_protocol(path), "sha256": digest,
                                                "official": official}


def build_fid_inception(url: str | None = None, **resolve_kw) -> tuple[FIDInceptionV3, dict]:
    """The FID InceptionV3 from ``url`` when given (see :func:`load_fid_inception`), else from gq's weight resolution
    (cache -> verified download); :class:`gq_model.weights.WeightsUnavailable` with the ways out otherwise."""
    if url:
        model, info = load_fid_inception(url)
        return model, {**info, "source": "explicit"}
    resolve_kw.setdefault("ways_out", EVAL_WAYS_OUT)
    resolve_kw.setdefault("purpose", "gq eval's rFID")
    r = resolve_group("fid-inception", **resolve_kw)["fid-inception"]
    model, info = load_fid_inception(r.path)
    return model, {**info, "source": r.source}
