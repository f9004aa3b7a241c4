"""Image bytes -> model input, identical in the pipeline and for users calling :func:`preprocess_image` themselves.

The pipeline moves images between processes as uint8 ``[3,H,W]`` (4x smaller than float32) and converts them to
float only inside the model actor, with :func:`to_model_input`; ``preprocess_image`` is exactly
``to_model_input(preprocess_uint8(...))``, so tokens written by ``gq tokenize`` equal
``model.tokenize(preprocess_image(data, S)[None])`` bit for bit.

Conventions (what a user needs to know to reproduce them):

* decode with PIL; only the first frame of animated images (GIF, WebP, APNG) is used;
* EXIF orientation is applied first (``ImageOps.exif_transpose``); ``width``/``height`` reported for a sample are the
  size after that rotation, before resizing;
* colour: palette, grayscale, 1-bit, CMYK (PIL's conversion, no ICC colour management), YCbCr -> RGB; images with
  transparency (RGBA, LA, PA, palette or RGB with a transparency key) are **composited onto white**, as they would
  show on a white page (dropping alpha instead would expose arbitrary colours stored under transparent pixels);
  16-bit grayscale (``I;16``) is mapped to 8 bits by ``round(v / 257)``; 32-bit ``I`` the same when its values
  exceed 255; float ``F`` is scaled by 255 when its values lie in [0, 1], clipped to [0, 255] otherwise;
* resize so the shorter side is ``image_size`` (PIL bicubic, which antialiases when shrinking), then
  ``crop="center"`` keeps the centred ``image_size`` square; ``crop="none"`` keeps the whole resized image except
  the longer side is centre-cropped to a multiple of the model's downsampling factor (``multiple_of``, 8 for the
  UNet models), so non-square images give non-square token grids. Images more elongated than 16:1 are resized
  through ``Image.resize(box=...)`` over just the kept region (same sampling positions, so they never allocate
  their full resized size); PIL's two-pass rounding can then differ from resize-then-crop by a few levels;
* float input is ``uint8 / 127.5 - 1`` in float32, giving [-1, 1].

That is the default policy, ``policy="gq"``. ``policy="reference"`` reproduces the GQ reference's data pipeline
(torchvision ``Resize(S)``, ``CenterCrop(S)``, ``ToTensor``, ``Normalize(0.5, 0.5)`` on
``Image.open(f).convert("RGB")``) so that a file gives the reference pipeline's pixels, hence its tokens and metrics:

* PIL ``convert("RGB")``: **no** EXIF transposition (``width``/``height`` are the stored size), alpha **dropped**
  (the colours stored under transparent pixels show), every mode through PIL's own conversion; first frame only;
* resize the shorter side to ``S`` with PIL **bilinear** (PIL antialiases when shrinking; torchvision hands PIL
  images to ``Image.resize``), the longer side ``int(S * long / short)``, i.e. **truncated**, as torchvision's
  ``_compute_resized_output_size`` does; the whole image is resized (no box shortcut), so a resized image above
  ``max_pixels`` is a ``too_large`` error instead of an approximation;
* ``CenterCrop(S)``: offsets ``int(round((d - S) / 2))`` (Python's round, half to even), where gq floors;
* float: ``(uint8 / 255 - 0.5) / 0.5`` in float32, which is bit-identical to ``uint8 / 127.5 - 1`` for all 256
  values (tested), so :func:`to_model_input` serves both policies;
* only ``crop="center"`` exists (the reference has no aspect-preserving mode).

Why gq's is the default: EXIF-rotated photos (most phone JPEGs) would otherwise be tokenized sideways, transparent
PNGs would show whatever colour their encoder left under the alpha, and bicubic keeps more detail than bilinear.
The bomb guard and error kinds are the same for both policies.

A decompression-bomb guard refuses images above ``max_pixels`` (read from the header, before decoding) with a
``too_large`` :class:`~gq_pipeline.records.SampleError`; undecodable data gives ``decode``, zero bytes ``empty``.

:func:`decode_sample` is the pipeline's door to all this: one read sample becomes its row, with pixels or with the
error that stopped it, and never raises for one sample's fault.
"""
from __future__ import annotations

import contextlib
import io
import pickle
import threading
import warnings

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from gq_pipeline.records import INT32_MAX, ROW_ERROR, ROW_OK, SampleError, clean_message, is_utf8, printable

if TYPE_CHECKING:  # torch is imported lazily: Ray read tasks decode images and never need it
    import torch

    from gq_pipeline.sources import RawSample

__all__ = ["preprocess_image", "preprocess_uint8", "to_model_input", "decode_image", "to_rgb", "resize_crop",
           "shorter_side_size", "DEFAULT_MAX_PIXELS", "CROP_MODES", "preprocess_pil", "preprocess_pil_uint8",
           "preprocess_array", "preprocess_array_uint8", "PREPROCESS_POLICIES", "check_policy", "decode_sample",
           "reference_rgb", "reference_resized_size", "reference_crop_offsets", "reference_resize_crop"]

DEFAULT_MAX_PIXELS = 100_000_000
CROP_MODES = ("center", "none")
PREPROCESS_POLICIES = ("gq", "reference")  # gq: this module's policy; reference: the GQ reference's (module doc)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Above this ratio of resized to kept pixels (aspect ratio beyond 16:1 with a centre crop) resize only the crop box.
_FULL_RESIZE_FACTOR = 16


_LIMITS_LOCK = threading.Lock()
_ACTIVE_LIMITS: list[int] = []  # max_pixels of the decodes in progress (threads share PIL's global)
_SAVED_LIMIT: list = []


@contextlib.contextmanager
def _pil_limits(max_pixels: int):
    """PIL's global bomb limit set from ``max_pixels`` while decoding.

    Our header check covers the image itself, but some formats open *other* images inside ``load()`` (an ``.icns``
    holds PNG or JPEG 2000 icons whose headers may claim any size: 1.5 KB of them took 7.9 GiB): PIL checks those
    against ``Image.MAX_IMAGE_PIXELS`` only, and raises above twice that, so it is set to half of ``max_pixels``.
    Decode threads share the global: it holds the smallest limit in use and is restored when the last one ends.
    """
    limit = max(1, (int(max_pixels) + 1) // 2)
    with _LIMITS_LOCK:
        if not _ACTIVE_LIMITS:
            _SAVED_LIMIT[:] = [Image.MAX_IMAGE_PIXELS]
        _ACTIVE_LIMITS.append(limit)
        Image.MAX_IMAGE_PIXELS = min(_ACTIVE_LIMITS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        with _LIMITS_LOCK:
            _ACTIVE_LIMITS.remove(limit)
            Image.MAX_IMAGE_PIXELS = min(_ACTIVE_LIMITS) if _ACTIVE_LIMITS else _SAVED_LIMIT[0]


def _check_size(w: int, h: int, max_pixels: int, what: str = "") -> None:
    if w * h > max_pixels:
        raise SampleError("too_large", f"{what}{w}x{h} = {w * h} pixels exceeds --max-pixels {max_pixels}", w, h)


def _check_before_load(im: Image.Image, max_pixels: int) -> None:
    """Format-specific sizes that ``load()`` would allocate beyond the header's ``size``: an ``.icns`` decodes its
    best icon at ``size * scale`` (and its embedded PNG/JPEG 2000 icons are checked by PIL, see
    :func:`_pil_limits`)."""
    best = getattr(im, "best_size", None)
    if isinstance(best, tuple) and len(best) == 3:
        w, h, scale = (int(v) for v in best)
        _check_size(w * scale, h * scale, max_pixels, "icon ")


def _open(data: bytes, max_pixels: int, exif: bool = True) -> Image.Image:
    if data is None or len(data) == 0:
        raise SampleError("empty", "zero-byte image")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise SampleError("too_large", str(e)) from None
    except Exception as e:  # UnidentifiedImageError, SyntaxError, struct.error ... from a broken header
        raise SampleError("decode", f"cannot identify image: {type(e).__name__}: {e}") from None
    w, h = im.size
    _check_size(w, h, max_pixels)
    if w <= 0 or h <= 0:
        raise SampleError("decode", f"invalid image size {w}x{h}")
    try:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        _check_before_load(im, max_pixels)
        im.load()
        _check_size(*im.size, max_pixels, "decoded to ")  # some formats (ICNS, ICO) change size in load()
        if exif:
            im = ImageOps.exif_transpose(im)
    except SampleError:
        raise
    except Image.DecompressionBombError as e:
        raise SampleError("too_large", str(e), w, h) from None
    except MemoryError:
        raise SampleError("too_large", f"out of memory decoding a {w}x{h} image", w, h) from None
    except Exception as e:  # truncated files, bad chunks, zlib errors ...
        raise SampleError("decode", f"{type(e).__name__}: {e}", w, h) from None
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB with the colour policy in the module doc (transparency composited onto white)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    try:
        if mode in _ALPHA_MODES or "transparency" in im.info:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        if mode.startswith("I") or mode == "F":
            a = np.asarray(im)
            if mode == "F":
                a = a.astype(np.float64)
                a = a * 255.0 if np.nanmax(a) <= 1.0 else a
                a = np.clip(np.nan_to_num(a), 0, 255)
            elif mode.startswith("I;16") or a.max() > 255:
                a = np.clip(a.astype(np.float64), 0, 65535) / 257.0
            a = np.rint(a).astype(np.uint8)
            if a.ndim == 2:
                a = np.repeat(a[:, :, None], 3, axis=2)
            return Image.fromarray(np.ascontiguousarray(a[:, :, :3]), "RGB")
        return im.convert("RGB")
    except Exception as e:
        raise SampleError("unsupported", f"cannot convert PIL mode {mode!r} to RGB: {e}", *im.size) from None


def check_policy(policy: str, crop: str = "center") -> None:
    """``ValueError`` for an unknown policy, or for ``crop="none"`` with the reference policy (which has none)."""
    if policy not in PREPROCESS_POLICIES:
        raise ValueError(f"preprocess must be one of {PREPROCESS_POLICIES}, got {policy!r}")
    if policy == "reference" and crop != "center":
        raise ValueError("preprocess 'reference' has only the centre crop (the reference pipeline is Resize + "
                         f"CenterCrop); got crop {crop!r}")


def reference_rgb(im: Image.Image) -> Image.Image:
    """The reference's colour step: ``im.convert("RGB")`` as PIL does it (alpha dropped, no EXIF transposition)."""
    if im.mode == "RGB":
        return im
    try:
        return im.convert("RGB")
    except Exception as e:
        raise SampleError("unsupported", f"cannot convert PIL mode {im.mode!r} to RGB: {e}", *im.size) from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, policy: str = "gq") -> Image.Image:
    """Encoded bytes -> RGB PIL image: first frame, EXIF orientation, colour policy, bomb guard (module doc).

    The training job decodes with this too, so a model is trained on exactly the pixels it later tokenizes.
    ``policy="reference"``: no EXIF transposition and :func:`reference_rgb`. Raises
    :class:`~gq_pipeline.records.SampleError`.
    """
    check_policy(policy)
    with _pil_limits(max_pixels):
        if policy == "reference":
            return reference_rgb(_open(data, max_pixels, exif=False))
        return to_rgb(_open(data, max_pixels))


def shorter_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``size`` (the longer one rounded, never below ``size``)."""
    scale = size / min(w, h)
    if w <= h:
        return size, max(size, round(h * scale))
    return max(size, round(w * scale)), size


def reference_resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(size)``: shorter side ``size``, longer ``int(size*long/short)``
    (truncated, never below ``size``)."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (size, new_long) if w <= h else (new_long, size)


def reference_crop_offsets(w: int, h: int, size: int) -> tuple[int, int]:
    """(left, top) of torchvision's ``CenterCrop(size)`` on a ``w x h`` image: ``int(round((d - size) / 2))``."""
    return int(round((w - size) / 2.0)), int(round((h - size) / 2.0))


def reference_resize_crop(im: Image.Image, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """torchvision ``Resize(size)`` then ``CenterCrop(size)`` on a PIL image: PIL bilinear over the whole image
    (module doc), then the ``size`` square at :func:`reference_crop_offsets`."""
    w, h = im.size
    new_w, new_h = reference_resized_size(w, h, size)
    if new_w * new_h > max_pixels:
        raise SampleError("too_large", f"resized to {new_w}x{new_h} by the reference policy (which resizes the "
                                       f"whole image), which exceeds --max-pixels {max_pixels}", w, h)
    if (new_w, new_h) != (w, h):  # torchvision returns an image already at the target size unchanged
        im = im.resize((new_w, new_h), Image.BILINEAR)
    x0, y0 = reference_crop_offsets(new_w, new_h, size)
    return im.crop((x0, y0, x0 + size, y0 + size))


def resize_crop(im: Image.Image, size: int, crop: str = "center", multiple_of: int = 8,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Shorter side to ``size`` (PIL bicubic), then the centre ``size`` square (``crop="center"``) or the
    ``multiple_of`` crop of ``crop="none"`` (module doc); the tokenizer's resize, shared with training."""
    w, h = im.size
    new_w, new_h = shorter_side_size(w, h, size)
    if crop == "center":
        out_w = out_h = size
    else:
        out_w, out_h = new_w // multiple_of * multiple_of, new_h // multiple_of * multiple_of
        if out_w * out_h > max_pixels:
            raise SampleError("too_large", f"resized to {out_w}x{out_h} with --crop none, which exceeds "
                                           f"--max-pixels {max_pixels}", w, h)
    x0, y0 = (new_w - out_w) // 2, (new_h - out_h) // 2
    if new_w * new_h <= _FULL_RESIZE_FACTOR * out_w * out_h:
        return im.resize((new_w, new_h), Image.BICUBIC).crop((x0, y0, x0 + out_w, y0 + out_h))
    # Very elongated image: resize only the kept box (same sampling positions, no giant intermediate image).
    sx, sy = w / new_w, h / new_h
    box = (x0 * sx, y0 * sy, (x0 + out_w) * sx, (y0 + out_h) * sy)
    return im.resize((out_w, out_h), Image.BICUBIC, box=box)


def preprocess_uint8(data: bytes, image_size: int, crop: str = "center", *, max_pixels: int = DEFAULT_MAX_PIXELS,
                     multiple_of: int = 8, policy: str = "gq") -> tuple[np.ndarray, tuple[int, int]]:
    """Decode and resize: (uint8 ``[3,H,W]``, (width, height) after EXIF rotation; the stored size with
    ``policy="reference"``). Raises :class:`SampleError`."""
    _check_geometry(image_size, crop, multiple_of, policy)
    im = decode_image(data, max_pixels, policy)
    return _rgb_to_uint8(im, image_size, crop, max_pixels, multiple_of, policy), im.size


def to_model_input(images: "np.ndarray | torch.Tensor") -> "torch.Tensor":
    """uint8 ``[...,3,H,W]`` -> float32 in [-1, 1] (``x / 127.5 - 1``): the one conversion every path uses."""
    import torch

    t = torch.as_tensor(images)
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {t.dtype}")
    return t.to(torch.float32).div_(127.5).sub_(1.0)


def preprocess_image(data: bytes, image_size: int, crop: str = "center", *, max_pixels: int = DEFAULT_MAX_PIXELS,
                     multiple_of: int = 8, policy: str = "gq") -> "torch.Tensor":
    """Encoded image bytes -> float32 ``[3,S,S]`` in [-1, 1] (``crop="none"``: ``[3,H,W]``, see module doc).

    ``policy="reference"`` gives the GQ reference pipeline's input for the same file (module doc).

    Raises :class:`~gq_pipeline.records.SampleError` (``kind`` = ``empty``, ``decode``, ``too_large`` or
    ``unsupported``) for inputs that cannot become an image.
    """
    arr, _ = preprocess_uint8(data, image_size, crop, max_pixels=max_pixels, multiple_of=multiple_of, policy=policy)
    return to_model_input(arr)


# ---------------------------------------------------------------------------------------------- decoded inputs
# Pipelines that decode images themselves (Ray ``read_images``, HF ``Image()`` columns) hand over pixels, not bytes.
# These apply the same policy from the point where ``decode_image`` stands; when the pixels are what our decode
# would give, the tokens are the bytes path's bit for bit. Exactly when that holds is in docs/plugin.md.


def _check_geometry(image_size: int, crop: str, multiple_of: int, policy: str = "gq") -> None:
    check_policy(policy, crop if crop in CROP_MODES else "center")
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    if image_size <= 0 or image_size % multiple_of:
        raise ValueError(f"image_size {image_size} must be a positive multiple of {multiple_of}")


def _rgb_to_uint8(im: Image.Image, image_size: int, crop: str, max_pixels: int, multiple_of: int,
                  policy: str = "gq") -> np.ndarray:
    try:
        if policy == "reference":
            out = reference_resize_crop(im, image_size, max_pixels)
        else:
            out = resize_crop(im, image_size, crop, multiple_of, max_pixels)
        arr = np.asarray(out, dtype=np.uint8)
    except SampleError:
        raise
    except Exception as e:
        raise SampleError("decode", f"resize failed: {type(e).__name__}: {e}", *im.size) from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess_pil_uint8(im: Image.Image, image_size: int, crop: str = "center", *,
                         max_pixels: int = DEFAULT_MAX_PIXELS, multiple_of: int = 8, policy: str = "gq"
                         ) -> tuple[np.ndarray, tuple[int, int]]:
    """A PIL image -> (uint8 ``[3,H,W]``, (width, height) after EXIF rotation), like :func:`preprocess_uint8`.

    Applies EXIF orientation (a no-op on an image that was already transposed: ``exif_transpose`` removes the tag),
    the colour policy of :func:`to_rgb`, the size guard and :func:`resize_crop`. The frame used is the one ``im`` is
    on (the first, for an image fresh from ``Image.open``). So for ``im = Image.open(io.BytesIO(data))`` this equals
    ``preprocess_uint8(data)`` exactly, for either ``policy`` (the reference one skips EXIF). Raises
    :class:`SampleError`.
    """
    _check_geometry(image_size, crop, multiple_of, policy)
    if not isinstance(im, Image.Image):
        raise SampleError("unsupported", f"expected a PIL image, got {type(im).__name__}")
    w, h = im.size
    if w * h > max_pixels:
        raise SampleError("too_large", f"{w}x{h} = {w * h} pixels exceeds --max-pixels {max_pixels}", w, h)
    if w <= 0 or h <= 0:
        raise SampleError("decode", f"invalid image size {w}x{h}")
    with _pil_limits(max_pixels):
        try:
            im.load()
            if policy == "gq":
                im = ImageOps.exif_transpose(im)
        except MemoryError:
            raise SampleError("too_large", f"out of memory decoding a {w}x{h} image", w, h) from None
        except Exception as e:  # a lazily opened, truncated file fails here
            raise SampleError("decode", f"{type(e).__name__}: {e}", w, h) from None
        rgb = to_rgb(im) if policy == "gq" else reference_rgb(im)
        return _rgb_to_uint8(rgb, image_size, crop, max_pixels, multiple_of, policy), rgb.size


_ARRAY_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def preprocess_array_uint8(arr: np.ndarray, image_size: int, crop: str = "center", *,
                           max_pixels: int = DEFAULT_MAX_PIXELS, multiple_of: int = 8, policy: str = "gq"
                           ) -> tuple[np.ndarray, tuple[int, int]]:
    """Decoded pixels -> (uint8 ``[3,H,W]``, (width, height)), with the colour, resize and crop policy of the bytes
    path.

    ``arr`` is uint8 ``HxW`` (grayscale), ``HxWx1``, ``HxWx2`` (grayscale + alpha), ``HxWx3`` (RGB, what Ray's
    ``read_images`` gives) or ``HxWx4`` (RGBA; alpha composited onto white). The pixels are taken as already
    oriented: no EXIF information travels with an array. Other dtypes or shapes are an ``unsupported``
    :class:`SampleError`; more than ``max_pixels`` pixels is ``too_large``. ``policy="reference"`` drops alpha.
    """
    _check_geometry(image_size, crop, multiple_of, policy)
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        raise SampleError("unsupported", f"expected uint8 pixels, got dtype {a.dtype} (shape {a.shape})")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in _ARRAY_MODES:
        raise SampleError("unsupported", f"expected an HxW or HxWxC (C in 1..4) image array, got shape {a.shape}")
    h, w = a.shape[:2]
    if w * h > max_pixels:
        raise SampleError("too_large", f"{w}x{h} = {w * h} pixels exceeds --max-pixels {max_pixels}", w, h)
    if w <= 0 or h <= 0:
        raise SampleError("decode", f"invalid image size {w}x{h}")
    mode = _ARRAY_MODES[a.shape[2]]
    im = Image.fromarray(np.ascontiguousarray(a[:, :, 0] if mode == "L" else a), mode)
    with _pil_limits(max_pixels):
        rgb = to_rgb(im) if policy == "gq" else reference_rgb(im)
        return _rgb_to_uint8(rgb, image_size, crop, max_pixels, multiple_of, policy), (w, h)


def preprocess_pil(im: Image.Image, image_size: int, crop: str = "center", *, max_pixels: int = DEFAULT_MAX_PIXELS,
                   multiple_of: int = 8, policy: str = "gq") -> "torch.Tensor":
    """A PIL image -> float32 ``[3,H,W]`` in [-1, 1]: ``to_model_input(preprocess_pil_uint8(...)[0])``."""
    return to_model_input(preprocess_pil_uint8(im, image_size, crop, max_pixels=max_pixels,
                                               multiple_of=multiple_of, policy=policy)[0])


def preprocess_array(arr: np.ndarray, image_size: int, crop: str = "center", *,
                     max_pixels: int = DEFAULT_MAX_PIXELS, multiple_of: int = 8, policy: str = "gq"
                     ) -> "torch.Tensor":
    """Decoded uint8 pixels -> float32 ``[3,H,W]`` in [-1, 1]: ``to_model_input(preprocess_array_uint8(...)[0])``."""
    return to_model_input(preprocess_array_uint8(arr, image_size, crop, max_pixels=max_pixels,
                                                 multiple_of=multiple_of, policy=policy)[0])


_POLICY_RECORD = {
    "gq": {"resize": "PIL bicubic, shorter side", "alpha": "composite on white", "exif": "applied",
           "crop_offset": "floor"},
    "reference": {"resize": "PIL bilinear, shorter side, longer side truncated (torchvision Resize)",
                  "alpha": "dropped (PIL convert RGB)", "exif": "ignored", "crop_offset": "round (torchvision)"},
}


def preprocess_settings(model, image_size: int, crop: str, precision: str, max_pixels: int,
                        policy: str = "gq") -> dict[str, Any]:
    """The ``preprocess`` record every shard, commit record and manifest carries (docs/token-format.md): what made
    these pixels, so that an output never mixes policies (``policy`` is compared on every rerun, see
    ``OutputStore.check_compatible``). bf16 changes ~2 % of tokens, hence the precision."""
    check_policy(policy, crop)
    pol = _POLICY_RECORD[policy]
    rec = {"image_size": int(image_size), "crop": crop, "resize": pol["resize"],
           "multiple_of": model.downsample_factor, "alpha": pol["alpha"], "max_pixels": int(max_pixels),
           "encoder_precision": precision, "policy": policy}
    if policy != "gq":  # gq's record gains only "policy": its other fields stay as before this option existed
        rec.update(exif=pol["exif"], crop_offset=pol["crop_offset"])
    return rec


# ------------------------------------------------------------------------------------------ one pipeline sample
# A worker's decode threads turn each read sample into its row (the fields of writers.TOKEN_SCHEMA): preprocessed
# pixels, or the error that stopped it.


def decode_sample(unit_id: str, s: "RawSample", cfg: dict[str, Any]) -> dict[str, Any]:
    """One sample's row: its identity, and either preprocessed pixels (``img``: uint8 ``[3, img_h, img_w]``, kept
    only until the model has run) or the error that stopped it. Never raises for one sample's fault: a row that
    cannot be built, or whose values the unit's table could not hold (a header width beyond int32, text that is
    not UTF-8), becomes that sample's ``unsupported`` error row instead of failing the unit."""
    try:
        row = _decode_row(unit_id, s, cfg)
        problem = _unstorable(row)
    except Exception as e:
        problem = f"{type(e).__name__}: {e}"
    if problem is None:
        return row
    return {"unit": unit_id, "idx": int(s.idx), "kind": ROW_ERROR, "key": printable(str(s.key)),
            "source": printable(str(s.source)), "member": printable(str(s.member or "")), "width": -1, "height": -1,
            "extra": b"", "error": "unsupported", "message": clean_message(printable(f"row not stored: {problem}")),
            "img": None}


def _unstorable(row: dict[str, Any]) -> str | None:
    """Why ``row`` would not fit ``TOKEN_SCHEMA`` (checked per row, so one bad value cannot fail the unit's table)."""
    for name in ("width", "height"):
        if not -INT32_MAX - 1 <= int(row[name]) <= INT32_MAX:
            return f"{name} {row[name]} does not fit int32"
    for name in ("unit", "key", "source", "member", "error", "message"):
        if not isinstance(row[name], str) or not is_utf8(row[name]):
            return f"{name} {printable(str(row[name]))!r} is not UTF-8 text"
    return None


def _decode_row(unit_id: str, s: "RawSample", cfg: dict[str, Any]) -> dict[str, Any]:
    row = {"unit": unit_id, "idx": s.idx, "kind": ROW_OK, "key": s.key, "source": s.source, "member": s.member or "",
           "width": -1, "height": -1, "extra": pickle.dumps(s.extra, protocol=5) if s.extra else b"",
           "error": "", "message": "", "img": None}
    err = s.error
    if err is None:
        try:
            arr, (w, h) = preprocess_uint8(s.data, cfg["image_size"], cfg["crop"], max_pixels=cfg["max_pixels"],
                                           multiple_of=cfg["multiple_of"], policy=cfg.get("policy", "gq"))
            row.update(width=w, height=h, img=arr)
        except SampleError as e:
            err = e
        except Exception as e:  # never let one sample kill the unit
            err = SampleError("decode", f"{type(e).__name__}: {e}")
    if err is not None:
        row.update(kind=ROW_ERROR, error=err.kind, message=clean_message(err.message), width=err.width,
                   height=err.height)
    return row
