"""The training loop in one process (jobs/training/loop.py): TDC convergence, every loss term wired through a
DeepSpeed engine, corrupt data, the plain-PyTorch engine, configs and CLI. CPU, tiny models, one thread."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), ".cache", "torch_extensions"))

from gq_model import GQModel  # noqa: E402
from jobs.training.config import build_gq_config, load_config, tdc_settings  # noqa: E402
from jobs.training.loop import train  # noqa: E402
from tests.helpers import read_step_metrics  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "train_tiny.yaml")


def metrics(out_dir: str) -> list[dict]:
    """Per-step training records in step order."""
    rows = read_step_metrics(out_dir)
    return [rows[k] for k in sorted(rows)]


def _tiny_model(size: int = 16, ch_mult=(1, 2), z: int = 4) -> dict:
    return {"arch": "unet", "encoder": {"ch": 32, "out_ch": 3, "ch_mult": list(ch_mult), "num_res_blocks": 1,
                                       "attn_resolutions": [], "dropout": 0.0, "resolution": size, "in_channels": 3,
                                       "z_channels": z, "double_z": True}}


def test_tdc_brings_mean_group_kl_into_the_band(tmp_path):
    """K=2^6, m=4: through the real loop (DeepSpeed, one process) the mean KL per group settles in 6 +- 0.5 bits."""
    out = str(tmp_path / "tdc")
    cfg = {
        "model": {**_tiny_model(16, (1, 2), 4), "codebook_size": 64, "group": 4},
        "loss": {"perceptual_weight": 0.0, "logvar_init": -3.0, "disc": {"enabled": False},
                 "tdc": {"tolerance": 0.5, "lam_factor": 1.03}},
        "optim": {"lr": 2e-3},
        "data": {"train": "skimage:", "image_size": 16, "resize": 48, "crop": "random", "flip": True, "repeat": 8,
                 "holdout": 2, "batch_size": 16, "num_workers": 0},
        "deepspeed": {"enabled": True, "zero_stage": 0},
        "run": {"out_dir": out, "max_steps": 120, "ckpt_every": 0, "log_every": 40, "image_every": 0,
                "progress": False, "tensorboard": False, "export_bundle": False, "threads": 1},
    }
    train(cfg)
    rows = metrics(out)
    assert len(rows) == 120
    bits = np.array([r["bits_mean"] for r in rows])
    target, tol = 6.0, 0.5
    assert bits[:5].mean() < target - tol  # starts far below the band ...
    window = bits[70:120].mean()  # ... and within 70 generator steps its running mean is inside it
    assert target - tol <= window <= target + tol, f"mean KL {window:.2f} bits not in [{target - tol}, {target + tol}]"
    # the controllers moved once per generator step: 120 multiplicative updates of 1.03 at most
    lam = np.array([r["lam"] for r in rows])
    ratios = lam[1:] / lam[:-1]
    assert np.allclose(np.minimum(ratios, 1 / ratios), 1 / 1.03, rtol=1e-9)


def _write_images(folder, n: int, size=(40, 36)) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = (rng.random((size[1] + i, size[0], 3)) * 255).astype(np.uint8)
        Image.fromarray(a).save(os.path.join(folder, f"im{i:02d}." + ["png", "jpg", "webp"][i % 3]))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_every_loss_term_bf16_zero1_accumulation_and_corrupt_data(tmp_path, caplog):
    """LPIPS (random weights in the published formats), PatchGAN from step 0, VF alignment with a stand-in feature
    model, bf16, ZeRO-1, gradient accumulation and clipping, a DataLoader worker, and a corrupt file in the data."""
    from tests.model_helpers import StandInFeatureModel, write_lpips_files

    imgs = tmp_path / "imgs"
    _write_images(imgs, 9)
    (imgs / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    vgg, lin = write_lpips_files(tmp_path)
    torch.jit.script(StandInFeatureModel(dim=24, patch=8)).save(str(tmp_path / "feat.pt"))
    out = str(tmp_path / "run")
    caplog.set_level(logging.WARNING, logger="gq.train")
    summary = train(TINY, [f"run.out_dir={out}", "run.max_steps=3", "run.ckpt_every=2", "run.image_every=2",
                           "run.log_every=1", "run.progress=false", "run.threads=1", f"data.train={imgs}",
                           "data.repeat=1", "data.batch_size=4", "data.holdout=2", "data.num_workers=1",
                           "deepspeed.zero_stage=1", "deepspeed.precision=bf16", "deepspeed.grad_accum=2",
                           "deepspeed.grad_clip=1.0", "loss.perceptual_weight=1.0", f"loss.lpips.vgg_path={vgg}",
                           f"loss.lpips.lin_path={lin}",
                           "loss.vf.enabled=true", f"loss.vf.model={tmp_path / 'feat.pt'}", "loss.vf.input_size=32"])
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for k in ("rec", "lpips", "nll", "kl", "g_loss", "d_weight", "loss_d", "vf_loss", "vf_weight", "lam"):
            assert np.isfinite(r[k]), k
        assert r["lpips"] > 0 and r["d_weight"] > 0 and r["vf_weight"] > 0
    # 3 steps x 2 micro-batches over 2 batches per epoch: every epoch reads corrupt.jpg once
    assert rows[-1]["corrupt_images"] == 3
    assert any("skipped unreadable image" in m and "corrupt.jpg" in m for m in caplog.messages)
    assert os.path.isfile(os.path.join(out, "images", "step_00000002.png"))
    assert any(f.startswith("events.") for f in os.listdir(os.path.join(out, "tensorboard")))
    # bf16 ZeRO-1 checkpoint -> fp32 bundle that tokenizes
    model = GQModel.from_pretrained(summary["bundle"])
    assert model.tokenize(torch.rand(1, 3, 32, 32) * 2 - 1).shape == (1, 1, 8, 8)


def test_plain_engine_in_memory_images_and_export(tmp_path):
    """deepspeed.enabled=false runs the same loop on plain PyTorch; in-memory images; export from its checkpoint."""
    from jobs.export import load_model_from_zero_checkpoint

    rng = np.random.default_rng(1)
    images = [(rng.random((30, 34, 3)) * 255).astype(np.uint8) for _ in range(6)]
    out = str(tmp_path / "plain")
    summary = train(TINY, [f"run.out_dir={out}", "run.max_steps=2", "run.ckpt_every=1", "run.image_every=0",
                           "run.progress=false", "run.threads=1", "deepspeed.enabled=false", "data.holdout=1",
                           "data.repeat=1", "data.batch_size=2", "run.keep_last=1"], train_images=images)
    assert summary["step"] == 2
    assert sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step_")) == \
        ["step_00000002"]  # keep_last pruned step 1
    m = load_model_from_zero_checkpoint(out)
    b = GQModel.from_pretrained(summary["bundle"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(m.tokenize(x), b.tokenize(x))


def test_bf16_zero0_export_takes_the_fp32_master_weights(tmp_path):
    """At ZeRO-0 with bf16 the module holds bf16 weights; export must give the optimizer's fp32 masters."""
    from jobs.export import load_model_from_zero_checkpoint

    rng = np.random.default_rng(2)
    images = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(5)]
    out = str(tmp_path / "bf16")
    train(TINY, [f"run.out_dir={out}", "run.max_steps=2", "run.ckpt_every=2", "run.image_every=0",
                 "run.progress=false", "run.threads=1", "deepspeed.zero_stage=0", "deepspeed.precision=bf16",
                 "data.holdout=1", "data.repeat=1", "data.batch_size=2", "loss.disc.enabled=false"],
          train_images=images)
    ckpt = torch.load(os.path.join(out, "checkpoints", "step_00000002", "mp_rank_00_model_states.pt"),
                      map_location="cpu", weights_only=False)
    params = [k for k in ckpt["module"] if k not in set(ckpt["buffer_names"])]
    masters = dict(zip(params, (t for g in ckpt["optimizer"]["fp32_groups"] for t in g)))
    model = load_model_from_zero_checkpoint(out)
    exported = model.state_dict()
    checked = 0
    for name, master in masters.items():
        if name.startswith("model."):
            got = exported[name[len("model."):]]
            assert got.dtype == torch.float32 and torch.equal(got, master.float()), name
            checked += 1
    assert checked > 50
    # and they are really fp32: not all representable in bf16
    assert any(not torch.equal(v, v.bfloat16().float()) for v in masters.values())


def test_cosine_learning_rate_decay(tmp_path):
    from jobs.training.loop import lr_factor

    kw = dict(warmup=0, decay="cosine", total=10, min_ratio=0.1)
    assert lr_factor(0, **kw) == 1.0 and lr_factor(10, **kw) == pytest.approx(0.1)
    assert lr_factor(5, **kw) == pytest.approx(0.55) and lr_factor(20, **kw) == pytest.approx(0.1)
    assert lr_factor(1, warmup=4, decay="constant", total=10, min_ratio=0.0) == 0.5
    rng = np.random.default_rng(3)
    images = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(5)]
    out = str(tmp_path / "cos")
    train(TINY, [f"run.out_dir={out}", "run.max_steps=4", "run.log_every=1", "run.image_every=0", "run.progress=false",
                 "run.threads=1", "deepspeed.enabled=false", "data.holdout=1", "data.repeat=2", "data.batch_size=2",
                 "optim.lr=0.001", "optim.decay=cosine", "optim.min_lr_ratio=0.2", "loss.disc.enabled=false"],
          train_images=images)
    lrs = [r["lr"] for r in metrics(out)]  # the rate each step used
    assert lrs == pytest.approx([0.001 * lr_factor(s, warmup=0, decay="cosine", total=4, min_ratio=0.2)
                                 for s in range(4)])
    with pytest.raises(ValueError, match="optim.decay"):
        train(TINY, [f"run.out_dir={out}2", "optim.decay=linear"])


def test_demo_sized_config_runs_single_process(tmp_path):
    """The layout the built-in demo model will use (UNet f=8, 16 latent channels, K=2^16, m=16, small width) on
    scikit-image samples with random crops: a couple of steps from one process."""
    out = str(tmp_path / "demo")
    summary = train(os.path.join(REPO, "configs", "train_demo_cpu.yaml"),
                    [f"run.out_dir={out}", "run.max_steps=2", "run.image_every=2", "run.progress=false",
                     "run.threads=1", "data.batch_size=2", "data.image_size=32", "data.resize=64",
                     "model.encoder.resolution=32"])
    model = GQModel.from_pretrained(summary["bundle"])
    assert model.config.codebook_size == 65536 and model.config.group == 16 and model.downsample_factor == 8
    assert model.tokenize(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 4, 4)


def test_config_validation_and_overrides(tmp_path):
    cfg = load_config(TINY, ["run.max_steps=7", "+deepspeed.config.zero_optimization.stage3_param_persistence_threshold=0"])
    assert cfg.run.max_steps == 7 and cfg.deepspeed.config.zero_optimization.stage3_param_persistence_threshold == 0
    with pytest.raises(ValueError, match="unknown training config key 'run.max_step'"):
        load_config(TINY, ["run.max_step=7"])
    with pytest.raises(ValueError, match="unknown training config key 'loss.disc.ndfs'"):
        load_config({"loss": {"disc": {"ndfs": 3}}})
    with pytest.raises(ValueError, match="zero_stage"):
        load_config(TINY, ["deepspeed.zero_stage=4"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(TINY, ["run.max_steps"])


def test_reference_recipe_config():
    cfg = load_config(os.path.join(REPO, "configs", "train_sd3unet_gq_0.25.yaml"))
    gq = build_gq_config(cfg)
    assert (gq.arch, gq.codebook_size, gq.group, gq.encoder["ch"], gq.encoder["ch_mult"]) == \
        ("unet", 65536, 16, 128, [1, 2, 4, 4])
    assert gq.decoder == gq.encoder
    l, o = cfg.loss, cfg.optim
    assert (l.perceptual_weight, l.kl_weight, l.disc.weight, l.disc.ndf, l.disc.n_layers, l.disc.loss) == \
        (1.0, 0.1, 0.75, 160, 6, "hinge")
    assert l.learn_logvar and l.disc.actnorm and tdc_settings(cfg) == {"tolerance": 0.5, "lam_factor": 1.01}
    assert o.lr == 1e-4 and list(o.betas) == [0.9, 0.999] and o.weight_decay == 0
    assert cfg.data.image_size == 256 and cfg.data.batch_size == 16 and cfg.deepspeed.precision == "fp32"
    # a preset with a partial override changes encoder and decoder together
    small = build_gq_config(load_config(os.path.join(REPO, "configs", "train_sd3unet_gq_0.25.yaml"),
                                        ["model.encoder.ch=32"]))
    assert small.encoder["ch"] == 32 and small.decoder["ch"] == 32 and small.encoder["z_channels"] == 16


def test_tdc_settings_come_from_the_reference_yaml_unless_overridden(tmp_path):
    from tests.model_helpers import SMALL_REFERENCE_YAML

    yaml_path = tmp_path / "ref.yaml"
    yaml_path.write_text(SMALL_REFERENCE_YAML.replace("params: {format: bchw, group: 8,",
                                                      "params: {format: bchw, group: 8, tolerance: 0.25,"))
    cfg = {"model": {"preset": str(yaml_path)}, "loss": {"tdc": {"tolerance": None, "lam_factor": None}}}
    assert tdc_settings(cfg) == {"tolerance": 0.25, "lam_factor": 1.01}
    cfg["loss"]["tdc"]["tolerance"] = 0.4
    assert tdc_settings(cfg)["tolerance"] == 0.4


def test_cli_registers_train_and_export():
    from jobs.cli import build_parser

    args = build_parser(["train", TINY, "run.max_steps=3", "--ray-workers", "2"]).parse_args(
        ["train", TINY, "run.max_steps=3", "--ray-workers", "2"])
    assert args.overrides == ["run.max_steps=3"] and args.ray_workers == 2 and callable(args.func)
    args = build_parser(["export", "ckpts", "out"]).parse_args(["export", "ckpts", "out", "--tag", "step_00000010"])
    assert (args.ckpt_dir, args.out, args.tag) == ("ckpts", "out", "step_00000010")
    # the deepspeed launcher appends --local_rank=N
    args = build_parser(["train"]).parse_args(["train", "--local_rank=1", TINY])
    assert args.local_rank == 1 and args.config == TINY
