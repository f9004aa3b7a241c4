"""ReconstructionEvaluator: every ``gq eval`` number for a stream of image batches, as mergeable sums.

Why one object: the same batch feeds the quantized and the Gaussian (mu) reconstructions, the codebook histograms and
the posterior's KL, and all of it must be summed across Ray workers or torchrun ranks. Everything is therefore kept as
tensors that merge by addition, except the ``*.extremes`` entries (running maxima) which merge by maximum;
``state()``/``load_state()`` and :func:`merge_states` expose that, ``report()`` turns the totals into the JSON
report's sections.

Reconstructions come from the *raw* decoder (``model.decoder``), not ``decode_latent``: the reference's eval bypasses
the ViT ``clamp_range`` too, so the "unclamped" numbers are the reference's and the clamped ones clip to [-1, 1].
"""
from __future__ import annotations

import math

import torch

from gq_model.metrics.advisor import POSTERIOR_SAMPLE_MISS, Histogram, advise
from gq_model.metrics.codebook_usage import CodebookUsage
from gq_model.metrics.frechet import FeatureStats, FrechetReference
from gq_model.metrics.image import MS_SSIM_MIN_SIZE, ms_ssim, psnr, ssim
from gq_model.tdc import kl_bits_per_group

__all__ = ["ReconstructionEvaluator", "merge_states", "KINDS"]

KINDS = ("quantized", "gaussian")
FID_MIN_IMAGES = 2048  # fewer images than feature dimensions: the covariance is singular and rFID strongly biased


def merge_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Combine two evaluator states (sum, or max for ``*.extremes``)."""
    if a.keys() != b.keys():
        raise ValueError(f"evaluator states differ in keys: {sorted(set(a) ^ set(b))[:5]}")
    return {k: torch.maximum(a[k], b[k]) if k.endswith(".extremes") else a[k] + b[k] for k in a}


class ReconstructionEvaluator:
    """Accumulates reconstruction, codebook and rate statistics for one model.

    Args:
        model: a :class:`~gq_model.GQModel` (put it on ``device`` and in eval mode first).
        lpips: an LPIPS module ``(x, y) -> [B]`` or None (skipped).
        inception: a pool3 feature network ``x -> [B, 2048]`` or None (rFID skipped).
        perceptual_input: "clamped" (default) or "unclamped" reconstructions for LPIPS and rFID; the reference
            feeds them unclamped.
        fid: keep rFID statistics (default: when ``inception`` is given). A driver that only merges worker states
            passes ``fid=True`` without a network.
    """

    # msssim*: only for images of at least MS_SSIM_MIN_SIZE on both sides, as the reference reports it (else null)
    SCALARS = ("psnr", "psnr_unclamped", "ssim", "ssim_unclamped", "msssim", "msssim_unclamped", "lpips")

    def __init__(self, model, lpips=None, inception=None, perceptual_input: str = "clamped", fid: bool | None = None):
        if perceptual_input not in ("clamped", "unclamped"):
            raise ValueError(f"perceptual_input must be 'clamped' or 'unclamped', got {perceptual_input!r}")
        self.model, self.lpips, self.inception = model, lpips, inception
        self.perceptual_input = perceptual_input
        cfg = model.config
        self.codebook_size, self.group, self.num_groups = cfg.codebook_size, cfg.group, cfg.num_groups
        self.moments = {f"{k}.{m}": torch.zeros(3, dtype=torch.float64) for k in KINDS for m in self.SCALARS}
        self.usage = CodebookUsage(cfg.codebook_size, cfg.num_groups)
        self.kl = Histogram(0.0, 64.0, 4096)         # per-group KL bits, 1/64-bit resolution
        self.kl_per_group = torch.zeros(2, cfg.num_groups, dtype=torch.float64)  # count, sum
        self.mu_sigma = Histogram(0.0, 16.0, 4096)   # |mu| * sigma per dimension: the theorem's c1
        fid = inception is not None if fid is None else fid
        self.fid = {k: FeatureStats(2048) for k in ("original",) + KINDS} if fid else {}

    # ------------------------------------------------------------------ accumulation
    def _add(self, key: str, values: torch.Tensor) -> None:
        v = values.detach().to("cpu", torch.float64).reshape(-1)
        self.moments[key] += torch.stack([torch.tensor(float(v.numel()), dtype=torch.float64), v.sum(), (v * v).sum()])

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add a batch of originals ``x`` [B,3,H,W] in [-1, 1] (already on the model's device)."""
        if self.fid and self.inception is None:
            raise ValueError("this evaluator keeps rFID statistics but has no Inception network (fid=True is for "
                             "merging worker states only)")
        model, cfg = self.model, self.model.config
        mu, logvar = model.encode_moments(x)
        lv = logvar.float().clamp(*cfg.logvar_range)
        indices, zhat = model.quantizer.quantize(mu, logvar)
        self.usage.add(indices, group_dim=1 if mu.dim() == 4 else -1)
        bits = kl_bits_per_group(mu, lv, cfg.group, cfg.layout)
        self.kl.add(bits)
        flat = bits.reshape(-1, self.num_groups).double().cpu()
        self.kl_per_group += torch.stack([torch.full((self.num_groups,), float(flat.shape[0]), dtype=torch.float64),
                                          flat.sum(0)])
        self.mu_sigma.add(mu.float().abs() * torch.exp(0.5 * lv))
        if self.fid:
            self.fid["original"].add(self.inception(x.float()))
        for kind, z in (("quantized", zhat), ("gaussian", mu)):
            raw = model.decoder(z).float()
            self._add(f"{kind}.psnr", psnr(x, raw, clamp=True))
            self._add(f"{kind}.psnr_unclamped", psnr(x, raw, clamp=False))
            self._add(f"{kind}.ssim", ssim(x, raw, clamp=True))
            self._add(f"{kind}.ssim_unclamped", ssim(x, raw, clamp=False))
            if min(x.shape[-2:]) >= MS_SSIM_MIN_SIZE:
                self._add(f"{kind}.msssim", ms_ssim(x, raw, clamp=True))
                self._add(f"{kind}.msssim_unclamped", ms_ssim(x, raw, clamp=False))
            perceptual = raw.clamp(-1.0, 1.0) if self.perceptual_input == "clamped" else raw
            if self.lpips is not None:
                self._add(f"{kind}.lpips", self.lpips(x.float(), perceptual))
            if self.fid:
                self.fid[kind].add(self.inception(perceptual))

    # ------------------------------------------------------------------ merging
    def state(self) -> dict[str, torch.Tensor]:
        s = {f"moments.{k}": v for k, v in self.moments.items()}
        s["usage.counts"] = self.usage.counts
        s["kl_per_group"] = self.kl_per_group
        for name, h in (("kl", self.kl), ("mu_sigma", self.mu_sigma)):
            s.update({f"{name}.{k}": v for k, v in h.state().items()})
        for name, f in self.fid.items():
            s.update({f"fid.{name}.{k}": v for k, v in f.state().items()})
        return {k: v.clone() for k, v in s.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.state()
        if mine.keys() != state.keys():
            raise ValueError(f"state keys differ: {sorted(set(mine) ^ set(state))[:5]}")
        for k in self.moments:
            self.moments[k] = state[f"moments.{k}"].double().clone()
        self.usage.counts = state["usage.counts"].long().clone()
        self.kl_per_group = state["kl_per_group"].double().clone()
        for name, h in (("kl", self.kl), ("mu_sigma", self.mu_sigma)):
            h.load({k: state[f"{name}.{k}"] for k in ("counts", "moments", "extremes")})
        for name, f in self.fid.items():
            f.load({k: state[f"fid.{name}.{k}"] for k in ("n", "sum", "outer")})

    def all_reduce(self) -> None:
        """Sum (max for extremes) the state over an initialized torch.distributed group; every rank gets the total."""
        import torch.distributed as dist

        state = self.state()
        for k in sorted(state):
            op = dist.ReduceOp.MAX if k.endswith(".extremes") else dist.ReduceOp.SUM
            dist.all_reduce(state[k], op=op)
        self.load_state(state)

    # ------------------------------------------------------------------ report
    @property
    def num_images(self) -> int:
        return int(self.moments["quantized.psnr"][0])

    def _mean_std(self, key: str) -> dict | None:
        n, s, ss = (float(v) for v in self.moments[key])
        if n == 0:
            return None
        mean = s / n
        return {"mean": mean, "std": math.sqrt(max(ss / n - mean * mean, 0.0))}

    def report(self, advisor_percentile: float = 99.0, advisor_delta: float = POSTERIOR_SAMPLE_MISS) -> dict:
        """The ``reconstruction``, ``codebook``, ``kl_bits`` and ``advisor`` sections of the report."""
        if self.num_images == 0:
            raise ValueError("no images were evaluated")
        recon = {}
        reference = FrechetReference(*self.fid["original"].mean_cov()) if self.fid else None
        for kind in KINDS:
            recon[kind] = {m: self._mean_std(f"{kind}.{m}") for m in self.SCALARS}
            recon[kind]["rfid"] = reference.distance(*self.fid[kind].mean_cov()) if reference else None
        count, total = self.kl_per_group
        kl = self.kl.summary()
        kl["per_group_mean"] = (total / count.clamp_min(1)).tolist()
        kl["target_bits"] = math.floor(math.log2(self.codebook_size))
        c1 = self.mu_sigma.quantile(advisor_percentile / 100.0)
        return {"reconstruction": recon, "codebook": self.usage.report(), "kl_bits": kl,
                "advisor": advise(self.kl, self.codebook_size, c1, advisor_percentile, advisor_delta)}
