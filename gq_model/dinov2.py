"""DINOv2 ViT (plain torch) as the frozen feature model of the VF alignment loss (the reference's ``_vf`` variant).

Why it is here: the reference builds ``timm "hf-hub:timm/vit_large_patch14_dinov2.lvd142m"`` (gq-reference.md §3.4),
which needs timm and a hub download at run time.  This module is the same network in plain torch, loaded from a
**local** weight file only; nothing is downloaded.  No SHA-256 of the published files could be verified offline, so
there is no cached download either: the caller names the file (``weights=``).  Get it once with, e.g.,
``huggingface-cli download timm/vit_large_patch14_dinov2.lvd142m model.safetensors`` (the hub checks its LFS hash)
or from facebookresearch's ``dinov2_vitl14_pretrain.pth``.

Layout (parameter names are those of both published files, so they load without renaming):
``cls_token [1,1,D]``, ``pos_embed [1, 1+G*G, D]`` (G = 518/14 = 37 for the released models),
``patch_embed.proj`` (Conv2d 3->D, kernel = stride = 14), ``blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
mlp.fc1, mlp.fc2, ls2.gamma}`` (pre-LN, LayerScale, exact GELU, LayerNorm eps 1e-6) and the final ``norm``.  ViT-L/14
has D=1024, 24 blocks, 16 heads: 304,367,616 parameters, the count the reference's state dict shows for timm's model.
The facebookresearch file has one more tensor, ``mask_token [1, D]`` (used only by masked pre-training); it is
accepted and unused.  Any other difference (a missing or unknown key, a shape) is refused with the keys named.

Forward (:meth:`DINOv2.forward`): images ``[B,3,H,W]`` with H, W multiples of 14 -> the final-norm patch tokens as a
``[B, D, H/14, W/14]`` grid (the CLS token dropped), as the reference takes ``forward_features(x)[:, 1:]``.  When the
grid differs from the stored one (16x16 at the reference's 224 px vs 37x37), the patch part of ``pos_embed`` is
resampled bicubically with antialiasing, timm's ``resample_abs_pos_embed`` convention (the CLS entry is kept).  The
images are *not* normalized with ImageNet mean/std: the reference feeds [-1, 1] images as they are (its quirk; the
caller decides).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOv2", "DINOV2_SIZES", "dinov2", "dinov2_vitl14", "load_dinov2_state_dict", "resample_pos_embed"]

# name -> (embed_dim, depth, num_heads); patch 14, MLP ratio 4 (ViT-g/14, with SwiGLU, is not implemented)
DINOV2_SIZES: dict[str, tuple[int, int, int]] = {
    "vits14": (384, 12, 6),
    "vitb14": (768, 12, 12),
    "vitl14": (1024, 24, 16),
}
_OPTIONAL_KEYS = ("mask_token",)  # facebookresearch layout only; unused at inference


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], prefix_tokens: int = 1) -> torch.Tensor:
    """``[1, prefix + g*g, D]`` -> ``[1, prefix + h*w, D]``: bicubic + antialias over the square patch grid."""
    prefix, patches = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    n, dim = patches.shape[1], patches.shape[2]
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    img = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=tuple(grid), mode="bicubic", align_corners=False, antialias=True)
    patches = img.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = _LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"DINOv2 input {h}x{w} is not a multiple of the patch size {p} (the VF loss resizes "
                             f"images to loss.vf.input_size, 224 for the reference)")
        return self.proj(x)


class DINOv2(nn.Module):
    """DINOv2 ViT backbone; ``forward`` returns the patch-token grid ``[B, D, H/p, W/p]`` (module docstring)."""

    def __init__(self, *, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                 patch_size: int = 14, img_size: int = 518):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.embed_dim, self.patch_size = int(embed_dim), int(patch_size)
        self.grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, embed_dim))
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.blocks = nn.ModuleList([_Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        tokens = self.patch_embed(x)  # [B, D, h, w]
        b, _, h, w = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        x = x + resample_pos_embed(self.pos_embed, (h, w)).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), h, w

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"x_norm_clstoken": [B, D], "x_norm_patchtokens": [B, h*w, D]}`` (DINOv2's names)."""
        out, _, _ = self._encode(x)
        return {"x_norm_clstoken": out[:, 0], "x_norm_patchtokens": out[:, 1:]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, h, w = self._encode(x)
        return out[:, 1:].transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Strict by design: every key of the published layout, shapes checked (see :func:`check_state_dict`)."""
        if not strict:
            raise ValueError("DINOv2 weights load strictly only (a partial DINOv2 gives meaningless features)")
        return super().load_state_dict(self.check_state_dict(state_dict), strict=True, assign=assign)

    def check_state_dict(self, state_dict: Mapping[str, Any], source: str = "DINOv2 state dict") -> dict[str, Any]:
        """The state dict with the optional ``mask_token`` dropped; ``ValueError`` naming every mismatch."""
        from gq_model.state_dict_check import check_keys

        given = {k: v for k, v in state_dict.items() if k not in _OPTIONAL_KEYS}
        check_keys(self.state_dict(), given,
                   what=f"{source} does not match this DINOv2 (embed_dim {self.embed_dim}, {len(self.blocks)} blocks, "
                        f"patch {self.patch_size}, {self.grid}x{self.grid} pos_embed)",
                   hint="Expected the timm vit_*_patch14_dinov2.lvd142m or facebookresearch dinov2_vit*14_pretrain.pth "
                        "layout")
        return dict(given)


def load_dinov2_state_dict(path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
                           ) -> dict[str, torch.Tensor]:
    """Tensors of a local (or fsspec) ``.safetensors`` or ``.pth``/``.bin`` file; pickles only via weights_only."""
    import io

    import fsspec

    from gq_model.storage import options_for

    path = os.fspath(path)
    try:
        with fsspec.open(path, "rb", **options_for(path, storage_options)) as f:
            data = f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"DINOv2 weight file {path!r} not found (nothing is downloaded: give a local copy "
                                f"of timm's vit_large_patch14_dinov2.lvd142m model.safetensors or "
                                f"dinov2_vitl14_pretrain.pth)") from e
    if path.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data)
    sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a DINOv2 state dict of tensors, got {type(sd).__name__}")
    return sd


def dinov2(size: str | None = "vitl14", *, weights: str | os.PathLike | None = None, random_init: bool = False,
           storage_options: Mapping[str, Any] | None = None, **arch: Any) -> DINOv2:
    """A frozen-ready DINOv2 of a named ``size`` (:data:`DINOV2_SIZES`) or explicit ``embed_dim/depth/num_heads``.

    ``weights`` (a local file) is required unless ``random_init=True`` (tests): aligning latents to the features of a
    random network would train silently wrong.  As ``loss.vf.model: gq_model.dinov2:dinov2`` with
    ``loss.vf.model_kwargs: {size: vitl14, weights: /path/model.safetensors}``.
    """
    kw: dict[str, Any] = {}
    if size is not None:
        if size not in DINOV2_SIZES:
            raise ValueError(f"unknown DINOv2 size {size!r} (known: {', '.join(DINOV2_SIZES)}, or size=None with "
                             f"embed_dim/depth/num_heads)")
        kw.update(zip(("embed_dim", "depth", "num_heads"), DINOV2_SIZES[size]))
    kw.update(arch)
    model = DINOv2(**kw)
    if weights is None:
        if not random_init:
            raise ValueError("DINOv2 needs its pretrained weights as a local file: set loss.vf.model_kwargs.weights "
                             "to timm's vit_large_patch14_dinov2.lvd142m model.safetensors (e.g. `huggingface-cli "
                             "download timm/vit_large_patch14_dinov2.lvd142m model.safetensors`) or facebookresearch's "
                             "dinov2_vitl14_pretrain.pth; nothing is downloaded at run time")
        return model
    state = load_dinov2_state_dict(weights, storage_options)
    super(DINOv2, model).load_state_dict(model.check_state_dict(state, source=os.fspath(weights)), strict=True)
    return model


def dinov2_vitl14(*, weights: str | os.PathLike | None = None, **kwargs: Any) -> DINOv2:
    """The reference's DINOv2 ViT-L/14 (1024-d features, 518 px position grid)."""
    return dinov2("vitl14", weights=weights, **kwargs)
