"""Training configuration: a YAML file merged over :data:`DEFAULTS`, plus ``section.key=value`` overrides.

The model section is either a built-in preset / reference YAML (``model.preset``) or an explicit GQConfig
(``arch``, ``encoder``, ``decoder`` (defaults to the encoder's dict), ``codebook_size``, ``group``, ...); explicit keys
override the preset's. Everything else configures the loss, optimizer, data, DeepSpeed and the run. See
docs/training.md for every key.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import fsspec
import yaml
from omegaconf import DictConfig, OmegaConf

from gq_model.config import GQConfig

__all__ = ["DEFAULTS", "load_config", "to_container", "build_gq_config", "tdc_settings", "tdc_variant", "validate",
           "TrainSettings", "train_settings"]

DEFAULTS: dict[str, Any] = {
    "model": {
        "preset": None,          # built-in preset name or reference YAML path/URL; explicit keys below override it
        "arch": None, "encoder": None, "decoder": None, "codebook_size": None, "group": None,
        "seed": None, "beta": None, "logvar_range": None, "layout": None, "clamp_range": None,
    },
    "loss": {
        "rec": "l1",                 # l1 | l2, elementwise, summed per image like the reference
        "perceptual_weight": 1.0,    # LPIPS-VGG, as the reference; 0 turns it off (only ever on purpose)
        # explicit weight files (local/fsspec); null: gq's cache, else a verified download (gq weights fetch lpips-vgg)
        "lpips": {"vgg_path": None, "lin_path": None},   # torchvision vgg16-397923af.pth + LPIPS v0.1 vgg.pth
        "learn_logvar": True,
        "logvar_init": 0.0,
        "kl_weight": 0.1,
        # gq: the reference's GaussianQuantRegularizer (decoder sees mu + sigma*eps, KL summed per image);
        # gq2: its GaussianQuantRegularizer2 (decoder sees the quantized latent through a straight-through estimator,
        # KL averaged over groups; needs model.layout=contiguous)
        "regularizer": "gq",
        "tdc": {"tolerance": None, "lam_factor": None,  # null: the model preset's (the reference's 0.5, 1.01)
                "lam_max_only_grows": False},           # true: the release-era bug (lam_max never decreases)
        "disc": {
            "enabled": True, "start": 10001, "weight": 0.75, "max_weight": 1.0e4, "loss": "hinge",
            "ndf": 160, "n_layers": 6, "actnorm": True, "lr": None, "betas": None,
        },
        "vf": {
            "enabled": False, "model": None, "weights": None, "model_kwargs": {}, "weight": 0.2, "adaptive": True,
            "max_weight": 1.0e8, "distmat_margin": 0.25, "cos_margin": 0.5, "distmat_weight": 1.0,
            "cos_weight": 1.0, "input_size": 224, "feature_dim": None,
        },
    },
    "optim": {"lr": 1.0e-4, "betas": [0.9, 0.999], "eps": 1.0e-8, "weight_decay": 0.0, "warmup_steps": 0,
              "decay": "constant", "min_lr_ratio": 0.0},
    "data": {
        "train": None,            # folder / glob / brace pattern / list of them / "skimage:" (fsspec URLs allowed)
        "val": None,              # optional held-out source; default: `holdout` images split off `train`
        "holdout": 16,
        "image_column": "image",  # Parquet column holding encoded image bytes
        "image_size": 256,
        "resize": None,           # shorter side before cropping (default image_size; 0 = no resize)
        "crop": "center",         # center | random
        "preprocess": "gq",       # gq | reference: decode/resize policy, as gq tokenize --preprocess (docs/eval.md)
        "flip": False,
        "repeat": 1,              # virtual epoch = every image `repeat` times (tiny datasets with random crops)
        "batch_size": 16,         # per rank, per micro-step
        "num_workers": 2,
        "shuffle": True,
        "seed": 23,
        "storage_options": {},    # fsspec options (e.g. endpoint_url, key, secret)
    },
    "deepspeed": {
        "enabled": True,          # false: the same loop on plain PyTorch (benchmark baseline, quick CPU runs)
        "zero_stage": 0,
        "precision": "fp32",      # fp32 | bf16
        "grad_accum": 1,
        "grad_clip": 0.0,
        "backend": "auto",        # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
        "config": {},             # raw DeepSpeed config merged over the generated one (both engines)
        "disc_zero_stage": None,  # default: zero_stage, at most 2 (see Trainer.setup)
    },
    "run": {
        "out_dir": "runs/gq",
        "max_steps": 1000,        # generator optimizer steps
        "seed": 23,
        "ckpt_every": 5000,
        "keep_last": 0,           # 0 keeps every checkpoint
        "resume": "auto",         # auto (latest under out_dir/checkpoints if any) | never | <checkpoint dir or tag dir>
        "log_every": 10,
        "image_every": 1000,
        "n_images": 8,
        "progress": True,
        "tensorboard": True,
        "export_bundle": True,    # write out_dir/bundle (a GQModel bundle) from the final checkpoint
        "threads": 0,             # torch intra-op threads per rank (0 = leave torch's default)
        "crash_at_step": None,    # fault injection for tests: SIGKILL this process right after that step
    },
}

_MODEL_KEYS = ("arch", "encoder", "decoder", "codebook_size", "group", "seed", "beta", "logvar_range", "layout",
               "clamp_range")


def _read_yaml(path: str) -> dict[str, Any]:
    with fsspec.open(os.fspath(path), "r", encoding="utf-8") as f:
        data = yaml.safe_load(f.read()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a training config must be a YAML mapping")
    return data


def _check_keys(cfg: Mapping[str, Any], defaults: Mapping[str, Any], where: str = "") -> None:
    """Unknown keys are errors (typos would otherwise be silently ignored); free-form dicts are exempt."""
    free = {"model.encoder", "model.decoder", "deepspeed.config", "data.storage_options", "loss.vf.model_kwargs"}
    for k, v in cfg.items():
        path = f"{where}{k}"
        if k not in defaults:
            raise ValueError(f"unknown training config key {path!r}")
        if isinstance(v, Mapping) and isinstance(defaults[k], Mapping) and path not in free:
            _check_keys(v, defaults[k], path + ".")


def load_config(spec: str | os.PathLike | Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> DictConfig:
    """DEFAULTS <- YAML file (path/URL) or mapping <- ``a.b=value`` overrides; validated."""
    user: dict[str, Any] = {}
    if isinstance(spec, (str, os.PathLike)):
        user = _read_yaml(os.fspath(spec))
    elif isinstance(spec, Mapping):
        user = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else copy.deepcopy(dict(spec))
    _check_keys(user, DEFAULTS)
    cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.create(user))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like section.key=value, got {bad}")
        dot = OmegaConf.from_dotlist([o[1:] if o.startswith("+") else o for o in overrides])  # Hydra-style '+' ok
        _check_keys(OmegaConf.to_container(dot), DEFAULTS)
        cfg = OmegaConf.merge(cfg, dot)
    validate(cfg)
    return cfg


def to_container(cfg: DictConfig | Mapping) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else copy.deepcopy(dict(cfg))


def _model_dict(cfg: DictConfig | Mapping) -> dict[str, Any]:
    model = to_container(cfg)["model"]
    base: dict[str, Any] = {}
    if model.get("preset"):
        from gq_model.reference_config import load_reference_config

        base = load_reference_config(model["preset"])
    enc_override = model.get("encoder") or {}
    for key in _MODEL_KEYS:
        if model.get(key) is None:
            continue
        if key in ("encoder", "decoder") and isinstance(base.get(key), dict):
            base[key] = {**base[key], **model[key]}  # partial override of the preset's constructor parameters
        else:
            base[key] = model[key]
    if model.get("preset") and enc_override and not model.get("decoder") and isinstance(base.get("decoder"), dict):
        base["decoder"] = {**base["decoder"], **enc_override}  # the decoder shares the encoder's parameters
    return base


def build_gq_config(cfg: DictConfig | Mapping) -> GQConfig:
    """The GQConfig the run trains (preset, then explicit keys; decoder defaults to the encoder's parameters)."""
    d = _model_dict(cfg)
    if not d.get("arch") or not d.get("encoder"):
        raise ValueError("model: set model.preset or model.arch + model.encoder (+ codebook_size, group)")
    if not d.get("decoder"):
        d["decoder"] = dict(d["encoder"])
    keys = ("arch", "encoder", "decoder", "codebook_size", "group", "seed", "beta", "logvar_range", "layout",
            "clamp_range", "source")
    return GQConfig(**{k: d[k] for k in keys if k in d and d[k] is not None})


def tdc_settings(cfg: DictConfig | Mapping) -> dict[str, float]:
    """TDC tolerance and controller factor: the loss.tdc section, falling back to the model preset's values."""
    d = _model_dict(cfg)
    tdc = to_container(cfg)["loss"]["tdc"]

    def pick(key: str, default: float) -> float:
        for value in (tdc.get(key), d.get(key), default):
            if value is not None:
                return float(value)

    return {"tolerance": pick("tolerance", 0.5), "lam_factor": pick("lam_factor", 1.01)}


def tdc_variant(cfg: DictConfig | Mapping) -> dict[str, Any]:
    """The TDCRegularizer keywords that ``loss.regularizer`` and ``loss.tdc.lam_max_only_grows`` select (the channel
    layout comes from the model: :func:`validate` checks it is the one the regularizer needs)."""
    from gq_model.tdc import TDC_VARIANTS

    loss = to_container(cfg)["loss"]
    name = loss.get("regularizer") or "gq"
    if name not in TDC_VARIANTS:
        raise ValueError(f"loss.regularizer must be one of {sorted(TDC_VARIANTS)}, got {name!r}")
    only_grows = (loss.get("tdc") or {}).get("lam_max_only_grows", False)
    if not isinstance(only_grows, bool):
        raise ValueError(f"loss.tdc.lam_max_only_grows must be true or false, got {only_grows!r}")
    kwargs = {k: v for k, v in TDC_VARIANTS[name].items() if k != "layout"}
    kwargs["lam_max_only_grows"] = only_grows
    return kwargs


def validate(cfg: DictConfig) -> None:
    """Cheap consistency checks with messages that say what to change."""
    from gq_model.tdc import TDC_VARIANTS

    gc = build_gq_config(cfg)
    tdc_variant(cfg)
    if cfg.loss.regularizer == "gq2" and gc.layout != TDC_VARIANTS["gq2"]["layout"]:
        raise ValueError("loss.regularizer=gq2 (the reference's GaussianQuantRegularizer2) groups channels "
                         f"contiguously, but the model's layout is {gc.layout!r}: set model.layout=contiguous")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0..3, got {cfg.deepspeed.zero_stage}")
    if cfg.deepspeed.disc_zero_stage not in (None, 0, 1, 2, 3):
        raise ValueError(f"deepspeed.disc_zero_stage must be 0..3, got {cfg.deepspeed.disc_zero_stage}")
    if cfg.deepspeed.precision not in ("fp32", "bf16"):
        raise ValueError(f"deepspeed.precision must be fp32 or bf16, got {cfg.deepspeed.precision!r}")
    if int(cfg.deepspeed.grad_accum) < 1:
        raise ValueError("deepspeed.grad_accum must be >= 1")
    if cfg.data.get("preprocess", "gq") not in ("gq", "reference"):
        raise ValueError(f"data.preprocess must be gq or reference, got {cfg.data.preprocess!r}")
    if cfg.data.crop not in ("center", "random"):
        raise ValueError(f"data.crop must be center or random, got {cfg.data.crop!r}")
    if int(cfg.data.batch_size) < 1 or int(cfg.data.image_size) < 1:
        raise ValueError("data.batch_size and data.image_size must be positive")
    if cfg.loss.rec not in ("l1", "l2"):
        raise ValueError(f"loss.rec must be l1 or l2, got {cfg.loss.rec!r}")
    if float(cfg.loss.perceptual_weight) < 0:
        raise ValueError(f"loss.perceptual_weight must be >= 0 (0 turns LPIPS off), got {cfg.loss.perceptual_weight}")
    if cfg.loss.disc.loss not in ("hinge", "vanilla"):
        raise ValueError(f"loss.disc.loss must be hinge or vanilla, got {cfg.loss.disc.loss!r}")
    if cfg.loss.vf.enabled and not cfg.loss.vf.model:
        raise ValueError("loss.vf.enabled needs loss.vf.model (a TorchScript file or 'package.module:factory')")
    if cfg.loss.vf.enabled and build_gq_config(cfg).arch != "unet":
        raise ValueError("the VF alignment term is implemented for the UNet (bchw) latents only")
    if cfg.optim.decay not in ("constant", "cosine"):
        raise ValueError(f"optim.decay must be constant or cosine, got {cfg.optim.decay!r}")
    if not 0.0 <= float(cfg.optim.min_lr_ratio) <= 1.0:
        raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    if int(cfg.run.max_steps) < 0:
        raise ValueError("run.max_steps must be >= 0")


# ------------------------------------------------------------------------------------------------ typed view
# The trainer reads its scalars from these, built once from the validated DictConfig, instead of casting
# ``int(cfg.run.max_steps)`` at each use. Free-form sections (``deepspeed.config``, the model) and the loss modules
# still read the DictConfig itself.
@dataclass(frozen=True)
class RunSettings:
    out_dir: str
    max_steps: int
    seed: int
    ckpt_every: int
    keep_last: int
    resume: str
    log_every: int
    image_every: int
    n_images: int
    progress: bool
    tensorboard: bool
    export_bundle: bool
    threads: int
    crash_at_step: int | None


@dataclass(frozen=True)
class DataSettings:
    train: Any
    val: Any
    holdout: int
    image_column: str
    image_size: int
    resize: int | None
    crop: str
    flip: bool
    repeat: int
    batch_size: int
    num_workers: int
    shuffle: bool
    seed: int
    storage_options: dict[str, Any]
    preprocess: str = "gq"   # gq | reference (gq_pipeline.preprocess.PREPROCESS_POLICIES)


@dataclass(frozen=True)
class OptimSettings:
    lr: float
    betas: Any
    warmup_steps: int
    decay: str
    min_lr_ratio: float


@dataclass(frozen=True)
class DiscSettings:
    enabled: bool
    ndf: int
    n_layers: int
    actnorm: bool
    lr: float  # loss.disc.lr, else optim.lr
    betas: Any  # loss.disc.betas, else optim.betas


@dataclass(frozen=True)
class VFSettings:
    enabled: bool
    model: Any
    weights: Any
    model_kwargs: dict[str, Any]
    input_size: int  # loss.vf.input_size, else data.image_size
    feature_dim: int | None


@dataclass(frozen=True)
class DeepSpeedSettings:
    enabled: bool
    backend: str
    zero_stage: int
    disc_zero_stage: int | None
    precision: str
    grad_accum: int


@dataclass(frozen=True)
class TrainSettings:
    run: RunSettings
    data: DataSettings
    optim: OptimSettings
    disc: DiscSettings
    vf: VFSettings
    deepspeed: DeepSpeedSettings
    learn_logvar: bool
    logvar_init: float
    perceptual_weight: float


def train_settings(cfg: DictConfig) -> TrainSettings:
    """The typed view of a config that :func:`load_config` validated."""
    r, d, o, ds, loss = cfg.run, cfg.data, cfg.optim, cfg.deepspeed, cfg.loss
    return TrainSettings(
        run=RunSettings(out_dir=str(r.out_dir), max_steps=int(r.max_steps), seed=int(r.seed),
                        ckpt_every=int(r.ckpt_every), keep_last=int(r.keep_last), resume=str(r.resume or "never"),
                        log_every=int(r.log_every), image_every=int(r.image_every), n_images=int(r.n_images),
                        progress=bool(r.progress), tensorboard=bool(r.tensorboard),
                        export_bundle=bool(r.export_bundle), threads=int(r.threads),
                        crash_at_step=None if r.crash_at_step is None else int(r.crash_at_step)),
        data=DataSettings(train=d.train, val=d.val, holdout=int(d.holdout), image_column=d.image_column,
                          image_size=int(d.image_size), resize=None if d.resize is None else int(d.resize),
                          crop=d.crop, flip=bool(d.flip), repeat=int(d.repeat), batch_size=int(d.batch_size),
                          num_workers=int(d.num_workers), shuffle=bool(d.shuffle), seed=int(d.seed),
                          storage_options=OmegaConf.to_container(d.storage_options) if d.storage_options else {},
                          preprocess=str(d.get("preprocess", "gq"))),
        optim=OptimSettings(lr=float(o.lr), betas=o.betas, warmup_steps=int(o.warmup_steps), decay=str(o.decay),
                            min_lr_ratio=float(o.min_lr_ratio)),
        disc=DiscSettings(enabled=bool(loss.disc.enabled), ndf=int(loss.disc.ndf), n_layers=int(loss.disc.n_layers),
                          actnorm=bool(loss.disc.actnorm), lr=float(loss.disc.lr or o.lr),
                          betas=loss.disc.betas or o.betas),
        vf=VFSettings(enabled=bool(loss.vf.enabled), model=loss.vf.model, weights=loss.vf.weights,
                      model_kwargs=to_container(loss.vf.model_kwargs or {}),
                      input_size=int(loss.vf.input_size or d.image_size),
                      feature_dim=int(loss.vf.feature_dim) if loss.vf.feature_dim else None),
        deepspeed=DeepSpeedSettings(enabled=bool(ds.enabled), backend=ds.backend, zero_stage=int(ds.zero_stage),
                                    disc_zero_stage=None if ds.disc_zero_stage is None else int(ds.disc_zero_stage),
                                    precision=str(ds.precision), grad_accum=int(ds.grad_accum)),
        learn_logvar=bool(loss.learn_logvar), logvar_init=float(loss.logvar_init),
        perceptual_weight=float(loss.perceptual_weight))
