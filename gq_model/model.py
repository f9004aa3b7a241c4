"""GQModel: a Gaussian-VAE autoencoder plus its training-free quantizer, with one explicit API per use.

``encode_moments`` gives the posterior; ``tokenize``/``detokenize`` are the VQ-VAE view (deterministic, never mutates
state, unlike the reference whose ``encode`` switches behaviour on ``module.training``); ``encode_latent``/
``decode_latent`` are the continuous Gaussian-VAE view for diffusion users.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import torch
from torch import nn

from gq_model.config import GQConfig
from gq_model.quantizer import GaussianQuantizer

__all__ = ["GQModel", "build_autoencoder"]


def build_autoencoder(config: GQConfig) -> tuple[nn.Module, nn.Module]:
    """Encoder and decoder modules for ``config`` (the reference's classes, keys and shapes)."""
    if config.arch == "unet":
        from gq_model.unet import Decoder, Encoder
    else:
        from gq_model.vit import TransformerDecoder as Decoder, TransformerEncoder as Encoder
    encoder_params = dict(config.encoder)
    if not encoder_params.get("double_z", True):
        raise ValueError("GQ needs double_z=True: the encoder must output both mu and log sigma^2")
    return Encoder(**encoder_params), Decoder(**dict(config.decoder))


class GQModel(nn.Module):
    """A GQ tokenizer. Build it from a :class:`GQConfig` (or its dict), a bundle, or an official checkpoint."""

    def __init__(self, config: GQConfig | dict[str, Any]):
        super().__init__()
        self.config = config if isinstance(config, GQConfig) else GQConfig.from_dict(config)
        self.encoder, self.decoder = build_autoencoder(self.config)
        c = self.config
        self.quantizer = GaussianQuantizer(codebook_size=c.codebook_size, group=c.group, seed=c.seed, beta=c.beta,
                                           logvar_range=c.logvar_range, layout=c.layout)
        self._model_fingerprint: str | None = None

    # ------------------------------------------------------------------ shapes and identity
    @property
    def fingerprint(self) -> str:
        """Codebook fingerprint: identifies the token vocabulary (sha256[:16] of the float32 codebook)."""
        return self.quantizer.fingerprint

    @property
    def model_fingerprint(self) -> str:
        """sha256[:16] over the config and the encoder/decoder weights: identifies which model made a token shard."""
        if self._model_fingerprint is None:
            h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
            for name, tensor in sorted(self.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
            self._model_fingerprint = h.hexdigest()[:16]
        return self._model_fingerprint

    def load_state_dict(self, *args, **kwargs):  # weights changed: forget the cached fingerprint
        self._model_fingerprint = None
        return super().load_state_dict(*args, **kwargs)

    @property
    def downsample_factor(self) -> int:
        if self.config.arch == "unet":
            return 2 ** (len(self.config.encoder["ch_mult"]) - 1)
        return int(self.config.encoder["patch_size"])

    def token_shape(self, image_size: int) -> tuple[int, int, int]:
        """(G, h, w) of the token grid for a square ``image_size`` input."""
        self._check_size(image_size, image_size)
        s = image_size // self.downsample_factor
        return (self.config.num_groups, s, s)

    def _check_size(self, h: int, w: int) -> None:
        f = self.downsample_factor
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not a multiple of the model's downsampling factor {f}")
        if self.config.arch == "vit":
            size = int(self.config.encoder["image_size"])
            if (h, w) != (size, size):
                raise ValueError(f"this ViT model takes {size}x{size} images only (fixed positional embedding), "
                                 f"got {h}x{w}")

    def _check_images(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be [B,3,H,W], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"images must be floating point in [-1, 1], got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError("empty batch")
        self._check_size(x.shape[2], x.shape[3])
        if not bool(torch.isfinite(x).all()):
            raise ValueError("images contain NaN or Inf")

    # ------------------------------------------------------------------ Gaussian-VAE view
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mu, logvar) for images ``x`` [B,3,H,W] in [-1, 1]: ``[B,C,h,w]`` (UNet) or ``[B,L,C]`` (ViT).

        logvar is returned unclamped; the quantizer and TDC clamp it to ``config.logvar_range`` as the reference does.
        """
        self._check_images(x)
        h = self.encoder(x)
        return h.chunk(2, dim=1) if self.config.latent_format == "bchw" else h.chunk(2, dim=-1)

    def encode_latent(self, x: torch.Tensor, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Continuous latent: mu (deterministic, the default) or a posterior sample mu + sigma * eps."""
        mu, logvar = self.encode_moments(x)
        if not sample:
            return mu
        std = torch.exp(0.5 * logvar.clamp(*self.config.logvar_range))
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + std * eps

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Images from a continuous (or dequantized) latent; clamped to ``clamp_range`` when the config has one."""
        x = self.decoder(z)
        if self.config.clamp_range is not None:
            x = x.clamp(*self.config.clamp_range)
        return x

    # ------------------------------------------------------------------ VQ-VAE view
    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, quantized latent) for images."""
        mu, logvar = self.encode_moments(x)
        return self.quantizer.quantize(mu, logvar)

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """int64 token indices: ``[B, G, h, w]`` (UNet) or ``[B, L, G]`` (ViT) for images in [-1, 1].

        Raises ``ValueError`` for values well outside [-1, 1] (0..255 pixels) and warns for a batch that lies wholly
        in [0, 1] (``ToTensor()`` output without ``* 2 - 1``): both give plausible-looking but wrong tokens."""
        self._check_images(x)
        self._check_value_range(x)
        return self.quantize(x)[0]

    # Resampling [-1, 1] images (bicubic, Lanczos) overshoots by a few per cent; 0..255 pixels are far beyond this.
    RANGE_TOLERANCE = 0.1

    def _check_value_range(self, x: torch.Tensor) -> None:
        """The public entry points' guard against the usual input mistakes; the pipeline's own preprocessing
        (``to_model_input``) always gives [-1, 1] and goes through ``encode_moments`` without it."""
        lo, hi = float(x.min()), float(x.max())
        tol = self.RANGE_TOLERANCE
        if lo < -1 - tol or hi > 1 + tol:
            raise ValueError(f"images must be in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]"
                             + (": uint8 pixels? use x / 127.5 - 1" if hi > 2 else ""))
        if lo >= 0 and hi <= 1:
            import warnings

            warnings.warn(f"every value of this batch lies in [0, 1] (min {lo:.3g}, max {hi:.3g}): GQModel takes "
                          f"images in [-1, 1]; if these are ToTensor()-style [0, 1] images, pass x * 2 - 1",
                          UserWarning, stacklevel=4)  # the caller of tokenize (past torch.no_grad)

    @torch.no_grad()
    def detokenize(self, indices: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] from token indices (the layout :meth:`tokenize` returns)."""
        expected = 4 if self.config.latent_format == "bchw" else 3
        if not isinstance(indices, torch.Tensor) or indices.dim() != expected:
            shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(f"indices must be a {expected}-D tensor for a {self.config.arch} model, got {shape}")
        g = indices.shape[1] if expected == 4 else indices.shape[2]
        if g != self.config.num_groups:
            raise ValueError(f"indices have {g} groups, this model has {self.config.num_groups}")
        device = next(self.decoder.parameters()).device
        return self.decode_latent(self.quantizer.dequantize(indices.to(device)))

    # ------------------------------------------------------------------ token layout
    # Shards, datasets and decode keep one layout for every architecture, a grid ``[B, C, h, w]`` (C = groups for
    # tokens, latent channels for mu). The UNet already works in it; the ViT works in sequences ``[B, L, C]`` with
    # L = h * w in row-major order. The model owns this mapping, both ways, so no caller re-derives it.
    def to_grid(self, x: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Tokens or latents in this model's layout (:meth:`tokenize`) -> ``[B, C, h, w]`` for images of
        ``image_size`` (H, W)."""
        if self.config.latent_format == "bchw":
            return x
        f = self.downsample_factor
        b, _, c = x.shape
        return x.transpose(1, 2).reshape(b, c, int(image_size[0]) // f, int(image_size[1]) // f)

    def from_grid(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` tokens or latents -> this model's layout (what :meth:`detokenize` takes)."""
        if self.config.latent_format == "bchw":
            return x
        b, c = x.shape[:2]
        return x.reshape(b, c, -1).transpose(1, 2)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, quantized: bool = True) -> torch.Tensor:
        """Quantized (default) or Gaussian-mean reconstruction of ``x``."""
        if quantized:
            return self.decode_latent(self.quantize(x)[1])
        return self.decode_latent(self.encode_latent(x))

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, url: str, *, storage_options: dict[str, Any] | None = None, **extra: Any) -> None:
        """Write a bundle (``config.json`` + ``model.safetensors``, no pickle) to a local path or fsspec URL.

        ``storage_options`` are fsspec's (e.g. ``{"endpoint_url": ...}`` for S3); ``extra`` is recorded in the config.
        """
        from gq_model.bundle import save_bundle

        save_bundle(self, url, storage_options, **extra)

    @classmethod
    def from_parts(cls, config: GQConfig | dict[str, Any], state_dict: Mapping[str, torch.Tensor], *,
                   what: str = "state dict", hint: str = "", got_name: str = "file",
                   expected_name: str = "model") -> "GQModel":
        """Assemble a model (eval mode) from an architecture and its weights, every key and shape checked.

        Loaders (:mod:`gq_model.bundle`, :mod:`gq_model.reference_checkpoint`, :mod:`gq_model.zero_checkpoint`)
        only read ``(config, state_dict)``; the model builds itself here, so no loader imports this module back.
        """
        return cls(config).load_checked(state_dict, what=what, hint=hint, got_name=got_name,
                                        expected_name=expected_name).eval()

    def load_checked(self, state_dict: Mapping[str, torch.Tensor], *, what: str = "state dict", hint: str = "",
                     got_name: str = "file", expected_name: str = "model") -> "GQModel":
        """Load ``state_dict`` strictly after :func:`gq_model.state_dict_check.check_keys` named any mismatch."""
        from gq_model.state_dict_check import check_keys

        check_keys(self.state_dict(), state_dict, what=what, hint=hint, got_name=got_name,
                   expected_name=expected_name)
        self.load_state_dict(dict(state_dict), strict=True)
        return self

    # Doors to the loaders above this module (gq_model.loading); the loaders never import this module back.
    @classmethod
    def from_pretrained(cls, url: str, map_location: str | torch.device = "cpu", *,
                        storage_options: dict[str, Any] | None = None, preset: str | None = None,
                        config: str | None = None, trust_unhashed: bool = False) -> "GQModel":
        """Load a model by name: a bundle (local path or fsspec URL), a built-in name such as ``"demo"``, or a
        reference checkpoint on the Hugging Face Hub, ``"official:sd3unet_gq_0.25"`` or ``"hf://owner/repo/file.ckpt"``.

        For Hub checkpoints the architecture is the preset named like the file unless ``preset`` (or the reference
        YAML ``config``) is given; the file is verified against the Hub's checksum, read ``weights_only`` and cached as
        a bundle (see :mod:`gq_model.hub`). ``trust_unhashed`` loads a bundle saved before bundles recorded their
        weights' sha256, to re-save it. Every other model spec goes through :func:`gq_model.loading.load_model`.
        """
        from gq_model.loading import load_pretrained

        return load_pretrained(url, map_location, storage_options=storage_options, preset=preset, config=config,
                               trust_unhashed=trust_unhashed)

    @classmethod
    def from_reference_checkpoint(cls, checkpoint: str, config: str | None = None, *, preset: str | None = None,
                                  trust_checkpoint: bool = False) -> "GQModel":
        """Load the reference's own Lightning ``.ckpt`` with its YAML config (or a built-in preset name).

        Only ``encoder.*``/``decoder.*`` are taken (strictly); ``loss.*`` and trainer state are ignored.
        """
        from gq_model.loading import load_reference_checkpoint

        return load_reference_checkpoint(checkpoint, config, preset=preset, trust_checkpoint=trust_checkpoint)
