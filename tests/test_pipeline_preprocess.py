"""preprocess_image: every awkward input becomes a [-1,1] RGB tensor or a SampleError of the right kind."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gq_pipeline import preprocess_image
from gq_pipeline.preprocess import preprocess_uint8, to_model_input
from gq_pipeline.records import SampleError
from tests.conftest import bomb_png, encode_image, messy_images, rgb_bytes

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
