"""Encoder/decoder architectures: exact reference state-dict layout, and forward semantics on tiny nets.

The full-size models are only built on the meta device (no memory, no compute), so the whole file
runs in a few seconds on CPU.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gq_model import unet, vit
from gq_model.reference_config import preset_config

DATA = Path(__file__).resolve().parent / "data"
# In CI the shared docs sit beside the repo as ../shared; locally they may live elsewhere.
SHARED_KEYS = Path(__file__).resolve().parents[2] / "shared/docs/gq-reference-state-dict-keys.txt"
SECTIONS = {"sd3unet_gq_0.25": "A", "bsqvit_gq_0.25": "B"}
PARAM_COUNTS = {
    "sd3unet_gq_0.25": (35_325_856, 51_648_771),
    "bsqvit_gq_0.25": (86_016_032, 88_809_408),
}
CLASSES = {"unet": (unet.Encoder, unet.Decoder), "vit": (vit.TransformerEncoder, vit.TransformerDecoder)}


def _parse_key_lines(lines) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for line in lines:
        if not line.startswith(("encoder.", "decoder.")):
            continue
        key, shape, _dtype = line.rstrip("\n").split("\t")
        out.append((key, tuple(ast.literal_eval(shape))))
    return out


def reference_keys(preset: str) -> list[tuple[str, tuple[int, ...]]]:
    return _parse_key_lines((DATA / f"reference_keys_{preset}.tsv").read_text().splitlines())


def shared_section_keys(section: str) -> list[tuple[str, tuple[int, ...]]]:
    lines, inside = [], False
    for line in SHARED_KEYS.read_text().splitlines():
        if line.startswith("## SECTION "):
            inside = line.startswith(f"## SECTION {section}:")
            continue
        if inside:
            lines.append(line)
    return _parse_key_lines(lines)


def build_meta(preset: str) -> tuple[nn.Module, nn.Module]:
    cfg = preset_config(preset)
    enc_cls, dec_cls = CLASSES[cfg["arch"]]
    with torch.device("meta"):
        return enc_cls(**cfg["encoder"]), dec_cls(**cfg["decoder"])


def our_keys(encoder: nn.Module, decoder: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"encoder.{k}", tuple(v.shape)) for k, v in encoder.state_dict().items()] + [
        (f"decoder.{k}", tuple(v.shape)) for k, v in decoder.state_dict().items()
    ]


# --------------------------------------------------------------------------- reference layout


@pytest.mark.parametrize("preset", sorted(SECTIONS))
def test_state_dict_equals_reference(preset):
    ours = our_keys(*build_meta(preset))
    ref = reference_keys(preset)
    assert len(ref) > 200
    missing = sorted(set(dict(ref)) - set(dict(ours)))
    extra = sorted(set(dict(ours)) - set(dict(ref)))
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
    assert dict(ours) == dict(ref)
    assert ours == ref  # same registration order too, so a key-by-key diff of checkpoints lines up


@pytest.mark.parametrize("preset", sorted(SECTIONS))
def test_copied_key_list_matches_shared_docs(preset):
    if not SHARED_KEYS.exists():
        pytest.skip(f"{SHARED_KEYS} not present")
    assert shared_section_keys(SECTIONS[preset]) == reference_keys(preset)


@pytest.mark.parametrize("preset", sorted(PARAM_COUNTS))
def test_param_counts(preset):
    encoder, decoder = build_meta(preset)
    n_enc = sum(p.numel() for p in encoder.parameters())
    n_dec = sum(p.numel() for p in decoder.parameters())
    assert (n_enc, n_dec) == PARAM_COUNTS[preset]
    assert not list(encoder.buffers()) and not list(decoder.buffers())


@pytest.mark.parametrize("rate", ["0.50", "1.00"])
@pytest.mark.parametrize("arch", ["sd3unet", "bsqvit"])
def test_other_bitrates_share_the_architecture(arch, rate):
    assert our_keys(*build_meta(f"{arch}_gq_{rate}")) == reference_keys(f"{arch}_gq_0.25")


# --------------------------------------------------------------------------- UNet semantics

SMALL = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0,
             resolution=32, in_channels=3, z_channels=4, double_z=True, attn_type="vanilla")


def test_unet_small_shapes_and_kwargs_swallowed():
    torch.manual_seed(0)
    enc = unet.Encoder(**SMALL, some_unused_key=1).eval()
    dec = unet.Decoder(**SMALL).eval()  # gets double_z/in_channels like the reference interpolation
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        moments = enc(x)
        assert moments.shape == (2, 8, 16, 16)  # 2*z_channels, f=2
        y = dec(moments[:, :4])
    assert y.shape == (2, 3, 32, 32)
    assert len(enc.down[1].attn) == 1 and len(enc.down[0].attn) == 0  # attention at 16x16 only
    assert len(dec.up[1].attn) == 2 and len(dec.up[0].attn) == 0  # num_res_blocks+1 blocks at 16x16
    assert not hasattr(dec.up[0], "upsample") and hasattr(dec.up[1], "upsample")
    assert not hasattr(enc.down[1], "downsample") and hasattr(enc.down[0], "downsample")


def test_unet_single_z_and_unsupported_options():
    enc = unet.Encoder(**{**SMALL, "double_z": False})
    assert enc.conv_out.out_channels == 4
    with pytest.raises(NotImplementedError):
        unet.Encoder(**SMALL, padding_mode="reflect")
    with pytest.raises(NotImplementedError):
        unet.Decoder(**{**SMALL, "attn_type": "xformers"})


def test_unet_four_levels_is_f8():
    torch.manual_seed(0)
    cfg = dict(SMALL, ch_mult=[1, 1, 2, 2], resolution=64, attn_resolutions=[8])
    enc, dec = unet.Encoder(**cfg).eval(), unet.Decoder(**cfg).eval()
    with torch.no_grad():
        moments = enc(torch.randn(1, 3, 64, 64))
        assert moments.shape == (1, 8, 8, 8)
        assert dec(moments[:, 4:]).shape == (1, 3, 64, 64)
    assert [len(level.attn) for level in enc.down] == [0, 0, 0, 1]
    assert [len(level.attn) for level in dec.up] == [0, 0, 0, 2]


def test_decoder_output_is_not_squashed():
    torch.manual_seed(0)
    dec = unet.Decoder(**SMALL).eval()
    with torch.no_grad():
        dec.conv_out.bias.fill_(5.0)
        y = dec(torch.randn(1, 4, 16, 16))
    assert y.min() > 1.5  # a tanh or clamp to [-1, 1] would cap this


def test_downsample_asymmetric_padding():
    torch.manual_seed(0)
    down = unet.Downsample(8)
    x = torch.randn(2, 8, 10, 10)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    out = down(x)
    assert out.shape == (2, 8, 5, 5)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    symmetric = F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1)
    assert not torch.allclose(out, symmetric)


def test_upsample_nearest_then_conv():
    torch.manual_seed(0)
    up = unet.Upsample(8)
    x = torch.randn(1, 8, 4, 4)
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(up(x), F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1))


def test_groupnorm_settings():
    enc, dec = unet.Encoder(**SMALL), unet.Decoder(**SMALL)
    norms = [m for m in [*enc.modules(), *dec.modules()] if isinstance(m, nn.GroupNorm)]
    assert norms and all(n.num_groups == 32 and n.eps == 1e-6 and n.affine for n in norms)
    x = torch.randn(2, 64, 3, 3) * 1e-3  # tiny variance: eps 1e-6 vs 1e-5 matters
    norm = unet.Normalize(64)
    torch.testing.assert_close(norm(x), F.group_norm(x, 32, eps=1e-6))
    assert not torch.allclose(norm(x), F.group_norm(x, 32, eps=1e-5))


def test_resnet_block_explicit():
    torch.manual_seed(0)
    block = unet.ResnetBlock(32, 64).eval()
    same = unet.ResnetBlock(32, 32)
    assert hasattr(block, "nin_shortcut") and not hasattr(same, "nin_shortcut")
    x = torch.randn(2, 32, 6, 6)
    h = block.conv1(F.silu(F.group_norm(x, 32, block.norm1.weight, block.norm1.bias, 1e-6)))
    h = block.conv2(F.silu(F.group_norm(h, 32, block.norm2.weight, block.norm2.bias, 1e-6)))
    torch.testing.assert_close(block(x), block.nin_shortcut(x) + h)


def test_attention_block_explicit():
    torch.manual_seed(0)
    attn = unet.AttnBlock(32).eval()
    for p in attn.norm.parameters():
        nn.init.normal_(p)
    x = torch.randn(2, 32, 5, 4)
    b, c, h, w = x.shape
    hn = F.group_norm(x, 32, attn.norm.weight, attn.norm.bias, 1e-6)

    def tokens(conv):  # [B, HW, C]
        return conv(hn).reshape(b, c, h * w).transpose(1, 2)

    q, k, v = tokens(attn.q), tokens(attn.k), tokens(attn.v)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, c, h, w)
    torch.testing.assert_close(attn(x), x + attn.proj_out(out), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- ViT semantics

VIT_SMALL = dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4, z_channels=4,
                 double_z=True, drop_rate=0.0)


def test_patchify_layout_and_round_trip():
    x = torch.randn(2, 3, 16, 24)
    p = 8
    t = vit.patchify(x, p)
    assert t.shape == (2, 2 * 3, 3 * p * p)
    # token (i, j) row-major; vector index c*p*p + py*p + px  (b c (hh p) (ww p) -> b (hh ww) (c p p))
    i, j, c, py, px = 1, 2, 2, 3, 5
    assert t[1, i * 3 + j, c * p * p + py * p + px] == x[1, c, i * p + py, j * p + px]
    assert torch.equal(vit.unpatchify(t, p, (2, 3)), x)
    with pytest.raises(ValueError):
        vit.patchify(torch.randn(1, 3, 12, 16), p)


def test_vit_small_shapes():
    torch.manual_seed(0)
    enc = vit.TransformerEncoder(**VIT_SMALL, unused=True).eval()
    dec = vit.TransformerDecoder(**VIT_SMALL).eval()
    with torch.no_grad():
        moments = enc(torch.randn(2, 3, 32, 32))
        assert moments.shape == (2, 16, 8)  # [B, L, 2*z]
        assert dec(moments[..., :4]).shape == (2, 3, 32, 32)
        with pytest.raises(ValueError):
            enc(torch.randn(1, 3, 64, 64))  # positional embedding is for 32x32 only
    assert enc.conv1.bias is None


def test_vit_pre_ln_block_explicit():
    torch.manual_seed(0)
    block = vit.ResidualAttentionBlock(64, 4).eval()
    x = torch.randn(2, 5, 64)
    h = block.ln_1(x)
    x1 = x + block.attn(h, h, h, need_weights=False)[0]
    h2 = block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(x1))))
    torch.testing.assert_close(block(x), x1 + h2)


def test_vit_encoder_and_decoder_heads_explicit():
    torch.manual_seed(0)
    cfg = dict(VIT_SMALL, layers=0)  # no blocks: isolates embedding, norms and heads
    enc, dec = vit.TransformerEncoder(**cfg).eval(), vit.TransformerDecoder(**cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    tok = enc.ln_post(enc.ln_pre(enc.conv1(vit.patchify(x, 8)) + enc.positional_embedding))
    torch.testing.assert_close(enc(x), enc.quant_embed(tok))
    z = torch.randn(2, 16, 4)
    h = dec.ln_post(dec.ln_pre(dec.post_quant_embed(z) + dec.positional_embedding))
    pix = dec.conv_out(torch.tanh(dec.ffn[0](h)))
    torch.testing.assert_close(dec(z), vit.unpatchify(pix, 8, (4, 4)))


def test_vit_decoder_head_is_3072_wide_at_every_width(tmp_path):
    """The reference's decoder head is Linear(width, 3072) + Tanh -> Linear(3072, 3*p*p) at any width (4*width only
    coincides at 768): a reference-layout ViT checkpoint of width 64 loads strictly from its .ckpt and YAML."""
    import yaml

    from gq_model import GQModel

    text = (Path(__file__).resolve().parents[1] / "gq_model/presets/bsqvit_gq_0.25.yaml").read_text()
    cfg = yaml.safe_load(text)
    params = cfg["model"]["params"]
    params["encoder_config"]["params"].update(image_size=32, width=64, layers=1, heads=4)
    params["regularizer_config"]["params"]["n_samples"] = 1024
    yaml_path = tmp_path / "bsqvit_w64.yaml"
    yaml_path.write_text(yaml.safe_dump(cfg))
    # The state dict a reference model of width 64 has: every shape follows from width 64 and the fixed head.
    torch.manual_seed(0)
    enc = vit.TransformerEncoder(image_size=32, patch_size=8, width=64, layers=1, heads=4, mlp_ratio=4,
                                 z_channels=16, double_z=True)
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    dec_shapes = {"post_quant_embed.weight": (64, 16), "post_quant_embed.bias": (64,), "ffn.0.weight": (3072, 64),
                  "ffn.0.bias": (3072,), "conv_out.weight": (192, 3072), "conv_out.bias": (192,)}
    dec = vit.TransformerDecoder(image_size=32, patch_size=8, width=64, layers=1, heads=4, mlp_ratio=4,
                                 z_channels=16)
    for k, v in dec.state_dict().items():
        shape = dec_shapes.get(k, tuple(v.shape))
        assert tuple(v.shape) == shape, (k, tuple(v.shape), shape)
        state[f"decoder.{k}"] = 0.02 * torch.randn(shape)
    state["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "w64.ckpt")
    model = GQModel.from_reference_checkpoint(str(tmp_path / "w64.ckpt"), str(yaml_path))
    assert tuple(model.decoder.ffn[0].weight.shape) == (3072, 64)
    assert torch.equal(model.decoder.conv_out.weight, state["decoder.conv_out.weight"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert model.detokenize(model.tokenize(x)).shape == (1, 3, 32, 32)


# --------------------------------------------------------------------------- ViT initialisation (BSQ-ViT's)


def _vit_pair(**kw):
    cfg = dict(VIT_SMALL, width=256, layers=2, heads=4, image_size=64, **kw)  # 64 tokens x 256: ~16k pos-emb values
    return vit.TransformerEncoder(**cfg), vit.TransformerDecoder(**cfg)


def test_vit_init_statistics():
    torch.manual_seed(0)
    enc, dec = _vit_pair()
    std = vit.INIT_STD
    trunc = [enc.conv1.weight, dec.ffn[0].weight, dec.conv_out.weight]
    for m in (enc, dec):
        for block in m.transformer.resblocks:
            trunc += [block.attn.in_proj_weight, block.attn.out_proj.weight, block.mlp.c_fc.weight,
                      block.mlp.c_proj.weight]
            for name, p in block.named_parameters():
                if name.endswith("bias"):
                    assert torch.count_nonzero(p) == 0, name  # every block bias is zero (LayerNorm's too)
                elif name.startswith("ln_"):
                    assert torch.equal(p, torch.ones_like(p)), name  # LayerNorm weights untouched
    for p in (t.detach() for t in trunc + [enc.positional_embedding, dec.positional_embedding]):
        n = p.numel()
        assert n >= 16_000
        # the sample std of n normal draws has relative standard error ~1/sqrt(2n) (<= 0.6% here): 5% is > 8 sigma
        assert abs(float(p.std()) / std - 1) < 0.05, tuple(p.shape)
        assert abs(float(p.mean())) < 5 * std / math.sqrt(n)
        # torch/timm trunc_normal_ bounds are absolute (a=-2, b=2), i.e. 100 std: nothing near them is drawn, and
        # the tails are those of an untruncated normal (a bound at 2 std would leave no value beyond 2 std).
        assert float(p.abs().max()) < 2.0
    beyond = torch.cat([p.detach().flatten() for p in trunc]).abs().gt(2 * std).float().mean()
    assert 0.035 < float(beyond) < 0.056  # P(|N(0,1)| > 2) = 0.0455
    # not touched by the reference scheme: PyTorch's Kaiming-uniform Linear defaults
    bound, w = 1 / math.sqrt(enc.quant_embed.in_features), enc.quant_embed.weight.detach()
    assert float(w.abs().max()) <= bound and float(w.std()) > 0.5 * bound
    assert torch.count_nonzero(dec.conv_out.bias) > 0


def test_vit_init_differs_from_torch_defaults_and_is_seeded():
    torch.manual_seed(1)
    a, _ = _vit_pair()
    torch.manual_seed(1)
    b, _ = _vit_pair()
    assert torch.equal(a.positional_embedding, b.positional_embedding)
    # the old default was width**-0.5 * randn: std 0.0625 at width 256
    assert float(a.positional_embedding.detach().std()) < 0.025


def test_vit_drop_rate_is_block_mlp_dropout():
    torch.manual_seed(0)
    block = vit.ResidualAttentionBlock(64, 4, drop=0.5)
    assert isinstance(block.mlp.drop2, nn.Dropout) and block.mlp.drop2.p == 0.5
    enc = vit.TransformerEncoder(**dict(VIT_SMALL, drop_rate=0.25))
    assert all(b.mlp.drop2.p == 0.25 for b in enc.transformer.resblocks)
    assert "mlp.drop2" not in "".join(enc.state_dict())  # no weights: the reference layout is unchanged


# --------------------------------------------------------------------------- unimplemented reference options

REJECTED = {
    "unet": [("resamp_with_conv", False), ("tanh_out", True), ("give_pre_end", True), ("use_linear_attn", True),
             ("padding_mode", "reflect")],
    "vit": [("drop_path_rate", 0.1), ("attn_drop_rate", 0.1), ("ls_init_value", 1e-5), ("num_frames", 4),
            ("ln_pre", False), ("ln_post", False), ("act_layer", "swiglu"), ("norm_layer", "rms_norm"),
            ("mask_type", "causal"), ("use_ffn_output", False), ("logit_laplace", True)],
}
ACCEPTED = {
    "unet": [("resamp_with_conv", True), ("tanh_out", False), ("give_pre_end", False), ("use_linear_attn", False)],
    "vit": [("drop_path_rate", 0.0), ("drop_path_rate", 0), ("attn_drop_rate", 0.0), ("ls_init_value", None),
            ("num_frames", 1), ("ln_pre", True), ("ln_post", True), ("act_layer", "GELU"),
            ("norm_layer", "layer_norm"), ("mask_type", "none"), ("mask_type", None), ("use_ffn_output", True),
            ("logit_laplace", False), ("dim_ffn_output", 3072)],
}


@pytest.mark.parametrize("arch,option,value", [(a, o, v) for a, ov in REJECTED.items() for o, v in ov])
def test_unimplemented_options_are_refused_by_the_networks(arch, option, value):
    small = SMALL if arch == "unet" else VIT_SMALL
    for cls in CLASSES[arch]:
        with pytest.raises(NotImplementedError, match=rf"{option}={value!r}"):
            cls(**small, **{option: value})


@pytest.mark.parametrize("arch,option,value", [(a, o, v) for a, ov in ACCEPTED.items() for o, v in ov])
def test_implemented_option_values_are_accepted(arch, option, value):
    small = SMALL if arch == "unet" else VIT_SMALL
    for cls in CLASSES[arch]:
        cls(**small, **{option: value})


def test_vit_dim_ffn_output_is_the_reference_name_of_the_head_width():
    dec = vit.TransformerDecoder(**VIT_SMALL, dim_ffn_output=256)
    assert dec.ffn[0].out_features == 256 and dec.conv_out.in_features == 256
    assert vit.TransformerDecoder(**VIT_SMALL).ffn[0].out_features == vit.FFN_HIDDEN
