"""Read the reference GQ autoencoder YAML configs (or our presets, written in the same structure).

Why: the official checkpoints come with the reference repo's OmegaConf YAML files
(``configs/sd3unet_gq_0.25.yaml`` etc.).  Rather than re-typing their numbers, we parse those files and
reduce them to a small plain dict that ``GQModel`` can build from::

    {"arch": "unet" | "vit", "encoder": {...}, "decoder": {...},
     "codebook_size": K, "group": m, "seed": 42, "beta": 1.0, "logvar_range": [-30.0, 20.0],
     "tolerance": 0.5, "lam_factor": 1.01,
     "layout": "strided" | "contiguous", "format": "bchw" | "blc",
     "clamp_range": [lo, hi] | None, "source": "<preset name, path/URL, or '<yaml text>'>"}

Targets are matched by ``module.Class`` suffix (``unet.Encoder``, ``vit.TransformerEncoder``,
``gaussian.GaussianQuantRegularizer`` / ``gaussian.GaussianQuantRegularizer2``), so the reference's
``pit.`` package prefix is not needed.  ``GaussianQuantRegularizer`` groups channels *strided*
(channel ``a*(C/m)+j`` -> group ``j``); ``GaussianQuantRegularizer2`` groups them *contiguously* and names
its arguments ``codebook_size``/``dim`` instead of ``n_samples``/``group`` (gq-reference.md §1.6, §9.3).
Anything else (FSQ/LFQ/VQ regularizers, the deleted ``GaussianRegularizer``, unknown encoders) raises
``ValueError``: such a config cannot produce GQ tokens.

Reference constructor options we do not implement (:data:`IMPLEMENTED_OPTIONS`: e.g. the UNet's ``tanh_out``,
``resamp_with_conv``, the ViT's ``drop_path_rate``) are accepted only at the value we implement and refused otherwise,
with the option and value named (:func:`check_model_options`): silently ignoring one would build a different network
than the config describes.  The encoders and decoders run the same check on their own keyword arguments, so a GQConfig
written by hand is held to it too.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any, Mapping

import fsspec
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["load_reference_config", "preset_config", "list_presets", "check_model_options", "IMPLEMENTED_OPTIONS",
           "UnsupportedOption"]

_ARCH_TARGETS = {
    ("unet", "Encoder"): ("unet", ("unet", "Decoder")),
    ("vit", "TransformerEncoder"): ("vit", ("vit", "TransformerDecoder")),
}
_REGULARIZERS = {
    ("gaussian", "GaussianQuantRegularizer"): "strided",
    ("gaussian", "GaussianQuantRegularizer2"): "contiguous",
}
_ARCH_FORMAT = {"unet": "bchw", "vit": "blc"}
# Options of the reference's encoder/decoder constructors that change the network, with the one value we implement
# (the reference's default).  The decoder receives the encoder's params through the YAML interpolation (and the
# reverse), so both roles are checked against the union.  LDM UNet: ``resamp_with_conv`` (False: strided avg-pool
# / nearest upsampling without the conv), ``tanh_out`` and ``give_pre_end`` (decoder outputs), ``use_linear_attn``,
# ``padding_mode``.  BSQ-ViT: stochastic depth, LayerScale, attention dropout, video frames, masks, optional norms,
# the FFN head and the logit-Laplace output.
IMPLEMENTED_OPTIONS: dict[str, dict[str, Any]] = {
    "unet": {"resamp_with_conv": True, "tanh_out": False, "give_pre_end": False, "use_linear_attn": False,
             "padding_mode": "zeros"},
    "vit": {"drop_path_rate": 0.0, "attn_drop_rate": 0.0, "ls_init_value": None, "num_frames": 1, "ln_pre": True,
            "ln_post": True, "act_layer": "gelu", "norm_layer": "layer_norm", "mask_type": "none",
            "use_ffn_output": True, "logit_laplace": False},
}
_NONE_ALIASES = {"mask_type": (None, "none")}


class UnsupportedOption(ValueError, NotImplementedError):
    """A reference option at a value gq does not implement: a bad config (ValueError) for a missing feature."""


def _same(option: str, value: Any, implemented: Any) -> bool:
    if option in _NONE_ALIASES:
        return (value.lower() if isinstance(value, str) else value) in _NONE_ALIASES[option]
    if implemented is None or value is None:
        return value is implemented
    if isinstance(implemented, bool):
        return isinstance(value, bool) and value is implemented
    if isinstance(implemented, str):
        return isinstance(value, str) and value.lower() == implemented
    return not isinstance(value, bool) and isinstance(value, (int, float)) and float(value) == float(implemented)


def check_model_options(arch: str, params: Mapping[str, Any], where: str = "") -> None:
    """Refuse reference options we do not implement: :class:`UnsupportedOption` naming the option and its value.

    ``params`` are encoder/decoder constructor kwargs; options absent or at the implemented value pass.
    """
    prefix = f"{where}: " if where else ""
    for option, implemented in IMPLEMENTED_OPTIONS.get(arch, {}).items():
        if option in params and not _same(option, params[option], implemented):
            raise UnsupportedOption(
                f"{prefix}reference option {option}={params[option]!r} is not implemented for the {arch} "
                f"encoder/decoder (only {option}={implemented!r}); refusing rather than building a different network")


def _check_vf_options(params: Mapping, source: str) -> None:
    """``use_vf`` (the ``_vf`` training variant) only with DINOv2 and ``reverse_proj: true`` (the reference crashes
    with ``reverse_proj: false``, gq-reference.md §3.4)."""
    use_vf = params.get("use_vf")
    if use_vf in (None, False):
        return
    if not (isinstance(use_vf, str) and use_vf.lower() == "dinov2"):
        raise UnsupportedOption(f"{source}: reference option use_vf={use_vf!r} is not implemented (only 'dinov2')")
    if params.get("reverse_proj", False) is not True:
        raise UnsupportedOption(f"{source}: reference option reverse_proj={params.get('reverse_proj')!r} with "
                                  f"use_vf is not implemented (only reverse_proj=True; the reference crashes on False)")


_DEFAULTS = {"seed": 42, "beta": 1.0, "logvar_range": [-30.0, 20.0], "tolerance": 0.5, "lam_factor": 1.01}


def list_presets() -> list[str]:
    """Names of the built-in presets (``gq_model/presets/*.yaml`` without the extension)."""
    folder = resources.files("gq_model") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_config(name: str) -> dict[str, Any]:
    """Parsed config of a built-in preset, e.g. ``preset_config("sd3unet_gq_0.25")``."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if stem not in list_presets():
        raise ValueError(f"unknown GQ preset {name!r}; available: {', '.join(list_presets())}")
    text = (resources.files("gq_model") / "presets" / f"{stem}.yaml").read_text(encoding="utf-8")
    return _parse(_to_container(text, stem), source=stem)


def load_reference_config(spec: str | os.PathLike | Mapping) -> dict[str, Any]:
    """Parse a GQ autoencoder config given as a local path, an fsspec URL, YAML text or a mapping.

    A bare preset name (``"bsqvit_gq_0.50"``) also works when no file of that name exists.
    Raises ``ValueError`` with the reason when the input is not a GQ autoencoder config.
    """
    if isinstance(spec, (Mapping, DictConfig)):
        return _parse(_to_container(spec, "<mapping>"), source="<mapping>")
    text_spec = os.fspath(spec)
    if isinstance(text_spec, bytes):
        text_spec = text_spec.decode("utf-8")
    if "\n" in text_spec:
        return _parse(_to_container(text_spec, "<yaml text>"), source="<yaml text>")
    if "://" in text_spec or os.path.exists(text_spec):
        try:
            with fsspec.open(text_spec, "r", encoding="utf-8") as f:
                text = f.read()
        except (FileNotFoundError, IsADirectoryError) as e:
            raise ValueError(f"cannot read GQ config {text_spec!r}: {e}") from e
        return _parse(_to_container(text, text_spec), source=text_spec)
    stem = text_spec[: -len(".yaml")] if text_spec.endswith(".yaml") else text_spec
    if stem in list_presets():
        return preset_config(stem)
    if text_spec.endswith((".yaml", ".yml")):
        raise ValueError(f"no GQ config file or preset named {text_spec!r} (presets: {', '.join(list_presets())})")
    # A single line: treat as inline YAML (e.g. "{model: ...}"); anything else is a missing file.
    return _parse(_to_container(text_spec, "<yaml text>"), source="<yaml text>")


def _to_container(spec: str | Mapping, source: str) -> dict[str, Any]:
    """YAML text or mapping -> plain dict with every ``${...}`` interpolation resolved."""
    try:
        if isinstance(spec, str):
            # PyYAML first: OmegaConf.create() treats a non-mapping string as a dotlist/scalar.
            loaded = yaml.safe_load(spec)
            if not isinstance(loaded, dict):
                raise ValueError(
                    f"{source}: not a GQ autoencoder config (expected a YAML mapping or an existing file/URL, "
                    f"got {type(loaded).__name__})"
                )
            cfg = OmegaConf.create(loaded)
        else:
            cfg = OmegaConf.create(dict(spec)) if not isinstance(spec, DictConfig) else spec
        return OmegaConf.to_container(cfg, resolve=True)
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: not valid YAML: {e}") from e
    except OmegaConfBaseException as e:
        raise ValueError(f"{source}: cannot resolve the config: {e}") from e


def _target_key(target: Any) -> tuple[str, str] | None:
    """``"pit.modules.unet.Encoder"`` -> ``("unet", "Encoder")`` (the last two dotted parts)."""
    if not isinstance(target, str) or "." not in target:
        return None
    module, cls = target.rsplit(".", 1)
    return module.rsplit(".", 1)[-1], cls


def _section(params: Mapping, key: str, source: str) -> tuple[str, dict]:
    section = params.get(key)
    if not isinstance(section, Mapping) or "target" not in section:
        raise ValueError(f"{source}: not a GQ autoencoder config: missing model.params.{key}.target")
    sub = section.get("params") or {}
    if not isinstance(sub, Mapping):
        raise ValueError(f"{source}: model.params.{key}.params must be a mapping")
    return section["target"], dict(sub)


def _model_params(cfg: Mapping, source: str) -> Mapping:
    """Accept a full config (``model.params``), a bare model section (``params``) or the params itself."""
    for candidate in (cfg.get("model"), cfg):
        if isinstance(candidate, Mapping):
            if isinstance(candidate.get("params"), Mapping) and "encoder_config" in candidate["params"]:
                return candidate["params"]
            if "encoder_config" in candidate:
                return candidate
    raise ValueError(f"{source}: not a GQ autoencoder config: no model.params.encoder_config")


def _pair(value: Any, name: str, source: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{source}: {name} must be a [lo, hi] pair, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not lo < hi:
        raise ValueError(f"{source}: {name} must satisfy lo < hi, got {value!r}")
    return [lo, hi]


def _parse(cfg: Mapping, source: str) -> dict[str, Any]:
    params = _model_params(cfg, source)

    enc_target, encoder = _section(params, "encoder_config", source)
    dec_target, decoder = _section(params, "decoder_config", source)
    arch_entry = _ARCH_TARGETS.get(_target_key(enc_target))
    if arch_entry is None:
        known = ", ".join(f"...{m}.{c}" for m, c in _ARCH_TARGETS)
        raise ValueError(f"{source}: unknown encoder target {enc_target!r} (supported: {known})")
    arch, expected_decoder = arch_entry
    if _target_key(dec_target) != expected_decoder:
        raise ValueError(
            f"{source}: decoder target {dec_target!r} does not match the {arch} encoder "
            f"(expected ...{expected_decoder[0]}.{expected_decoder[1]})"
        )
    check_model_options(arch, encoder, f"{source}: encoder_config")
    check_model_options(arch, decoder, f"{source}: decoder_config")
    _check_vf_options(params, source)
    if not encoder.get("double_z", True):
        raise ValueError(f"{source}: GQ needs double_z=true (the quantizer uses both mu and log-variance)")

    reg_target, reg = _section(params, "regularizer_config", source)
    layout = _REGULARIZERS.get(_target_key(reg_target))
    if layout is None:
        raise ValueError(
            f"{source}: regularizer {reg_target!r} is not a Gaussian Quant regularizer "
            "(expected ...gaussian.GaussianQuantRegularizer or ...gaussian.GaussianQuantRegularizer2)"
        )
    if layout == "strided":
        size_key, group_key = "n_samples", "group"
        fmt = reg.get("format")
        group_default = 1
    else:
        size_key, group_key = "codebook_size", "dim"
        dim_idx = reg.get("dim_idx", 1)
        fmt = {1: "bchw", 2: "blc", -1: "blc"}.get(dim_idx)
        if fmt is None:
            raise ValueError(f"{source}: unsupported GaussianQuantRegularizer2 dim_idx={dim_idx!r}")
        group_default = None
    if size_key not in reg:
        raise ValueError(f"{source}: regularizer_config.params.{size_key} (codebook size) is missing")
    if fmt not in ("bchw", "blc"):
        raise ValueError(f"{source}: regularizer format must be 'bchw' or 'blc', got {fmt!r}")
    if fmt != _ARCH_FORMAT[arch]:
        raise ValueError(f"{source}: format {fmt!r} does not fit the {arch} encoder (expects {_ARCH_FORMAT[arch]!r})")
    group = reg.get(group_key, group_default)
    if group is None:
        raise ValueError(f"{source}: regularizer_config.params.{group_key} (group size) is missing")

    codebook_size, group = int(reg[size_key]), int(group)
    z_channels = int(encoder.get("z_channels", 0))
    if codebook_size < 2 or group < 1:
        raise ValueError(f"{source}: invalid codebook size {codebook_size} / group {group}")
    if z_channels % group:
        raise ValueError(f"{source}: group {group} does not divide z_channels {z_channels}")

    clamp = params.get("clamp_range")
    return {
        "arch": arch,
        "encoder": encoder,
        "decoder": decoder,
        "codebook_size": codebook_size,
        "group": group,
        "seed": int(reg.get("seed", _DEFAULTS["seed"])),
        "beta": float(reg.get("beta", _DEFAULTS["beta"])),
        "logvar_range": _pair(reg.get("logvar_range", _DEFAULTS["logvar_range"]), "logvar_range", source),
        "tolerance": float(reg.get("tolerance", _DEFAULTS["tolerance"])),
        "lam_factor": float(reg.get("lam_factor", _DEFAULTS["lam_factor"])),
        "layout": layout,
        "format": fmt,
        "clamp_range": None if clamp is None else _pair(clamp, "clamp_range", source),
        "source": source,
    }
