"""``encoder.norm_groups``: the GroupNorm group count of the UNet (the reference's 32 unless a config says otherwise).

Why it exists (issue 18 item 8): a group of one channel is an instance norm, which removes each channel's mean over
the image. At width 32 with 32 groups, an image's overall colour survives only as what the zero-padded borders make of
it, so the first built-in demo model returned flat green as grey and tinted whole photos.
"""
from __future__ import annotations

import pytest
import torch

from gq_model import GQModel


def _model(norm_groups: int | None, seed: int = 0) -> GQModel:
    enc = {"ch": 32, "out_ch": 3, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
           "resolution": 64, "in_channels": 3, "z_channels": 4, "double_z": True}
    if norm_groups is not None:
        enc["norm_groups"] = norm_groups
    torch.manual_seed(seed)
    return GQModel({"arch": "unet", "encoder": enc, "decoder": dict(enc), "codebook_size": 256, "group": 4}).eval()


def test_default_is_the_reference_groupnorm_32():
    m = _model(None)
    norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.GroupNorm)]
    assert norms and all(n.num_groups == 32 and n.eps == 1e-6 for n in norms)
    assert "norm_groups" not in m.config.encoder  # reference configs and bundles are unchanged


def test_one_channel_per_group_forgets_each_channels_offset_and_four_do_not():
    """Why the option exists, at the layer where it happens: GroupNorm over one channel per group gives the same
    output for a feature map and that map plus a different constant per channel (an overall colour, once conv_in
    has mixed RGB into 32 channels); over four channels per group, or all 32 in one group, the offsets'
    differences survive."""
    from gq_model.unet import Normalize

    torch.manual_seed(0)
    h = torch.randn(1, 32, 16, 16)
    offset = torch.randn(1, 32, 1, 1)
    one, four, all_ = Normalize(32), Normalize(32, 8), Normalize(32, 1)
    assert torch.allclose(one(h), one(h + offset), atol=1e-5)
    assert (four(h) - four(h + offset)).abs().max() > 0.1
    assert (all_(h) - all_(h + offset)).abs().max() > 0.1  # the built-in demo model's setting


def test_norm_groups_round_trips_through_a_bundle_and_changes_the_fingerprint(tmp_path):
    a, b = _model(32), _model(8)
    b.load_state_dict(a.state_dict())
    assert a.model_fingerprint != b.model_fingerprint  # same weights, another network
    b.save_pretrained(tmp_path / "b")
    loaded = GQModel.from_pretrained(str(tmp_path / "b"))
    assert loaded.config.encoder["norm_groups"] == 8 and loaded.model_fingerprint == b.model_fingerprint
    assert all(n.num_groups == 8 for n in loaded.modules() if isinstance(n, torch.nn.GroupNorm))


def test_a_group_count_that_does_not_divide_the_widths_is_refused():
    with pytest.raises(ValueError, match="32 channels do not split into 5 groups"):
        _model(5)
