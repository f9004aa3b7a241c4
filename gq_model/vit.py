"""BSQ-ViT style transformer encoder/decoder used by the reference ``bsqvit_gq_*`` configs.

Why this shape: module names, registration order and shapes reproduce the reference state dict
(``gq-reference-state-dict-keys.txt`` section B) so ``encoder.*`` / ``decoder.*`` weights load strictly.
Token layout is ``blc``: the encoder returns ``[B, L, 2*z_channels]`` (μ then log σ² on the last dim)
and the decoder maps ``[B, L, z_channels]`` back to ``[B, 3, H, W]``.

Facts the key list fixes: ``conv1`` is a bias-free Linear over flattened patches (bias is redundant
before ``ln_pre``), a learned ``positional_embedding [L, width]`` without a class token, ``ln_pre``,
pre-LN blocks (``ln_1``/``attn`` as ``nn.MultiheadAttention``/``ln_2``/``mlp.c_fc``/``mlp.c_proj``),
``ln_post``, ``quant_embed``; the decoder has ``post_quant_embed``, ``ffn.0`` (width -> 3072) and
``conv_out`` (3072 -> 3*p*p).

Assumptions where the key list leaves forward details open (gq-reference.md §3.3 where it says so):
* MLP activation is exact ``nn.GELU`` (not QuickGELU / tanh approximation); LayerNorm eps is torch's
  default 1e-5.
* Decoder head: ``ln_post -> ffn = Linear(width, 3072) + Tanh -> conv_out Linear -> unpatchify``
  (§3.3).  The reference's head hidden width is 3072 whatever the model width (the default of BSQ-ViT's
  ``dim_ffn_output``, which no GQ config sets); it equals ``4*width`` only at width 768, so a reference ViT of any
  other width has ``decoder.ffn.0`` of shape ``[3072, width]`` (``FFN_HIDDEN``; ``dim_ffn_output`` or our
  ``ffn_hidden`` override it).
* ``drop_rate`` is the dropout after each block's ``mlp.c_proj`` (BSQ-ViT's ``mlp.drop2``; it has no weights, so
  no state-dict key).  All reference configs use 0.0.

Initialisation (:func:`init_vit_parameters`) follows BSQ-ViT's ``init_parameters``: positional embeddings
``N(0, 0.02)``; ``trunc_normal_(std=0.02)`` on the encoder's ``conv1``, on every block weight except the LayerNorms
(``attn.in_proj_weight``, ``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight``) and on the decoder's
``ffn.0`` and ``conv_out`` weights; every block bias zero; LayerNorm weights stay 1.  Not touched, so PyTorch's
defaults: ``quant_embed``, ``post_quant_embed`` and the ``ffn.0`` / ``conv_out`` biases.  ``trunc_normal_`` is timm's and
torch's convention: the bounds ``a=-2, b=2`` are *absolute*, i.e. 100 std at std 0.02, so in practice the draw is an
untruncated N(0, 0.02).  Without this, the positional embedding would keep ``width**-0.5 * randn`` (std 0.125 at
width 64) and the Linear layers PyTorch's Kaiming-uniform.

Reference options this module does not implement (``drop_path_rate > 0``, ``ls_init_value``, ``ln_pre: false``, ...)
are refused with the option's name (:func:`gq_model.reference_config.check_model_options`), never silently dropped.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from gq_model.reference_config import check_model_options

__all__ = ["TransformerEncoder", "TransformerDecoder", "patchify", "unpatchify", "FFN_HIDDEN", "INIT_STD",
           "init_vit_parameters"]

FFN_HIDDEN = 3072  # the reference decoder head's hidden width, fixed (not 4*width)
INIT_STD = 0.02  # BSQ-ViT's init scale for positional embeddings and weights


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``b c (hh p) (ww p) -> b (hh ww) (c p p)``: row-major patches, channel-major patch vectors."""
    b, c, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
    hh, ww = h // p, w // p
    x = x.reshape(b, c, hh, p, ww, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, hh * ww, c * p * p)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Exact inverse of :func:`patchify` for a ``grid = (hh, ww)`` token grid."""
    b, length, d = x.shape
    hh, ww = grid
    p = patch_size
    if length != hh * ww or d != channels * p * p:
        raise ValueError(f"tokens {tuple(x.shape)} do not match grid {grid}, channels {channels}, patch {p}")
    x = x.reshape(b, hh, ww, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, hh * p, ww * p)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, drop: float = 0.0):
        super().__init__()
        # registration order ln_1, attn, ln_2, mlp matches the reference state-dict order
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width)),
            ("drop2", nn.Dropout(drop)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, drop: float = 0.0):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, drop) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class _ViTBase(nn.Module):
    """Shared geometry checks and the positional embedding (registered first, as in the reference)."""

    def __init__(self, image_size: int, patch_size: int, width: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.grid_size = image_size // patch_size
        self.num_tokens = self.grid_size**2
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(self.num_tokens, width))

    def _check_tokens(self, length: int) -> None:
        if length != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens ({self.image_size}px / patch {self.patch_size}), got {length}")


class TransformerEncoder(_ViTBase):
    """Image ``[B, 3, H, W]`` -> ``[B, L, 2*z_channels]`` (or ``z_channels`` without ``double_z``)."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        z_channels: int,
        double_z: bool = True,
        drop_rate: float = 0.0,
        **ignore_kwargs,
    ):
        check_model_options("vit", ignore_kwargs, "TransformerEncoder")
        super().__init__(image_size, patch_size, width)
        self.z_channels = z_channels
        self.double_z = double_z
        self.conv1 = nn.Linear(3 * patch_size**2, width, bias=False)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, drop_rate)
        self.ln_post = nn.LayerNorm(width)
        self.quant_embed = nn.Linear(width, 2 * z_channels if double_z else z_channels)
        init_vit_parameters(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = patchify(x, self.patch_size)
        self._check_tokens(x.shape[1])
        x = self.ln_pre(self.conv1(x) + self.positional_embedding.to(x.dtype))
        x = self.ln_post(self.transformer(x))
        return self.quant_embed(x)


class TransformerDecoder(_ViTBase):
    """Tokens ``[B, L, z_channels]`` -> image ``[B, 3, H, W]`` (square grid of ``image_size/patch_size``)."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        z_channels: int,
        drop_rate: float = 0.0,
        ffn_hidden: int = FFN_HIDDEN,
        **ignore_kwargs,  # double_z etc. arrive through the shared config interpolation
    ):
        check_model_options("vit", ignore_kwargs, "TransformerDecoder")
        # dim_ffn_output is the reference's name for the head width (default 3072, like ours)
        ffn_hidden = ignore_kwargs.get("dim_ffn_output", ffn_hidden)
        super().__init__(image_size, patch_size, width)
        self.z_channels = z_channels
        self.ffn = nn.Sequential(nn.Linear(width, int(ffn_hidden)), nn.Tanh())
        self.conv_out = nn.Linear(int(ffn_hidden), 3 * patch_size**2)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, drop_rate)
        self.ln_post = nn.LayerNorm(width)
        self.post_quant_embed = nn.Linear(z_channels, width)
        init_vit_parameters(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_tokens(z.shape[1])
        x = self.ln_pre(self.post_quant_embed(z) + self.positional_embedding.to(z.dtype))
        x = self.ln_post(self.transformer(x))
        x = self.conv_out(self.ffn(x))
        return unpatchify(x, self.patch_size, (self.grid_size, self.grid_size))


def init_vit_parameters(module: "TransformerEncoder | TransformerDecoder", std: float = INIT_STD) -> None:
    """BSQ-ViT's initialisation (module docstring): why a freshly built ViT trains like the reference's from step 0."""
    with torch.no_grad():
        nn.init.normal_(module.positional_embedding, std=std)
        if isinstance(module, TransformerEncoder):
            nn.init.trunc_normal_(module.conv1.weight, std=std)  # a=-2, b=2 absolute, as timm's trunc_normal_
        for block in module.transformer.resblocks:
            for name, p in block.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                elif name.startswith("ln_"):
                    continue  # LayerNorm weights stay 1
                elif "weight" in name:
                    nn.init.trunc_normal_(p, std=std)
                else:
                    raise NotImplementedError(f"no initialisation rule for block parameter {name!r}")
        if isinstance(module, TransformerDecoder):
            nn.init.trunc_normal_(module.ffn[0].weight, std=std)
            nn.init.trunc_normal_(module.conv_out.weight, std=std)
