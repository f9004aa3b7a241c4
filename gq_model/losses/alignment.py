"""VA-VAE-style vision-foundation alignment ("VF loss", the reference's ``_vf`` variant, gq-reference.md §3.4).

The latent (projected by a 1x1 conv to the feature width and resized to the feature grid) is aligned with a frozen
feature model's patch features by two margin losses:

* distance matrix: ``mean(relu(|zn_i . zn_j - fn_i . fn_j| - distmat_margin))`` over all position pairs of each image;
* cosine: ``mean(relu(1 - cos_margin - cos(z_i, f_i)))`` over positions;

with zn/fn the per-position L2-normalized channel vectors. The feature model is *any* torch module that takes images
``[B,3,H,W]`` and returns a feature grid ``[B,D,h,w]``, tokens ``[B,N,D]`` (a square grid, optionally after a leading
CLS token) or a dict with ``x_norm_patchtokens`` (DINOv2's ``forward_features``). Nothing is downloaded: the model is
a TorchScript file, a ``torch.export`` program file, or a ``package.module:factory`` import spec with an optional
weights file.
"""
from __future__ import annotations

import importlib
import io
import math
import os
import warnings
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VFAlignmentLoss", "load_feature_model", "feature_grid"]


def feature_grid(out: Any) -> torch.Tensor:
    """A feature model's output as a ``[B, D, h, w]`` grid (see module docstring for accepted forms)."""
    if isinstance(out, Mapping):
        for key in ("x_norm_patchtokens", "patch_tokens", "features", "last_hidden_state"):
            if key in out:
                out = out[key]
                break
        else:
            raise ValueError(f"feature model returned a dict without patch tokens: keys {sorted(out)[:8]}")
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"feature model must return a tensor, got {type(out).__name__}")
    if out.dim() == 4:
        return out
    if out.dim() == 3:
        n = out.shape[1]
        side = math.isqrt(n)
        if side * side != n:
            side = math.isqrt(n - 1)
            if side * side != n - 1:
                raise ValueError(f"{n} feature tokens do not form a square grid (with or without a CLS token)")
            out = out[:, 1:]
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side)
    raise ValueError(f"feature model output must be 3-D tokens or a 4-D grid, got shape {tuple(out.shape)}")


def load_feature_model(spec: Any, weights: str | None = None, kwargs: Mapping[str, Any] | None = None,
                       storage_options: Mapping[str, Any] | None = None) -> nn.Module:
    """A frozen, eval-mode feature model from an ``nn.Module``, a TorchScript / torch.export file (local or fsspec),
    or ``"pkg.mod:fn"``.

    For an import spec, ``fn(**kwargs)`` must return the module; ``weights`` (a state-dict file) is then loaded
    strictly with ``weights_only=True``.
    """
    import fsspec

    from gq_model.storage import options_for

    if isinstance(spec, nn.Module):
        model = spec
    elif isinstance(spec, str) and ":" in spec and "://" not in spec and not os.path.exists(spec):
        mod_name, fn_name = spec.split(":", 1)
        model = getattr(importlib.import_module(mod_name), fn_name)(**dict(kwargs or {}))
        if not isinstance(model, nn.Module):
            raise TypeError(f"{spec} returned {type(model).__name__}, not a torch module")
        if weights:
            from gq_model.losses.lpips import load_state_dict_file

            model.load_state_dict(load_state_dict_file(weights, storage_options), strict=True)
    elif isinstance(spec, (str, os.PathLike)):
        with fsspec.open(os.fspath(spec), "rb", **options_for(spec, storage_options)) as f:
            data = f.read()
        model = None
        errors = []
        try:  # torch.export program (torch.export.save), the non-deprecated format
            model = torch.export.load(io.BytesIO(data)).module()
        except Exception as e:
            errors.append(f"torch.export: {type(e).__name__}")
        if model is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    model = torch.jit.load(io.BytesIO(data), map_location="cpu")
            except Exception as e:
                errors.append(f"TorchScript: {type(e).__name__}: {str(e)[:80]}")
        if model is None:
            raise ValueError(f"{spec}: not a TorchScript module or torch.export program ({'; '.join(errors)}); save "
                             f"the feature model with torch.jit.script(...).save(path) or torch.export.save(...), or "
                             f"give a 'package.module:factory' spec")
    else:
        raise TypeError(f"cannot build a feature model from {type(spec).__name__}")
    try:
        model.eval()
    except NotImplementedError:  # torch.export modules are traced in the mode they were exported in
        pass
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class VFAlignmentLoss(nn.Module):
    """The VF loss between projected latents ``zp [B,D,h',w']`` and features ``f [B,D,h,w]`` (zp is resized)."""

    def __init__(self, distmat_margin: float = 0.25, cos_margin: float = 0.5, distmat_weight: float = 1.0,
                 cos_weight: float = 1.0):
        super().__init__()
        self.distmat_margin, self.cos_margin = float(distmat_margin), float(cos_margin)
        self.distmat_weight, self.cos_weight = float(distmat_weight), float(cos_weight)

    def forward(self, zp: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        feats = feats.detach().float()
        zp = zp.float()
        if zp.shape[-2:] != feats.shape[-2:]:
            zp = F.interpolate(zp, size=feats.shape[-2:], mode="bilinear", align_corners=False)
        if zp.shape[1] != feats.shape[1]:
            raise ValueError(f"projected latent has {zp.shape[1]} channels, features have {feats.shape[1]}")
        zn = F.normalize(zp.flatten(2), dim=1)  # [B, D, N]
        fn = F.normalize(feats.flatten(2), dim=1)
        z_sim = torch.einsum("bdi,bdj->bij", zn, zn)
        f_sim = torch.einsum("bdi,bdj->bij", fn, fn)
        distmat = F.relu((z_sim - f_sim).abs() - self.distmat_margin).mean()
        cos = F.relu(1.0 - self.cos_margin - (zn * fn).sum(dim=1)).mean()
        loss = self.distmat_weight * distmat + self.cos_weight * cos
        return loss, {"vf_distmat": float(distmat.detach()), "vf_cos": float(cos.detach())}
