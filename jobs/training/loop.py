"""The training loop: one loop for every launcher (single process, torchrun, the deepspeed launcher, Ray Train).

Per generator step (and per micro-batch when accumulating gradients):

1. **generator**: the discriminator's parameters are frozen (requires_grad off), the generator engine encodes the
   batch, decodes mu + sigma * eps (``loss.regularizer=gq2``: its codewords, through a straight-through estimator),
   and minimizes nll + kl_weight * TDC (+ adaptive GAN and VF terms); TDC's
   controllers are updated once per generator optimizer step (``update=True`` only on the accumulation boundary),
   from statistics all-reduced across ranks, so every rank holds the same lambdas;
2. **discriminator** (from ``loss.disc.start`` on): hinge loss on (x, x_hat.detach()), its own engine and optimizer.

There is no ``batch_idx % 2`` alternation: both steps are explicit. ActNorm is data-initialized before the engines
exist, from the held-out batch every rank loads identically, then all parameters are broadcast from rank 0.
Checkpoints hold both engines (DeepSpeed-sharded), the lambdas, the step, per-rank RNG states and the data position;
a resumed run continues the loss curve of an uninterrupted one (tests/test_train_distributed.py checks this).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import signal
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from gq_model import GQModel, TDCRegularizer
from gq_model.storage import write_atomic
from gq_model.losses import NLayerDiscriminator, build_lpips, load_feature_model
from gq_model.losses.lpips import WeightsUnavailable, resolve_lpips_files
from gq_model.tdc import kl_bits_per_group
from jobs.training import checkpoint as ckpt
from jobs.training.config import TrainSettings, build_gq_config, load_config, tdc_settings, tdc_variant, \
    to_container, train_settings
from jobs.training.data import BatchStream, ImageTransform, SampleIndex, SampleReader, build_index, load_images, \
    make_loader
from jobs.training.engines import broadcast_module, make_engine, setup_distributed
from jobs.training.losses import GeneratorModule, GQLoss
from jobs.training.monitor import Monitor, codebook_stats, psnr

__all__ = ["Trainer", "train"]

log = logging.getLogger("gq.train")


def _set_requires_grad(module: torch.nn.Module | None, flag: bool) -> None:
    if module is not None:
        for p in module.parameters():
            p.requires_grad_(flag)


def _broadcast_object(obj: Any, src: int = 0) -> Any:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def lr_factor(step: int, *, warmup: int, decay: str, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier after ``step`` optimizer steps: linear warm-up over ``warmup`` steps, then constant
    (the reference recipe) or a cosine from 1 down to ``min_ratio`` at step ``total``."""
    f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if decay == "cosine" and total > 0:
        f *= min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total)))
    return f


class Trainer:
    """Build everything from a training config, then :meth:`run`. ``train_images``/``val_images``: optional
    in-memory image lists used instead of ``data.train``/``data.val``."""

    def __init__(self, cfg, train_images: Sequence[Any] | None = None, val_images: Sequence[Any] | None = None):
        self.cfg = cfg
        self.train_images, self.val_images = train_images, val_images
        self.monitor: Monitor | None = None
        self.corrupt_total_local = 0
        self._corrupt_logged = 0

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        """Build the run, in this order (seeds and collective calls depend on it): process, weights that can be
        missing, data, modules, losses, engines, resume, loader; then the loop's own RNG streams."""
        self.settings = s = train_settings(self.cfg)
        self._start_process(s)
        lpips_files = self._resolve_perceptual()  # before any data or model: missing weights stop the run here
        vf_model, vf_dim = self._build_feature_model(s.vf)  # e.g. DINOv2 without its local weight file stops here
        self.gq_config = build_gq_config(self.cfg)
        self.ga = s.deepspeed.grad_accum
        self._setup_data()
        gen, disc = self._build_modules(s, vf_dim)
        self._build_losses(lpips_files, vf_model)
        self._build_engines(s, gen, disc)
        self.step = 0
        self.batches_consumed = 0
        resumed = self._maybe_resume()
        self.monitor = Monitor(self.out_dir, self.dist.is_main, s.run.max_steps, self.step, s.run.progress,
                               s.run.tensorboard, s.run.log_every)
        self._build_loader(s.data)
        if self.dist.is_main:
            self._write_run_files()
            self._log_start(s, gen, disc, resumed)
        self._seed_loop(s.run.seed, resumed)  # last: the RNG streams the loop uses
        return self

    def _start_process(self, s: TrainSettings) -> None:
        """Threads, the distributed group, logging, the output folders and the build-time seeds."""
        if s.run.threads > 0:
            torch.set_num_threads(s.run.threads)
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*", category=FutureWarning)
        self.dist = d = setup_distributed(s.deepspeed.enabled, s.deepspeed.backend)
        _configure_logging(d.is_main)
        self.out_dir = os.path.abspath(s.run.out_dir)
        self.ckpt_root = os.path.join(self.out_dir, ckpt.CKPT_SUBDIR)
        if d.is_main:
            os.makedirs(self.ckpt_root, exist_ok=True)
        torch.manual_seed(s.run.seed)
        np.random.seed(s.run.seed)
        random.seed(s.run.seed)
        self.storage_options = s.data.storage_options

    def _build_feature_model(self, vf) -> tuple[torch.nn.Module | None, int | None]:
        """The frozen VF feature model and its feature width (probed with one blank image unless configured)."""
        if not vf.enabled:
            return None, None
        device = self.dist.device
        model = load_feature_model(vf.model, vf.weights, vf.model_kwargs, self.storage_options).to(device)
        if vf.feature_dim:
            return model, vf.feature_dim
        from gq_model.losses import feature_grid

        with torch.no_grad():
            probe = model(torch.zeros(1, 3, vf.input_size, vf.input_size, device=device))
        return model, feature_grid(probe).shape[1]

    def _build_modules(self, s: TrainSettings, vf_dim: int | None):
        """Generator (GQModel + learned log-variance + VF head) and discriminator, identical on every rank."""
        device = self.dist.device
        gen = GeneratorModule(GQModel(self.gq_config), s.learn_logvar, s.logvar_init, vf_dim).to(device)
        disc = None
        if s.disc.enabled:
            disc = NLayerDiscriminator(3, s.disc.ndf, s.disc.n_layers, s.disc.actnorm).to(device)
            if s.disc.actnorm:
                disc.init_actnorm(self.monitor_images)  # identical batch on every rank (see _setup_data)
        broadcast_module(gen)
        if disc is not None:
            broadcast_module(disc)
        return gen, disc

    def _build_losses(self, lpips_files: dict | None, vf_model) -> None:
        lpips = None
        if lpips_files is not None:
            lpips = build_lpips(resolved=lpips_files, storage_options=self.storage_options).to(self.dist.device)
        gc = self.gq_config
        self.tdc = TDCRegularizer(codebook_size=gc.codebook_size, group=gc.group, logvar_range=gc.logvar_range,
                                  layout=gc.layout, **tdc_settings(self.cfg), **tdc_variant(self.cfg)
                                  ).to(self.dist.device)
        self.loss = GQLoss(self.cfg, self.tdc, lpips, vf_model)

    def _build_engines(self, s: TrainSettings, gen, disc) -> None:
        """One engine (and optimizer) per network; the generator's with the learning-rate schedule."""
        o, cfg = s.optim, self.cfg
        factor = functools.partial(lr_factor, warmup=o.warmup_steps, decay=o.decay, total=s.run.max_steps,
                                   min_ratio=o.min_lr_ratio)
        sched_fn = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)) \
            if o.warmup_steps > 0 or o.decay != "constant" else None
        self.gen_params = [p for p in gen.parameters() if p.requires_grad]
        stage = s.deepspeed.zero_stage
        self.engine_g, _ = make_engine(gen, self.gen_params, cfg, stage, s.data.batch_size, o.lr, o.betas, sched_fn)
        self.engine_d = None
        if disc is not None:
            # The generator's loss runs the discriminator inside the generator engine's forward, and its backward
            # goes through the discriminator's weights: under ZeRO-3 those are partitioned again by then (measured:
            # "weight should have at least three dimensions" in conv2d's backward). The discriminator is small, so by
            # default it gets at most ZeRO-2 (optimizer state and gradients still partitioned).
            dstage = min(stage, 2) if s.deepspeed.disc_zero_stage is None else s.deepspeed.disc_zero_stage
            if dstage == 3:
                raise ValueError("deepspeed.disc_zero_stage=3 is not supported: the generator's backward runs through "
                                 "the discriminator's weights, which ZeRO-3 has partitioned by then; use 2 or less")
            self.engine_d, _ = make_engine(disc, list(disc.parameters()), cfg, dstage, s.data.batch_size,
                                           s.disc.lr, s.disc.betas)
        self.gen = self.engine_g.module
        self.disc = self.engine_d.module if self.engine_d is not None else None
        self._restore_codebook()
        self.dtype = torch.bfloat16 if s.deepspeed.precision == "bf16" else torch.float32
        self.gen.attach(self.loss, self.disc)  # after the engines exist: the probes' hooks run after DeepSpeed's

    def _build_loader(self, data) -> None:
        """This rank's batches, from the position a resumed run reached."""
        d = self.dist
        stream = BatchStream(self.index, self.train_ids, data.batch_size, self.train_transform, self.reader,
                             rank=d.rank, world_size=d.world_size, seed=data.seed, shuffle=data.shuffle,
                             repeat=data.repeat, start_batch=self.batches_consumed)
        self.batches_per_epoch = stream.batches_per_epoch
        self.loader = make_loader(stream, data.num_workers, seed=data.seed)

    def _log_start(self, s: TrainSettings, gen, disc, resumed: bool) -> None:
        d = self.dist
        n_g = sum(p.numel() for p in self.gen_params)
        n_d = sum(p.numel() for p in disc.parameters()) if disc is not None else 0
        log.info("GQ training: %d rank(s), ZeRO-%d, %s, generator %.2fM params, discriminator %.2fM, "
                 "%d training images (%d batches/epoch/rank), %d held-out, %s", d.world_size, s.deepspeed.zero_stage,
                 s.deepspeed.precision if s.deepspeed.enabled else "plain PyTorch", n_g / 1e6, n_d / 1e6,
                 len(self.train_ids), self.batches_per_epoch, self.monitor_images.shape[0],
                 f"resumed at step {self.step}" if resumed else "fresh start")

    def _seed_loop(self, seed: int, resumed: bool) -> None:
        """The RNG streams the loop uses: restored on resume, distinct per rank (and per step) otherwise."""
        if resumed and self._rng_state is not None:
            ckpt.restore_rng(self._rng_state)
        else:  # fresh start, or a resume on another number of ranks
            rs = seed + 100003 * (self.dist.rank + 1) + 7919 * self.step
            torch.manual_seed(rs)
            np.random.seed(rs % (2 ** 32))
            random.seed(rs)

    def _resolve_perceptual(self) -> dict | None:
        """The LPIPS-VGG weight files when ``loss.perceptual_weight > 0`` (None when it is 0, on purpose).

        Local rank 0 of every node resolves first (so a download happens once per node, into the shared cache), the
        outcome is gathered from every rank, and all ranks raise the same :class:`WeightsUnavailable` if any failed;
        then the other ranks find the files in the cache.
        """
        cfg, d = self.cfg, self.dist
        if self.settings.perceptual_weight <= 0:
            log.info("perceptual loss off: loss.perceptual_weight=%s", cfg.loss.perceptual_weight)
            return None
        lp = cfg.loss.lpips
        purpose = f"the perceptual loss, loss.perceptual_weight={cfg.loss.perceptual_weight}"

        def resolve():
            return resolve_lpips_files(lp.vgg_path, lp.lin_path, self.storage_options, purpose=purpose)

        files, error = None, None
        if d.local_rank == 0:
            try:
                files = resolve()
            except (WeightsUnavailable, FileNotFoundError) as e:
                error = str(e)
        errors = [error]
        if d.distributed and d.world_size > 1:
            errors = [None] * d.world_size
            dist.all_gather_object(errors, error)
        failed = [e for e in errors if e]
        if failed:
            raise WeightsUnavailable(error or f"(on another rank) {failed[0]}")
        return files if files is not None else resolve()

    def _setup_data(self) -> None:
        data, d = self.settings.data, self.dist
        so = self.storage_options
        self.reader = SampleReader(data.image_column, so, memory=self.train_images, preprocess=data.preprocess)
        idx = None
        if self.train_images is not None:
            idx = build_index(None, memory=self.train_images)
        elif d.is_main:
            idx = self._load_or_build_index(data.train, data.image_column, so)
        self.index: SampleIndex = idx if self.train_images is not None else _broadcast_object(idx)
        n = len(self.index)
        self.train_transform = ImageTransform(data.image_size, data.resize, data.crop, data.flip, data.preprocess)
        eval_transform = ImageTransform(data.image_size, data.resize, "center", False, data.preprocess)
        holdout = data.holdout
        all_ids = np.arange(n)
        if self.val_images is not None or data.val:
            vreader = SampleReader(data.image_column, so, memory=self.val_images, preprocess=data.preprocess)
            vidx = None
            if d.is_main or self.val_images is not None:
                vidx = build_index(data.val, data.image_column, so, memory=self.val_images)
            vidx = vidx if self.val_images is not None else _broadcast_object(vidx)
            self.train_ids = all_ids
            mon, bad = load_images(vidx, range(len(vidx)), eval_transform, vreader, limit=max(1, holdout))
            self.monitor_source = "val"
        else:
            h = min(holdout, n // 5)
            rng = np.random.default_rng([data.seed, 99])
            held = np.sort(rng.permutation(n)[:h]) if h > 0 else np.array([], dtype=np.int64)
            self.train_ids = np.setdiff1d(all_ids, held)
            if h > 0:
                mon, bad = load_images(self.index, held, eval_transform, self.reader)
                self.monitor_source = "held-out"
            else:
                mon, bad = load_images(self.index, self.train_ids, eval_transform, self.reader,
                                       limit=data.batch_size)
                self.monitor_source = "train (too few images to hold any out)"
        for b in bad:
            log.warning("skipped unreadable monitoring image %s", b)
        if mon is None:
            raise RuntimeError("no readable image for the monitoring batch")
        self.monitor_images = mon.to(d.device)
        self.data_fingerprint = self.index.fingerprint

    def _resume_target(self) -> tuple[str, str] | None:
        """(checkpoint root, tag) this run will resume from, or None (decided before anything is built)."""
        mode = self.settings.run.resume
        if mode == "never":
            return None
        if mode == "auto":
            tag = ckpt.read_latest(self.ckpt_root)
            return (self.ckpt_root, tag) if tag is not None else None
        return ckpt.resolve_checkpoint(mode)

    def _load_or_build_index(self, spec, column: str, storage_options) -> SampleIndex:
        """A resumed run reuses the index its first run built (same samples, same order, no re-indexing of tar
        shards); a fresh run indexes the sources and keeps the index next to its checkpoints."""
        target = self._resume_target()
        if target is not None:
            path = os.path.join(target[0], ckpt.DATA_INDEX_NAME)
            if os.path.isfile(path):
                saved = torch.load(path, map_location="cpu", weights_only=False)  # written by this trainer
                if saved.get("spec") == to_container(OmegaConf.create({"s": spec}))["s"] and \
                        saved.get("image_column") == column:
                    log.info("reusing the sample index of %s (%d samples)", path, len(saved["refs"]))
                    return SampleIndex(list(saved["refs"]), list(saved["blocks"]))
                log.warning("data.train changed since the checkpoint: re-indexing (the data order will differ)")
        index = build_index(spec, column, storage_options)
        path = os.path.join(self.ckpt_root, ckpt.DATA_INDEX_NAME)
        saved = {"spec": to_container(OmegaConf.create({"s": spec}))["s"], "image_column": column,
                 "refs": index.refs, "blocks": index.blocks}
        write_atomic(path, lambda f: torch.save(saved, f))
        return index

    def _restore_codebook(self) -> None:
        """bf16 engines cast every floating buffer; the quantizer's codebook must stay the exact float32 table."""
        from gq_model.codebook import gaussian_codebook
        from kernels import prepare_features

        q = self.gen.model.quantizer
        if q.codebook.dtype != torch.float32:
            cb = gaussian_codebook(q.codebook_size, q.group, q.seed).to(q.codebook.device)
            q._buffers["codebook"] = cb
            q._buffers["features"] = prepare_features(cb)

    def _write_run_files(self) -> None:
        ckpt.write_json(os.path.join(self.ckpt_root, ckpt.GQ_CONFIG_NAME), self.gq_config.to_dict())
        with open(os.path.join(self.out_dir, "train_config.yaml"), "w", encoding="utf-8") as f:
            f.write(OmegaConf.to_yaml(self.cfg))

    # ------------------------------------------------------------------------------------------------ resume
    def _maybe_resume(self) -> bool:
        self._rng_state = None
        target = self._resume_target()
        if target is None:
            return False
        root, tag = target
        tag_dir = os.path.join(root, tag)
        with open(os.path.join(tag_dir, ckpt.TRAINER_STATE_NAME), encoding="utf-8") as f:
            state = json.load(f)
        self.engine_g.load_checkpoint(root, tag=tag)
        if self.engine_d is not None:
            if not os.path.isdir(os.path.join(tag_dir, "disc")):
                raise ValueError(f"{tag_dir} has no discriminator checkpoint but loss.disc.enabled is true")
            self.engine_d.load_checkpoint(tag_dir, tag="disc")
        for k in ("lam", "lam_min", "lam_max"):
            getattr(self.tdc, k).fill_(float(state["tdc"][k]))
        self.step = int(state["step"])
        self.batches_consumed = int(state["batches_consumed"])
        self.corrupt_total_local = 0
        if state.get("world_size") != self.dist.world_size:
            log.warning("resuming a %s-rank checkpoint on %d ranks: weights, optimizers and lambdas are restored, "
                        "but data order and RNG streams differ from an uninterrupted run",
                        state.get("world_size"), self.dist.world_size)
        elif state.get("data_fingerprint") != self.data_fingerprint:
            log.warning("the training data changed since the checkpoint (index fingerprint %s -> %s): resuming at the "
                        "same batch number, but the samples differ", state.get("data_fingerprint"),
                        self.data_fingerprint)
        rs = ckpt.load_rank_state(tag_dir, self.dist.rank)
        if rs is not None and state.get("world_size") == self.dist.world_size:
            self._rng_state = rs["rng"]
            self.corrupt_total_local = int(rs.get("corrupt_local", 0))
        if self.dist.is_main:
            log.info("resumed from %s (step %d)", tag_dir, self.step)
        return True

    # ------------------------------------------------------------------------------------------------ steps
    def _train_micro(self, batch: Mapping[str, Any]) -> dict[str, float]:
        x = batch["image"].to(self.dist.device, non_blocking=True)
        self._note_corrupt(batch.get("corrupt") or [])
        xin = x.to(self.dtype)
        eg, ed = self.engine_g, self.engine_d
        boundary = eg.is_gradient_accumulation_boundary()
        disc_on = ed is not None and self.loss.disc_active(self.step)
        # generator step: the discriminator is frozen; the engine's forward returns the full generator loss
        _set_requires_grad(self.disc, False)
        loss_g, x_hat = eg(xin, step=self.step, update_tdc=boundary, disc_active=disc_on)
        lr = float(eg.get_lr()[0])  # the rate this step uses (the scheduler moves on inside step())
        eg.backward(loss_g)
        eg.step()
        _set_requires_grad(self.disc, True)
        logs = dict(self.gen.last_logs)
        # discriminator step
        if disc_on:
            logits = ed(torch.cat([xin, x_hat.to(self.dtype)]))
            real, fake = logits[: x.shape[0]], logits[x.shape[0]:]
            loss_d, dlogs = self.loss.discriminator_loss(real, fake)
            ed.backward(loss_d)
            ed.step()
            logs.update(dlogs)
        logs["lr"] = lr
        logs["batch_size"] = float(x.shape[0])
        return logs

    def _note_corrupt(self, bad: list[str]) -> None:
        for msg in bad:
            self.corrupt_total_local += 1
            if self._corrupt_logged < 20 or self.corrupt_total_local % 100 == 0:
                log.warning("rank %d: skipped unreadable image %s (%d so far on this rank)", self.dist.rank, msg,
                            self.corrupt_total_local)
                self._corrupt_logged += 1

    def _reduce_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """Mean of the loss terms over ranks (TDC statistics are already global), plus the corrupt-image total."""
        keys = sorted(logs)
        vals = torch.tensor([logs[k] for k in keys] + [float(self.corrupt_total_local)], dtype=torch.float64)
        if self.dist.distributed and self.dist.world_size > 1:
            dev = self.dist.device if self.dist.device.type == "cuda" else torch.device("cpu")
            vals = vals.to(dev)
            dist.all_reduce(vals)
            vals = vals.cpu()
            vals[:-1] /= self.dist.world_size
        out = dict(zip(keys, vals[:-1].tolist()))
        out["corrupt_images"] = float(vals[-1])
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out batch: quantized and Gaussian-mean reconstructions, PSNRs, KL bits, codebook usage; PNG grid."""
        zero3 = self.settings.deepspeed.enabled and self.settings.deepspeed.zero_stage == 3
        if not (self.dist.is_main or zero3):
            return {}
        eg = self.engine_g
        eg.eval()
        try:
            indices, x_q, x_mu, mu, logvar = eg(self.monitor_images.to(self.dtype), mode="eval")
        finally:
            eg.train()
        if not self.dist.is_main:
            return {}
        gc = self.gq_config
        x = self.monitor_images
        bits = kl_bits_per_group(mu.float(), logvar.float().clamp(*gc.logvar_range), gc.group, gc.layout)
        stats = codebook_stats(indices, gc.codebook_size)
        stats.update({"psnr_quantized": psnr(x, x_q), "psnr_gaussian_mean": psnr(x, x_mu),
                      "bits_mean": float(bits.mean()), "bits_min": float(bits.min()), "bits_max": float(bits.max())})
        self.monitor.scalars(self.step, stats, "heldout")
        n = min(self.settings.run.n_images, x.shape[0])
        path = self.monitor.images(self.step, [x[:n], x_q[:n], x_mu[:n]])
        self.monitor.write(f"step {self.step}: held-out ({self.monitor_source}) PSNR quantized "
                           f"{stats['psnr_quantized']:.2f} dB, Gaussian mean {stats['psnr_gaussian_mean']:.2f} dB, "
                           f"codebook usage {stats['codebook_used']:.0f}/{gc.codebook_size}, perplexity "
                           f"{stats['codebook_perplexity']:.1f}, grid {path}")
        return stats

    def save(self) -> str:
        d = self.dist
        tag = ckpt.tag_for_step(self.step)
        tag_dir = os.path.join(self.ckpt_root, tag)
        state = {"step": self.step, "batches_consumed": self.batches_consumed, "world_size": d.world_size,
                 "tdc": {k: float(getattr(self.tdc, k)) for k in ("lam", "lam_min", "lam_max")},
                 "data_fingerprint": self.data_fingerprint, "grad_accum": self.ga}
        self.engine_g.save_checkpoint(self.ckpt_root, tag=tag, client_state={"gq_trainer": state},
                                      save_latest=False)
        if self.engine_d is not None:
            self.engine_d.save_checkpoint(tag_dir, tag="disc", save_latest=False)
        ckpt.save_rank_state(tag_dir, d.rank, {"rng": ckpt.capture_rng(), "batches_consumed": self.batches_consumed,
                                                "corrupt_local": self.corrupt_total_local})
        if d.is_main:
            ckpt.write_json(os.path.join(tag_dir, ckpt.TRAINER_STATE_NAME), state)
            ckpt.write_json(os.path.join(tag_dir, ckpt.GQ_CONFIG_NAME), self.gq_config.to_dict())
            with open(os.path.join(tag_dir, "train_config.yaml"), "w", encoding="utf-8") as f:
                f.write(OmegaConf.to_yaml(self.cfg))
        d.barrier()
        if d.is_main:
            ckpt.write_latest(self.ckpt_root, tag)
            ckpt.prune_checkpoints(self.ckpt_root, self.settings.run.keep_last)
        d.barrier()
        return tag_dir

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        r = self.settings.run
        max_steps, ckpt_every, image_every = r.max_steps, r.ckpt_every, r.image_every
        log_every = max(1, r.log_every)
        crash_at = r.crash_at_step
        last_logs: dict[str, float] = {}
        saved_at = None
        start_step = self.step
        it = iter(self.loader)
        try:
            if self.step == 0 and image_every > 0:
                self.evaluate()
            while self.step < max_steps:
                for _ in range(self.ga):
                    logs = self._train_micro(next(it))
                    self.batches_consumed += 1
                self.step += 1
                if self.step != getattr(self.engine_g, "global_steps", self.step):
                    raise RuntimeError(f"step counter {self.step} != engine global_steps {self.engine_g.global_steps}")
                logs["epoch"] = float(self.batches_consumed // self.batches_per_epoch)
                if self.step % log_every == 0 or self.step == max_steps:
                    reduced = self._reduce_logs(logs)
                    logs["corrupt_images"] = reduced["corrupt_images"]
                    if self.dist.world_size > 1:
                        self.monitor.scalars(self.step, reduced, "train_mean")
                self.monitor.step(self.step, logs)
                last_logs = logs
                if image_every > 0 and self.step % image_every == 0:
                    self.evaluate()
                if ckpt_every > 0 and self.step % ckpt_every == 0:
                    self.save()
                    saved_at = self.step
                if crash_at is not None and self.step == crash_at:
                    os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die like a preempted node
            if saved_at != self.step and self.step > start_step:
                self.save()
            summary = {"step": self.step, "out_dir": self.out_dir, "last": last_logs,
                       "checkpoint": os.path.join(self.ckpt_root, ckpt.read_latest(self.ckpt_root) or "")}
            if r.export_bundle and self.dist.is_main and ckpt.read_latest(self.ckpt_root):
                bundle = os.path.join(self.out_dir, "bundle")
                model = ckpt.load_model_from_zero_checkpoint(self.ckpt_root)
                model.save_pretrained(bundle, source="gq train", step=self.step)
                summary["bundle"] = bundle
                self.monitor.write(f"wrote model bundle {bundle}")
            self.dist.barrier()
            return summary
        finally:
            del it
            if self.monitor is not None:
                self.monitor.close()


def _configure_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("gq").setLevel(level)
    logging.getLogger("jobs").setLevel(level)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except Exception:
        pass


def train(config: Any, overrides: Sequence[str] = (), train_images: Sequence[Any] | None = None,
          val_images: Sequence[Any] | None = None) -> dict[str, Any]:
    """Train from a config (YAML path/URL, mapping or DictConfig) plus ``a.b=value`` overrides; returns a summary.

    ``train_images`` (PIL images, uint8 arrays, [-1,1] tensors or encoded bytes) replaces ``data.train``.
    """
    if hasattr(config, "_metadata") and not overrides:
        cfg = config
    else:
        cfg = load_config(config if not hasattr(config, "_metadata") else to_container(config), overrides)
    if train_images is not None and cfg.data.train is None:
        cfg.data.train = "<in-memory>"
    return Trainer(cfg, train_images, val_images).setup().run()
