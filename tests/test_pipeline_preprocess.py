"""preprocess_image: every awkward input becomes a [-1,1] RGB tensor or a SampleError of the right kind."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gq_pipeline import preprocess_image
from gq_pipeline.preprocess import preprocess_uint8, to_model_input
from gq_pipeline.records import SampleError
from tests.helpers import bomb_png, encode_image, messy_images, rgb_bytes

IMAGES = messy_images()


@pytest.mark.parametrize("name", sorted(n for n, (_, kind) in IMAGES.items() if kind is None))
def test_every_good_input_gives_rgb_in_range(name):
    x = preprocess_image(IMAGES[name][0], 32, max_pixels=1_000_000)
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 32, 32)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0


@pytest.mark.parametrize("name", sorted(n for n, (_, kind) in IMAGES.items() if kind is not None))
def test_bad_inputs_raise_the_right_kind(name):
    data, kind = IMAGES[name]
    with pytest.raises(SampleError) as e:
        preprocess_image(data, 32, max_pixels=1_000_000)
    assert e.value.kind == kind


def test_float_input_is_uint8_over_127_5_minus_1():
    arr, size = preprocess_uint8(IMAGES["ok_00.jpg"][0], 32)
    assert arr.dtype == np.uint8 and size == (64, 48)
    assert torch.equal(preprocess_image(IMAGES["ok_00.jpg"][0], 32), torch.from_numpy(arr).float() / 127.5 - 1)
    assert torch.equal(to_model_input(arr), preprocess_image(IMAGES["ok_00.jpg"][0], 32))


def test_center_crop_matches_resize_then_crop():
    a = np.random.default_rng(0).integers(0, 255, (60, 100, 3), np.uint8)
    arr, _ = preprocess_uint8(encode_image(Image.fromarray(a), "PNG"), 32)
    full = np.asarray(Image.fromarray(a).resize((53, 32), Image.BICUBIC))  # shorter side 60 -> 32
    assert np.array_equal(arr.transpose(1, 2, 0), full[:, 10:42])


def test_alpha_is_composited_on_white():
    arr, _ = preprocess_uint8(IMAGES["rgba.png"][0], 40)  # left half transparent
    assert (arr[:, :, :18] == 255).all()


def test_16_bit_grayscale_is_scaled_not_clipped():
    g = np.array([[0, 257 * 100, 65535, 65535]] * 4, dtype=np.uint16)
    arr, _ = preprocess_uint8(encode_image(Image.fromarray(g), "PNG"), 8, crop="none", multiple_of=4)
    assert arr[0, 0].tolist()[:1] == [0] and arr[0, 0, -1] == 255
    assert (arr[0] == arr[1]).all() and (arr[1] == arr[2]).all()


def test_exif_orientation_is_applied():
    arr, size = preprocess_uint8(IMAGES["exif_rotated.jpg"][0], 32, crop="none")
    assert size == (32, 64)  # stored 64x32, displayed 32 wide and 64 high
    assert arr.shape == (3, 64, 32)


def test_animated_gif_uses_first_frame():
    arr, _ = preprocess_uint8(IMAGES["animated.gif"][0], 32)
    assert abs(int(arr.mean()) - 30) <= 2


def test_crop_none_keeps_aspect_and_multiple_of_factor():
    arr, _ = preprocess_uint8(rgb_bytes(50, 90), 32, crop="none", multiple_of=8)
    assert arr.shape == (3, 32, 56)  # 90 * 32/50 = 57.6 -> 58 -> cut to 56


def test_extreme_aspect_ratio_does_not_allocate_full_resize():
    data = encode_image(Image.fromarray(np.zeros((2, 20000, 3), np.uint8)), "PNG")
    assert preprocess_uint8(data, 32)[0].shape == (3, 32, 32)
    with pytest.raises(SampleError) as e:
        preprocess_uint8(data, 32, crop="none", max_pixels=1_000_000)
    assert e.value.kind == "too_large"


def test_max_pixels_is_configurable_and_checked_before_decoding():
    with pytest.raises(SampleError) as e:
        preprocess_image(rgb_bytes(40, 40), 32, max_pixels=1000)
    assert e.value.kind == "too_large" and "1600" in e.value.message
    with pytest.raises(SampleError) as e:
        preprocess_image(bomb_png(), 32)  # bogus data: only the header may be read
    assert e.value.kind == "too_large"


def test_bad_arguments():
    with pytest.raises(ValueError):
        preprocess_image(rgb_bytes(40, 40), 30)  # not a multiple of 8
    with pytest.raises(ValueError):
        preprocess_image(rgb_bytes(40, 40), 32, crop="random")


# ---------------------------------------------------------------------------------------------- reference policy
# The GQ reference feeds models ``Normalize(0.5, 0.5)(ToTensor()(CenterCrop(S)(Resize(S)(Image.open(f).convert(
# "RGB")))))``. The expectation below redoes that step by step with PIL and exact integer arithmetic, independently of
# gq_pipeline.preprocess: torchvision's long side is int(S * long / short), i.e. S * long // short for the sizes here,
# and its crop offset int(round((d - S) / 2)) rounds halves to even.


def _half_to_even(twice: int) -> int:
    """round(twice / 2) with halves to the even neighbour, in integers."""
    q, r = divmod(twice, 2)
    return q + 1 if r and q % 2 else q


def _by_hand_reference(data: bytes, size: int) -> torch.Tensor:
    import io

    im = Image.open(io.BytesIO(data))
    rgb = im.convert("RGB")  # alpha dropped; EXIF orientation left as stored
    w, h = rgb.size
    nw, nh = (size, size * h // w) if w <= h else (size * w // h, size)
    if (nw, nh) != (w, h):
        rgb = rgb.resize((nw, nh), Image.BILINEAR)
    left, top = _half_to_even(nw - size), _half_to_even(nh - size)
    a = np.array(rgb.crop((left, top, left + size, top + size)), dtype=np.uint8)
    t = torch.from_numpy(a).permute(2, 0, 1).to(torch.float32).div(255)  # ToTensor
    return t.sub(0.5).div(0.5)  # Normalize(0.5, 0.5)


def _exif_rotated_jpeg(h: int, w: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    return encode_image(Image.fromarray(np.random.default_rng(3).integers(0, 255, (h, w, 3), np.uint8)), "JPEG",
                        exif=exif.tobytes())


def _rgba_with_colour_under_alpha(h: int, w: int) -> bytes:
    a = np.random.default_rng(4).integers(0, 255, (h, w, 4), np.uint8)
    a[:, : w // 2, 3] = 0  # transparent left half over random colours
    return encode_image(Image.fromarray(a, "RGBA"), "PNG")


def _rgb_png(h: int, w: int, seed: int) -> bytes:
    return encode_image(Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)), "PNG")


S = 32
REFERENCE_CASES = {
    # name: (bytes, what it exercises)
    "landscape_odd": (_rgb_png(67, 101, 0), "101x67 -> 48x32, offset 8"),
    "portrait_truncated": (_rgb_png(97, 60, 1), "32*97/60 = 51.7: reference 51, gq rounds to 52"),
    "half_offset_up": (_rgb_png(70, 64, 2), "long side 35: offset round(1.5) = 2, gq floors to 1"),
    "half_offset_down": (_rgb_png(37, 32, 5), "no resize (short side 32), offset round(2.5) = 2, not 3"),
    "no_resize_offset": (_rgb_png(35, 32, 8), "no resize, offset round(1.5) = 2, gq floors to 1"),
    "rgba": (_rgba_with_colour_under_alpha(45, 77), "alpha dropped: the colours under it show"),
    "exif": (_exif_rotated_jpeg(40, 72), "orientation 6 present and not applied"),
    "palette": (encode_image(Image.fromarray(np.random.default_rng(6).integers(0, 255, (50, 41, 3), np.uint8))
                             .convert("P"), "PNG"), "palette through PIL's convert"),
    "gray": (encode_image(Image.fromarray(np.random.default_rng(7).integers(0, 255, (33, 90), np.uint8)), "PNG"),
             "grayscale"),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_CASES))
def test_reference_policy_equals_the_step_by_step_pipeline(name):
    data, _why = REFERENCE_CASES[name]
    x = preprocess_image(data, S, policy="reference")
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, S, S)
    assert torch.equal(x, _by_hand_reference(data, S))  # same PIL calls, IEEE float32 division: exact


# half_offset_down: with no resize and round(2.5) = 2 = floor(2.5), both policies give the same pixels
@pytest.mark.parametrize("name", sorted(set(REFERENCE_CASES) - {"half_offset_down"}))
def test_reference_and_gq_policies_differ_on_awkward_images(name):
    data, _why = REFERENCE_CASES[name]
    ref, gq = preprocess_uint8(data, S, policy="reference")[0], preprocess_uint8(data, S)[0]
    assert not np.array_equal(ref, gq)  # bilinear vs bicubic, EXIF, alpha or the crop offset


def test_reference_policy_details():
    from gq_pipeline.preprocess import reference_crop_offsets, reference_resized_size

    assert reference_resized_size(60, 97, 32) == (32, 51)  # truncated (gq: 52)
    assert reference_resized_size(101, 67, 32) == (48, 32)
    assert reference_resized_size(40, 40, 32) == (32, 32)
    assert reference_crop_offsets(32, 33, 32) == (0, 0)  # round(0.5) = 0
    assert reference_crop_offsets(35, 37, 32) == (2, 2)  # round(1.5) = 2, round(2.5) = 2
    # EXIF: the stored size is reported and kept (gq reports the displayed one)
    data = REFERENCE_CASES["exif"][0]
    assert preprocess_uint8(data, S, policy="reference")[1] == (72, 40)
    assert preprocess_uint8(data, S)[1] == (40, 72)
    # alpha: the reference shows the stored colour where gq shows white
    rgba = REFERENCE_CASES["rgba"][0]
    gq_px, ref_px = preprocess_uint8(rgba, S)[0], preprocess_uint8(rgba, S, policy="reference")[0]
    assert (gq_px[:, :, :8] == 255).all() and not (ref_px[:, :, :8] == 255).all()


def test_both_normalizations_are_the_same_float32_values():
    """(u/255 - 0.5)/0.5 (ToTensor + Normalize) and u/127.5 - 1 agree bit for bit for every uint8 value, so one
    to_model_input serves both policies (IEEE-754 division and subtraction are correctly rounded)."""
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_model_input(u), u.to(torch.float32).div(255).sub(0.5).div(0.5))


def test_reference_policy_through_pil_and_array_inputs():
    import io

    from gq_pipeline.preprocess import preprocess_array_uint8, preprocess_pil_uint8

    for name in ("exif", "rgba", "landscape_odd"):
        data = REFERENCE_CASES[name][0]
        want = preprocess_uint8(data, S, policy="reference")
        got = preprocess_pil_uint8(Image.open(io.BytesIO(data)), S, policy="reference")
        assert np.array_equal(got[0], want[0]) and got[1] == want[1]
    rgba = np.asarray(Image.open(io.BytesIO(REFERENCE_CASES["rgba"][0])))
    arr, size = preprocess_array_uint8(rgba, S, policy="reference")
    assert np.array_equal(arr, preprocess_uint8(REFERENCE_CASES["rgba"][0], S, policy="reference")[0])


def test_reference_policy_arguments_and_limits():
    with pytest.raises(ValueError, match="preprocess must be one of"):
        preprocess_image(rgb_bytes(40, 40), 32, policy="torchvision")
    with pytest.raises(ValueError, match="only the centre crop"):
        preprocess_image(rgb_bytes(40, 40), 32, crop="none", policy="reference")
    # the reference resizes the whole image: above max_pixels after resizing it is an error, not an approximation
    data = encode_image(Image.fromarray(np.zeros((2, 2000, 3), np.uint8)), "PNG")
    with pytest.raises(SampleError) as e:
        preprocess_uint8(data, 32, policy="reference", max_pixels=1_000_000)
    assert e.value.kind == "too_large" and "32000x32" in e.value.message
    assert preprocess_uint8(data, 32, max_pixels=1_000_000)[0].shape == (3, 32, 32)  # gq's box resize
    # errors keep their kinds
    with pytest.raises(SampleError) as e:
        preprocess_image(b"", 32, policy="reference")
    assert e.value.kind == "empty"
    with pytest.raises(SampleError) as e:
        preprocess_image(b"not an image", 32, policy="reference")
    assert e.value.kind == "decode"


def test_preprocess_settings_record_the_policy(tiny_model):
    from gq_pipeline.preprocess import preprocess_settings

    gq = preprocess_settings(tiny_model, 32, "center", "fp32", 1000)
    ref = preprocess_settings(tiny_model, 32, "center", "fp32", 1000, policy="reference")
    assert gq["policy"] == "gq" and gq["resize"] == "PIL bicubic, shorter side" and gq["alpha"] == "composite on white"
    assert ref["policy"] == "reference" and "bilinear" in ref["resize"] and ref["exif"] == "ignored"
    with pytest.raises(ValueError):
        preprocess_settings(tiny_model, 32, "none", "fp32", 1000, policy="reference")


def test_tokenize_records_the_reference_policy_and_refuses_mixing(tiny_model_dir, tiny_model, tmp_path, capsys):
    """``gq tokenize --preprocess reference``: the policy is in every shard's metadata, every unit record and the
    manifest; the tokens are the model's on the reference pixels; a rerun with the other policy is refused."""
    import glob
    import json
    import os

    import pyarrow.parquet as pq

    from gq_model.cli import main as gq_main

    folder = tmp_path / "in"
    folder.mkdir()
    names = ("exif", "rgba", "portrait_truncated", "half_offset_up")
    for name in names:
        ext = "jpg" if name == "exif" else "png"
        (folder / f"{name}.{ext}").write_bytes(REFERENCE_CASES[name][0])
    out = str(tmp_path / "tokens")
    base = ["tokenize", "--model", tiny_model_dir, "--input", str(folder), "--output", out, "--image-size", str(S),
            "--unit-size", "2", "--quiet"]
    assert gq_main(base + ["--preprocess", "reference"]) == 0
    manifest = json.load(open(os.path.join(out, ".gq", "manifest.json")))
    assert manifest["preprocess"]["policy"] == "reference" and "bilinear" in manifest["preprocess"]["resize"]
    records = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, ".gq", "units", "*.json")))]
    assert len(records) == 2 and all(r["preprocess"] == manifest["preprocess"] for r in records)
    rows = []
    for p in sorted(glob.glob(os.path.join(out, "parquet", "*.parquet"))):
        meta = pq.read_schema(p).metadata
        assert json.loads(meta[b"gq.preprocess"]) == manifest["preprocess"]
        rows += pq.read_table(p).to_pylist()
    assert len(rows) == len(names)
    for row in rows:
        data = open(row["source"].removeprefix("file://"), "rb").read()
        want = tiny_model.tokenize(preprocess_image(data, S, policy="reference")[None])[0].numpy()
        got = np.asarray(row["tokens"]).reshape(want.shape)
        assert np.array_equal(got, want), row["source"]
        if "exif" in row["source"]:
            assert (row["width"], row["height"]) == (72, 40)  # stored size: no EXIF rotation
    capsys.readouterr()
    assert gq_main(base) == 1  # the default policy, gq, on the reference output
    err = capsys.readouterr().err
    assert "policy 'reference' (this run: 'gq')" in err
    assert json.load(open(os.path.join(out, ".gq", "manifest.json")))["preprocess"]["policy"] == "reference"


def test_training_data_with_the_reference_policy_sees_the_tokenizer_pixels(tmp_path):
    """``data.preprocess: reference``: the training reader and transform give ``preprocess_image(..., policy=
    "reference")`` exactly (EXIF and alpha included), and the gq default is unchanged."""
    from pathlib import Path

    from jobs.training.config import load_config
    from jobs.training.data import ImageTransform, SampleReader

    for name in ("exif", "rgba", "portrait_truncated", "half_offset_up"):
        data = REFERENCE_CASES[name][0]
        (tmp_path / f"{name}.png").write_bytes(data)
        ref = ("file", str(tmp_path / f"{name}.png"))
        for policy in ("gq", "reference"):
            img = SampleReader(preprocess=policy).read(ref)
            got = ImageTransform(S, preprocess=policy)(img)
            assert torch.equal(got, preprocess_image(data, S, policy=policy)), (name, policy)
    # random crops draw from the same resized image, inside it
    img = SampleReader(preprocess="reference").read(("file", str(tmp_path / "portrait_truncated.png")))
    crop = ImageTransform(S, resize=40, crop="random", preprocess="reference")(img, np.random.default_rng(0))
    assert tuple(crop.shape) == (3, S, S)
    with pytest.raises(ValueError):
        ImageTransform(S, preprocess="bogus")
    with pytest.raises(ValueError, match="data.preprocess"):
        load_config(Path(__file__).parents[1] / "configs" / "train_tiny.yaml", ["data.preprocess=bogus"])


def test_gq_tokenizer_reference_policy(tiny_model):
    """``GQTokenizer(preprocess="reference")``: the reference pixels' tokens, and the policy in its metadata."""
    import json

    from gq_pipeline.plugin import GQTokenizer

    names = ("exif", "rgba", "half_offset_up")
    batch = {"image": [REFERENCE_CASES[n][0] for n in names]}
    tok = GQTokenizer(tiny_model, image_size=S, preprocess="reference")
    out = tok(batch)
    for i, name in enumerate(names):
        want = tiny_model.tokenize(preprocess_image(REFERENCE_CASES[name][0], S, policy="reference")[None])[0]
        assert np.array_equal(np.asarray(out["tokens"][i]).reshape(want.shape), want.numpy()), name
    assert json.loads(tok.metadata["gq.preprocess"])["policy"] == "reference"
    assert json.loads(GQTokenizer(tiny_model, image_size=S).metadata["gq.preprocess"])["policy"] == "gq"
    with pytest.raises(ValueError, match="only the centre crop"):
        GQTokenizer(tiny_model, image_size=S, crop="none", preprocess="reference")
