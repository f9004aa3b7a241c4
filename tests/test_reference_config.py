"""Reading reference-style GQ YAML configs and our built-in presets."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from gq_model.reference_config import list_presets, load_reference_config, preset_config

PRESETS = [f"{arch}_gq_{rate}" for arch in ("sd3unet", "bsqvit") for rate in ("0.25", "0.50", "1.00")]
GROUP = {"0.25": 16, "0.50": 8, "1.00": 4}

UNET_YAML = """
model:
  target: pit.models.autoencoder.AutoencodingEngine
  params:
    regularizer_config:
      target: {reg_target}
      params: {reg_params}
    encoder_config:
      target: pit.modules.unet.Encoder
      params:
        attn_type: vanilla
        double_z: true
        z_channels: 16
        resolution: 256
        in_channels: 3
        out_ch: 3
        ch: 128
        ch_mult: [1, 2, 4, 4]
        num_res_blocks: 2
        attn_resolutions: [32]
        dropout: 0.
    decoder_config:
      target: pit.modules.unet.Decoder
      params: ${{model.params.encoder_config.params}}
"""
GQ_REG = ("pit.quantization.gaussian.GaussianQuantRegularizer", "{format: bchw, group: 8, n_samples: 65536}")


def unet_yaml(reg_target=GQ_REG[0], reg_params=GQ_REG[1]) -> str:
    return UNET_YAML.format(reg_target=reg_target, reg_params=reg_params)


def test_list_presets():
    assert list_presets() == sorted(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_parses(name):
    cfg = preset_config(name)
    arch, rate = name.split("_gq_")
    assert cfg["arch"] == {"sd3unet": "unet", "bsqvit": "vit"}[arch]
    assert cfg["format"] == {"unet": "bchw", "vit": "blc"}[cfg["arch"]]
    assert cfg["group"] == GROUP[rate]
    assert cfg["codebook_size"] == 65536
    assert (cfg["seed"], cfg["beta"], cfg["logvar_range"]) == (42, 1.0, [-30.0, 20.0])
    assert cfg["layout"] == "strided"
    assert cfg["clamp_range"] == (None if cfg["arch"] == "unet" else [-1.0, 1.0])
    assert cfg["source"] == name
    # the ${model.params.encoder_config.params} interpolation resolved to the encoder's params
    assert cfg["decoder"] == cfg["encoder"]
    assert cfg["encoder"]["z_channels"] == 16 and cfg["encoder"]["double_z"] is True
    json.dumps(cfg)  # a plain dict: no DictConfig/ListConfig left inside


def test_unet_preset_values():
    enc = preset_config("sd3unet_gq_0.25")["encoder"]
    assert enc == dict(attn_type="vanilla", double_z=True, z_channels=16, resolution=256, in_channels=3,
                       out_ch=3, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[32], dropout=0.0)
    vit_enc = preset_config("bsqvit_gq_0.25")["encoder"]
    assert vit_enc == dict(double_z=True, z_channels=16, image_size=256, patch_size=8, width=768, layers=12,
                           heads=12, mlp_ratio=4, drop_rate=0.0)


def test_path_url_text_and_name_inputs(tmp_path):
    text = (resources.files("gq_model") / "presets" / "sd3unet_gq_0.50.yaml").read_text()
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    expected = {k: v for k, v in preset_config("sd3unet_gq_0.50").items() if k != "source"}
    for spec in (str(path), path, f"file://{path}", text, "sd3unet_gq_0.50", "sd3unet_gq_0.50.yaml"):
        cfg = load_reference_config(spec)
        assert {k: v for k, v in cfg.items() if k != "source"} == expected
        assert cfg["group"] == 8
    assert load_reference_config(str(path))["source"] == str(path)
    assert load_reference_config(text)["source"] == "<yaml text>"


def test_reference_style_yaml_with_defaults():
    cfg = load_reference_config(unet_yaml())
    assert cfg["group"] == 8 and cfg["codebook_size"] == 65536 and cfg["layout"] == "strided"
    assert cfg["decoder"]["ch_mult"] == [1, 2, 4, 4] and cfg["decoder"]["dropout"] == 0.0
    assert (cfg["seed"], cfg["beta"], cfg["logvar_range"], cfg["clamp_range"]) == (42, 1.0, [-30.0, 20.0], None)
    custom = load_reference_config(unet_yaml(reg_params="{format: bchw, group: 16, n_samples: 1024, seed: 7, "
                                             "beta: 0.0, logvar_range: [-10, 10]}"))
    assert (custom["seed"], custom["beta"], custom["logvar_range"]) == (7, 0.0, [-10.0, 10.0])


def test_gaussian_quant_regularizer2_is_contiguous():
    cfg = load_reference_config(unet_yaml("pit.quantization.gaussian.GaussianQuantRegularizer2",
                                          "{dim: 4, codebook_size: 4096}"))
    assert (cfg["layout"], cfg["group"], cfg["codebook_size"], cfg["format"]) == ("contiguous", 4, 4096, "bchw")


@pytest.mark.parametrize(
    "text, match",
    [
        (unet_yaml("pit.quantization.fsq.FSQRegularizer", "{levels: [8, 8, 8, 5, 5, 5]}"), "not a Gaussian Quant"),
        (unet_yaml("pit.quantization.lfq.LFQ", "{codebook_size: 65536}"), "not a Gaussian Quant"),
        (unet_yaml("pit.quantization.gaussian.GaussianRegularizer", "{}"), "not a Gaussian Quant"),
        (unet_yaml(reg_params="{format: bchw, group: 16}"), "n_samples"),
        (unet_yaml(reg_params="{format: blc, group: 16, n_samples: 65536}"), "format"),
        (unet_yaml(reg_params="{format: bchw, group: 5, n_samples: 65536}"), "divide"),
        (unet_yaml().replace("pit.modules.unet.Encoder", "pit.modules.flux.Encoder"), "unknown encoder target"),
        (unet_yaml().replace("pit.modules.unet.Decoder", "pit.modules.vit.TransformerDecoder"), "decoder target"),
        (unet_yaml().replace("double_z: true", "double_z: false"), "double_z"),
        (unet_yaml().replace("encoder_config.params}", "nope.params}"), "resolve"),
        ("model:\n  params:\n    regularizer_config: {target: a.b}\n", "encoder_config"),
        ("just some garbage", "not a GQ autoencoder config"),
        ("- a\n- b\n", "not a GQ autoencoder config"),
        ("model: [unclosed\n  x: {\n", "not valid YAML"),
    ],
)
def test_invalid_configs_raise_clear_errors(text, match):
    with pytest.raises(ValueError, match=match):
        load_reference_config(text)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown GQ preset"):
        preset_config("sd3unet_fsq_16")
    with pytest.raises(ValueError, match="no GQ config file or preset"):
        load_reference_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="cannot read"):
        load_reference_config(f"file://{tmp_path}/missing.yaml")


# Reference options we do not implement are refused with their name and value, never silently dropped.
UNSUPPORTED_UNET = [("resamp_with_conv", "false"), ("tanh_out", "true"), ("give_pre_end", "true"),
                    ("use_linear_attn", "true")]
UNSUPPORTED_VIT = [("drop_path_rate", "0.1"), ("attn_drop_rate", "0.1"), ("ls_init_value", "1.0e-05"),
                   ("num_frames", "4"), ("ln_pre", "false"), ("ln_post", "false"), ("act_layer", "swiglu"),
                   ("norm_layer", "rms_norm"), ("mask_type", "causal"), ("use_ffn_output", "false"),
                   ("logit_laplace", "true")]


def _vit_yaml(extra: str) -> str:
    text = (resources.files("gq_model") / "presets" / "bsqvit_gq_0.25.yaml").read_text()
    return text.replace("        drop_rate: 0.0\n", f"        drop_rate: 0.0\n        {extra}\n")


@pytest.mark.parametrize("option, value", UNSUPPORTED_UNET)
def test_unimplemented_unet_options_are_refused(option, value):
    from gq_model.reference_config import UnsupportedOption

    text = unet_yaml().replace("        dropout: 0.\n", f"        dropout: 0.\n        {option}: {value}\n")
    with pytest.raises(UnsupportedOption, match=rf"encoder_config: reference option {option}=") as err:
        load_reference_config(text)
    assert isinstance(err.value, ValueError) and isinstance(err.value, NotImplementedError)


@pytest.mark.parametrize("option, value", UNSUPPORTED_VIT)
def test_unimplemented_vit_options_are_refused(option, value):
    import re

    import yaml

    expected = f"reference option {option}={yaml.safe_load(value)!r} is not implemented"
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_reference_config(_vit_yaml(f"{option}: {value}"))


@pytest.mark.parametrize("extra", ["resamp_with_conv: true", "tanh_out: false", "give_pre_end: false",
                                   "use_linear_attn: false", "padding_mode: zeros"])
def test_implemented_unet_option_values_parse(extra):
    cfg = load_reference_config(unet_yaml().replace("        dropout: 0.\n", f"        dropout: 0.\n        {extra}\n"))
    key, value = extra.split(": ")
    assert key in cfg["encoder"] and key in cfg["decoder"]


@pytest.mark.parametrize("extra", ["drop_path_rate: 0.0", "attn_drop_rate: 0", "ls_init_value: null",
                                   "num_frames: 1", "ln_pre: true", "ln_post: true", "act_layer: gelu",
                                   "norm_layer: layer_norm", "mask_type: none", "use_ffn_output: true",
                                   "logit_laplace: false", "cross_frames: true"])
def test_implemented_vit_option_values_parse(extra):
    assert load_reference_config(_vit_yaml(extra))["arch"] == "vit"


def test_decoder_only_option_in_the_decoder_section_is_refused():
    text = unet_yaml().replace("      params: ${model.params.encoder_config.params}",
                               "      params:\n        tanh_out: true")
    with pytest.raises(ValueError, match="decoder_config: reference option tanh_out=True"):
        load_reference_config(text)


@pytest.mark.parametrize("params, match", [("use_vf: mae\n    reverse_proj: true", "use_vf='mae'"),
                                           ("use_vf: dinov2\n    reverse_proj: false", "reverse_proj=False"),
                                           ("use_vf: dinov2", "reverse_proj=None")])
def test_vf_options_refused_unless_dinov2_with_reverse_proj(params, match):
    head = "  params:\n    regularizer_config:"
    text = unet_yaml().replace(head, f"  params:\n    {params}\n    regularizer_config:")
    with pytest.raises(ValueError, match=match):
        load_reference_config(text)
    ok = unet_yaml().replace("  params:\n    regularizer_config:",
                             "  params:\n    use_vf: dinov2\n    reverse_proj: true\n    regularizer_config:")
    assert load_reference_config(ok)["arch"] == "unet"
