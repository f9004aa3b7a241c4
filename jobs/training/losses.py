"""The GQ training objective wired to the model: the generator module the engine wraps, and the loss terms.

Generator objective (gq-reference.md §4.1, configurable):

    nll  = sum_elements(rec / e^s + s) / B,   rec = |x - x_hat| + w_p * LPIPS(x, x_hat)  (LPIPS broadcast per image)
    L_G  = nll + 0.1 * TDC_KL + d_w * (-mean D(x_hat)) [+ vf_w * VF]

with s a learnable scalar log-variance, x_hat decoded from the reparameterized sample mu + sigma * eps (with
``loss.regularizer: gq2``: from its quantized codewords through a straight-through estimator, so the value is the
codeword and the gradient reaches mu and sigma as if it were the sample), d_w the
adaptive weight on the decoder's last layer (x 0.75, zero before ``disc.start``) and vf_w the adaptive VF weight on
the encoder's last layer (x 0.2). The discriminator minimizes the hinge loss on (x, x_hat.detach()).

Adaptive weights need ||dL/dW|| for one layer W. Rather than ``autograd.grad`` w.r.t. the parameter (which ZeRO-3
partitions), a forward hook records that layer's input and output; dL/dW then follows from dL/d(output) and the
input (``torch.nn.grad.conv2d_weight`` / an outer product for Linear), which is exact at every ZeRO stage. All of it
runs inside the generator engine's forward (see :class:`GeneratorModule` for why).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gq_model import GQModel, TDCRegularizer
from gq_model.losses import VFAlignmentLoss, adaptive_weight, feature_grid, hinge_d_loss, vanilla_d_loss
from gq_model.quantizer import straight_through

__all__ = ["GeneratorModule", "LayerProbe", "GQLoss"]


class GeneratorModule(nn.Module):
    """What the generator engine wraps: the GQModel, the learnable log-variance ``s`` and the optional VF projection.

    ``forward(x, step=..., update_tdc=..., disc_active=...)`` computes the *whole* generator loss and returns
    ``(loss, x_hat.detach())``; the log values are left in :attr:`last_logs`. Doing it all inside the engine's forward
    matters with DeepSpeed: the engine hooks every output of its forward and treats any backward through them as its
    own backward pass, so the partial ``autograd.grad`` calls of the adaptive weights, and the pass through the
    (frozen) discriminator, must happen before anything is returned. The loss object and the discriminator are
    attached with :meth:`attach` and are *not* submodules (they are not generator parameters or state).

    ``forward(x, mode="eval")``: ``(indices, x_quantized, x_mean, mu, logvar)``; deterministic, no RNG, no state change.
    """

    def __init__(self, model: GQModel, learn_logvar: bool = True, logvar_init: float = 0.0,
                 vf_dim: int | None = None):
        super().__init__()
        self.model = model
        init = torch.full((1,), float(logvar_init))
        if learn_logvar:
            self.logvar = nn.Parameter(init)
        else:
            self.register_buffer("logvar", init)
        self.vf_proj = nn.Conv2d(model.config.z_channels, int(vf_dim), 1, bias=False) if vf_dim else None
        self.__dict__["_loss"] = None
        self.__dict__["_disc"] = None
        self.__dict__["_probes"] = (None, None)
        self.last_logs: dict[str, float] = {}

    def attach(self, loss: "GQLoss", disc: nn.Module | None = None) -> None:
        """Wire the loss terms and the discriminator module (its engine's ``.module``); install the layer probes."""
        self.__dict__["_loss"] = loss
        self.__dict__["_disc"] = disc
        dec = LayerProbe(self.model.decoder.conv_out)
        enc = LayerProbe(self.model.encoder.conv_out) if loss.vf_enabled else None
        self.__dict__["_probes"] = (dec, enc)

    def forward(self, x: torch.Tensor, mode: str = "train", step: int = 0, update_tdc: bool = False,
                disc_active: bool = False):
        m = self.model
        mu, logvar = m.encode_moments(x)
        if mode == "eval":
            indices, zq = m.quantizer.quantize(mu.float(), logvar.float())
            return indices, m.decode_latent(zq.to(mu.dtype)), m.decode_latent(mu), mu, logvar
        loss_fn = self._loss
        if loss_fn is None:
            raise RuntimeError("GeneratorModule.attach(loss, disc) must be called before training forwards")
        std = torch.exp(0.5 * logvar.clamp(*m.config.logvar_range))
        z = mu + std * torch.randn_like(mu)
        if loss_fn.straight_through:  # gq2: decode the codewords, train the encoder through the sample
            _, zq = m.quantizer.quantize(mu.detach().float(), logvar.detach().float())
            x_hat = m.decode_latent(straight_through(z, zq))
        else:
            x_hat = m.decode_latent(z)
        zp = self.vf_proj(z) if self.vf_proj is not None else None
        disc = self._disc
        disc_fn = (lambda xh: disc(xh.to(x.dtype))) if (disc_active and disc is not None) else None
        dec_probe, enc_probe = self._probes
        try:
            loss, logs = loss_fn.generator_loss(x, (mu, logvar, z, x_hat, self.logvar * 1.0, zp), step, update_tdc,
                                                disc_fn, dec_probe, enc_probe)
        finally:
            for p in (dec_probe, enc_probe):
                if p is not None:
                    p.clear()
        self.last_logs = logs
        return loss, x_hat.detach()


class LayerProbe:
    """Forward hook on a Conv2d/Linear layer keeping its last input and output, to get ||dL/dW|| from dL/d(output)."""

    def __init__(self, layer: nn.Module):
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"adaptive weights need a Conv2d or Linear last layer, got {type(layer).__name__}")
        self.layer = layer
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if torch.is_grad_enabled():
            self.input, self.output = inputs[0], output

    def clear(self) -> None:
        self.input = self.output = None

    def weight_grad_norm(self, loss: torch.Tensor) -> torch.Tensor:
        """||d loss / d W|| for the last recorded forward (keeps the graph)."""
        if self.output is None:
            raise RuntimeError("LayerProbe: no forward recorded")
        (gy,) = torch.autograd.grad(loss, self.output, retain_graph=True)
        h, gy = self.input.detach().float(), gy.float()
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            shape = (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
            gw = torch.nn.grad.conv2d_weight(h, shape, gy, stride=layer.stride, padding=layer.padding,
                                             dilation=layer.dilation, groups=layer.groups)
        else:
            gw = gy.reshape(-1, gy.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
        return torch.linalg.vector_norm(gw).detach()


class GQLoss(nn.Module):
    """The loss terms. ``lpips`` and ``vf_model`` are frozen modules (or None); ``tdc`` holds the controllers."""

    def __init__(self, cfg: Any, tdc: TDCRegularizer, lpips: nn.Module | None = None,
                 vf_model: nn.Module | None = None):
        super().__init__()
        loss = cfg.loss
        self.tdc = tdc
        self.lpips = lpips
        self.vf_model = vf_model
        self.rec_kind = loss.rec
        self.perceptual_weight = float(loss.perceptual_weight)
        if self.perceptual_weight > 0 and lpips is None:  # never a silent fall-back to L1 alone
            raise ValueError("loss.perceptual_weight > 0 needs an LPIPS module (set loss.perceptual_weight=0 to "
                             "train without the perceptual loss)")
        self.kl_weight = float(loss.kl_weight)
        self.straight_through = loss.get("regularizer", "gq") == "gq2"
        self.disc_enabled = bool(loss.disc.enabled)
        self.disc_start = int(loss.disc.start)
        self.disc_weight = float(loss.disc.weight)
        self.disc_max_weight = float(loss.disc.max_weight)
        self.d_loss_fn = hinge_d_loss if loss.disc.loss == "hinge" else vanilla_d_loss
        self.vf_enabled = bool(loss.vf.enabled) and vf_model is not None
        self.vf_weight, self.vf_adaptive = float(loss.vf.weight), bool(loss.vf.adaptive)
        self.vf_max_weight = float(loss.vf.max_weight)
        self.vf_input_size = int(loss.vf.input_size) if loss.vf.input_size else None
        self.vf_loss = VFAlignmentLoss(loss.vf.distmat_margin, loss.vf.cos_margin, loss.vf.distmat_weight,
                                       loss.vf.cos_weight)

    def disc_active(self, step: int) -> bool:
        return self.disc_enabled and step >= self.disc_start

    @torch.no_grad()
    def vf_features(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen feature grid of the images (resized to ``vf.input_size``, fed in [-1, 1] like the reference)."""
        xi = x.float()
        if self.vf_input_size and xi.shape[-1] != self.vf_input_size:
            xi = F.interpolate(xi, size=(self.vf_input_size, self.vf_input_size), mode="bilinear",
                               align_corners=False)
        return feature_grid(self.vf_model(xi)).float()

    def generator_loss(self, x: torch.Tensor, out: tuple, step: int, update_tdc: bool, disc_fn=None,
                       dec_probe: LayerProbe | None = None, enc_probe: LayerProbe | None = None
                       ) -> tuple[torch.Tensor, dict[str, float]]:
        """L_G for one micro-batch. ``disc_fn(x_hat) -> logits`` when the GAN term is active (else None)."""
        mu, logvar, z, x_hat, s, zp = out
        x = x.float()
        xr = x_hat.float()
        b = x.shape[0]
        diff = xr - x
        rec = diff.abs() if self.rec_kind == "l1" else diff * diff
        logs: dict[str, float] = {"rec": float(rec.detach().mean())}
        if self.perceptual_weight > 0:
            p = self.lpips(x, xr)
            rec = rec + self.perceptual_weight * p
            logs["lpips"] = float(p.detach().mean())
        s = s.float().reshape(())
        nll = (rec / torch.exp(s) + s).sum() / b
        logs["nll"], logs["logvar"] = float(nll.detach()), float(s.detach())
        kl, stats = self.tdc(mu.float(), logvar.float(), update=update_tdc, accumulate=True)
        logs["kl"] = float(kl.detach())
        logs.update({k: float(v) for k, v in stats.items()})
        total = nll + self.kl_weight * kl
        if disc_fn is not None:
            g = -disc_fn(x_hat).float().mean()
            d_w = adaptive_weight(dec_probe.weight_grad_norm(nll), dec_probe.weight_grad_norm(g), self.disc_weight,
                                  self.disc_max_weight)
            total = total + d_w.to(g.device) * g
            logs["g_loss"], logs["d_weight"] = float(g.detach()), float(d_w)
        if self.vf_enabled:
            vf, vf_logs = self.vf_loss(zp, self.vf_features(x))
            if self.vf_adaptive:
                vf_w = adaptive_weight(enc_probe.weight_grad_norm(nll), enc_probe.weight_grad_norm(vf),
                                       self.vf_weight, self.vf_max_weight)
            else:
                vf_w = torch.tensor(self.vf_weight)
            total = total + vf_w.to(vf.device) * vf
            logs.update(vf_logs)
            logs["vf_loss"], logs["vf_weight"] = float(vf.detach()), float(vf_w)
        logs["loss_g"] = float(total.detach())
        return total, logs

    def discriminator_loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor
                           ) -> tuple[torch.Tensor, dict[str, float]]:
        d = self.d_loss_fn(logits_real.float(), logits_fake.float())
        return d, {"loss_d": float(d.detach()), "logits_real": float(logits_real.detach().float().mean()),
                   "logits_fake": float(logits_fake.detach().float().mean())}
