"""GQConfig: everything needed to rebuild a GQ model, as plain JSON-able data (stored in every bundle)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GQConfig", "ARCHITECTURES"]

ARCHITECTURES = ("unet", "vit")


@dataclass
class GQConfig:
    """Architecture and quantizer settings of a GQ autoencoder.

    ``encoder``/``decoder`` hold the constructor kwargs of the reference's ``unet.Encoder/Decoder`` or
    ``vit.TransformerEncoder/Decoder`` (the YAML ``*_config.params``); the rest configures the quantizer.
    """

    arch: str
    encoder: dict[str, Any]
    decoder: dict[str, Any]
    codebook_size: int = 65536
    group: int = 16
    seed: int = 42
    beta: float = 1.0
    logvar_range: tuple[float, float] = (-30.0, 20.0)
    layout: str = "strided"
    clamp_range: tuple[float, float] | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if not isinstance(self.encoder, dict) or not isinstance(self.decoder, dict):
            raise ValueError("encoder and decoder must be dicts of constructor parameters")
        self.codebook_size, self.group, self.seed = int(self.codebook_size), int(self.group), int(self.seed)
        self.beta = float(self.beta)
        self.logvar_range = tuple(float(v) for v in self.logvar_range)
        if self.clamp_range is not None:
            self.clamp_range = tuple(float(v) for v in self.clamp_range)
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        z = int(self.encoder.get("z_channels", 0))
        if self.group < 1 or z % self.group:
            raise ValueError(f"z_channels={z} must be a positive multiple of group={self.group}")

    @property
    def z_channels(self) -> int:
        return int(self.encoder["z_channels"])

    @property
    def num_groups(self) -> int:
        """Sub-codebooks per latent position: tokens per position."""
        return self.z_channels // self.group

    @property
    def latent_format(self) -> str:
        return "bchw" if self.arch == "unet" else "blc"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["logvar_range"] = list(self.logvar_range)
        d["clamp_range"] = list(self.clamp_range) if self.clamp_range is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GQConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown GQConfig fields: {sorted(unknown)}")
        missing = {"arch", "encoder", "decoder"} - set(data)
        if missing:
            raise ValueError(f"GQConfig is missing required fields: {sorted(missing)}")
        return cls(**data)

    @classmethod
    def from_reference(cls, ref: dict[str, Any]) -> "GQConfig":
        """From ``gq_model.reference_config.load_reference_config`` output."""
        keys = ("arch", "encoder", "decoder", "codebook_size", "group", "seed", "beta", "logvar_range", "layout",
                "clamp_range", "source")
        return cls(**{k: ref[k] for k in keys if k in ref})
