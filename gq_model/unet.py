"""SD3/LDM-style convolutional VAE encoder and decoder used by the reference GQ UNet configs.

Why this shape: the released checkpoint (``sd3unet_gq_0.25.ckpt``) stores its weights under
``encoder.*`` / ``decoder.*`` with the LDM module layout (``down.{i}.block.{j}``, ``up.{i}`` indexed by
resolution level, ...).  To load it strictly, module names, registration order and parameter shapes
here reproduce that layout exactly (gq-reference.md §3.2 and §6; the key list is checked by
``tests/test_architectures.py``).  The reference has its mid-block attention commented out, so there is
no ``mid.attn_1`` here either.

Constructor kwargs are those of the reference YAML ``encoder_config.params``; the decoder gets the same
dict through an OmegaConf interpolation, so both classes accept and ignore unrelated kwargs.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Encoder", "Decoder", "ResnetBlock", "AttnBlock", "Downsample", "Upsample", "Normalize"]


NORM_GROUPS = 32  # the reference's GroupNorm(32): every released config


def Normalize(channels: int, groups: int = NORM_GROUPS) -> nn.GroupNorm:
    """GroupNorm(``groups``, default the reference's 32) with eps 1e-6: the LDM value, not torch's default 1e-5.

    Why ``groups`` is an option at all: a group of one channel is an instance norm, which removes each channel's
    mean over the image. With 32 channels and 32 groups (a narrow model such as the built-in demo) an image's
    overall colour survives only as what the zero-padded borders make of it, so flat colours come back grey and
    whole photos get a cast. The reference widths (128 channels and up) have at least 4 channels per group."""
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups (set encoder.norm_groups "
                         f"to a divisor of every level's width)")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv3x3 -> norm2 -> swish -> dropout -> conv3x3, plus a (1x1) shortcut.

    The timestep embedding of the LDM block is unused by the VAE (temb_ch=0) and therefore omitted.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 norm_groups: int = NORM_GROUPS):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual connection.

    The 1x1 convs (rather than Linear) are kept so the ``[C, C, 1, 1]`` checkpoint weights load as is.
    """

    def __init__(self, in_channels: int, norm_groups: int = NORM_GROUPS):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels, norm_groups)
        self.q = nn.Conv2d(in_channels, in_channels, 1)
        self.k = nn.Conv2d(in_channels, in_channels, 1)
        self.v = nn.Conv2d(in_channels, in_channels, 1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = h.shape
        h = self.norm(h)
        # [B, C, H, W] -> [B, 1, H*W, C]: one head spanning all channels, scale 1/sqrt(C).
        q, k, v = (t.reshape(b, 1, c, hh * ww).transpose(2, 3).contiguous() for t in (self.q(h), self.k(h), self.v(h)))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(2, 3).reshape(b, c, hh, ww)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj_out(self.attention(x))


class Downsample(nn.Module):
    """Asymmetric zero pad (right/bottom by one) then a stride-2 3x3 conv without padding.

    This halves even sizes exactly and matches the LDM checkpoint's spatial alignment; a symmetric
    ``padding=1`` conv would shift every latent by half a pixel.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _make_attn(channels: int, attn_type: str, norm_groups: int = NORM_GROUPS) -> nn.Module:
    if attn_type == "vanilla":
        return AttnBlock(channels, norm_groups)
    if attn_type == "none":
        return nn.Identity()
    raise NotImplementedError(f"attn_type={attn_type!r} is not supported (only 'vanilla' and 'none')")


def _check_padding_mode(ignore_kwargs: dict) -> None:
    # The reference accepts a padding_mode option; every GQ config leaves it at zeros.  Fail loudly
    # rather than silently building a different network.
    mode = ignore_kwargs.get("padding_mode", "zeros")
    if mode != "zeros":
        raise NotImplementedError(f"padding_mode={mode!r} is not supported (only 'zeros')")
    from gq_model.reference_config import check_model_options  # tanh_out, resamp_with_conv, ... likewise

    check_model_options("unet", ignore_kwargs)


class _Level(nn.Module):
    """One resolution level: ``block`` / ``attn`` lists plus an optional down/upsample (named by caller)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    """Two ResnetBlocks; the reference's mid attention is commented out, so none here."""

    def __init__(self, channels: int, dropout: float, norm_groups: int = NORM_GROUPS):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    """Image ``[B, in_channels, H, W]`` -> latent moments ``[B, 2*z_channels, H/f, W/f]`` (f = 2**(levels-1)).

    With ``double_z`` the first ``z_channels`` output channels are μ and the rest log σ².
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Iterable[int],
        dropout: float = 0.0,
        resolution: int,
        in_channels: int = 3,
        z_channels: int,
        double_z: bool = True,
        attn_type: str = "vanilla",
        norm_groups: int = NORM_GROUPS,
        **ignore_kwargs,
    ):
        super().__init__()
        _check_padding_mode(ignore_kwargs)
        ch_mult = tuple(ch_mult)
        attn_resolutions = set(attn_resolutions)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.z_channels = z_channels
        self.double_z = double_z

        self.conv_in = nn.Conv2d(in_channels, ch, 3, stride=1, padding=1)

        in_ch_mult = (1,) + ch_mult
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            level = _Level()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(_make_attn(block_in, attn_type, norm_groups))
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)

        self.mid = _Mid(block_in, dropout, norm_groups)
        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``[B, z_channels, h, w]`` -> image ``[B, out_ch, h*f, w*f]``; no tanh or clamp on the output.

    ``up`` is indexed by resolution level (``up.0`` = full resolution, ``up[-1]`` = lowest), and is run
    from the lowest level upwards, as in the LDM checkpoint layout.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Iterable[int],
        dropout: float = 0.0,
        resolution: int,
        z_channels: int,
        attn_type: str = "vanilla",
        norm_groups: int = NORM_GROUPS,
        **ignore_kwargs,  # double_z, in_channels, ... arrive through the shared config interpolation
    ):
        super().__init__()
        _check_padding_mode(ignore_kwargs)
        ch_mult = tuple(ch_mult)
        attn_resolutions = set(attn_resolutions)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.z_channels = z_channels
        self.out_ch = out_ch

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)

        self.conv_in = nn.Conv2d(z_channels, block_in, 3, stride=1, padding=1)
        self.mid = _Mid(block_in, dropout, norm_groups)

        levels: list[_Level] = []
        for i_level in reversed(range(self.num_resolutions)):
            level = _Level()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(_make_attn(block_in, attn_type, norm_groups))
            if i_level != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            levels.insert(0, level)  # keep up[i] == resolution level i
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))
