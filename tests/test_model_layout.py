"""``GQModel`` owns its token layout: shards store ``[B, G, h, w]`` for every architecture, and the model maps them
to and from its own (``[B, L, G]`` for the ViT) with ``to_grid``/``from_grid``, used by tokenize and decode alike."""
from __future__ import annotations

import numpy as np
import torch

from gq_model import GQConfig, GQModel
from gq_model.state_dict_check import StateDictMismatch, check_keys, compare_keys
from gq_pipeline.worker import encode_uint8

VIT = dict(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2, z_channels=4, double_z=True)


def _vit() -> GQModel:
    torch.manual_seed(0)
    dec = {k: v for k, v in VIT.items() if k != "double_z"}
    return GQModel(GQConfig(arch="vit", encoder=VIT, decoder=dec, codebook_size=64, group=2)).eval()


def test_vit_grid_is_row_major_and_round_trips():
    model = _vit()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = model.tokenize(x)  # [B, L, G]
    assert tokens.shape == (2, 16, 2)
    grid = model.to_grid(tokens, (32, 32))
    assert grid.shape == (2, 2, 4, 4)
    assert torch.equal(grid[1, :, 2, 3], tokens[1, 2 * 4 + 3])  # position (i, j) is sequence index i * w + j
    assert torch.equal(model.from_grid(grid), tokens)
    assert model.detokenize(model.from_grid(grid)).shape == (2, 3, 32, 32)


def test_pipeline_tokens_are_the_models_grid():
    """encode_uint8 (gq tokenize, the plugin) returns exactly to_grid of the model's own tokens and latents."""
    model = _vit()
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    tokens, latent = encode_uint8(model, images, torch.device("cpu"), autocast=False, latents=True,
                                  token_dtype=np.int32)
    x = torch.from_numpy(images).float() / 127.5 - 1
    with torch.no_grad():
        mu, logvar = model.encode_moments(x)
        idx, _ = model.quantizer.quantize(mu.float(), logvar.float())
    assert tokens.shape == (2, 2, 4, 4) and np.array_equal(tokens, model.to_grid(idx, (32, 32)).numpy())
    assert latent.shape == (2, 4, 4, 4)
    assert np.allclose(latent, model.to_grid(mu, (32, 32)).to(torch.float16).numpy(), atol=1e-3)


def test_check_keys_names_every_kind_of_mismatch():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3, 1), "c": (4,)}
    got = {"a": torch.zeros(2), "b": torch.zeros(1, 3), "d": torch.zeros(1)}
    mismatch = compare_keys(expected, got)
    assert mismatch.missing == ["c"] and mismatch.unexpected == ["d"]
    assert mismatch.shapes == ["b: file (1, 3) vs model (3, 1)"]
    try:
        check_keys(expected, got, what="w.safetensors does not match", hint="Wrong model?")
    except StateDictMismatch as e:
        assert isinstance(e, ValueError) and e.mismatch == mismatch
        assert str(e) == ("w.safetensors does not match: 1 missing key(s): c | 1 unexpected key(s): d | "
                          "1 shape mismatch(es): b: file (1, 3) vs model (3, 1). Wrong model?")
    else:
        raise AssertionError("check_keys accepted a mismatching state dict")
    check_keys(expected, {"a": torch.zeros(2), "b": torch.zeros(3, 1), "c": torch.zeros(4)}, what="ok")
