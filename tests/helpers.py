"""Helpers the tests share (plain functions, no fixtures: those live in ``conftest.py``, which imports from here).

Test modules import these as ``from tests.helpers import ...``; pytest loads ``conftest.py`` first, so its
environment settings (Ray on loopback, gcsfs without the storage-control API) hold before anything here runs. Heavy
libraries are imported inside the functions, so importing this module costs nothing. Helpers that need torch at
import time live in ``tests/model_helpers.py``, the codebook-search cases in ``tests/kernel_cases.py``. Benchmarks do
not import the test tree: they have their own ``benchmarks/synthetic.py``.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_TINY = os.path.join(REPO, "configs", "train_tiny.yaml")

TINY_ENCODER = dict(ch=32, out_ch=3, ch_mult=[1, 2, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
                    resolution=32, in_channels=3, z_channels=16, double_z=True)
TINY_ATTN_ENCODER = dict(TINY_ENCODER, attn_resolutions=[8])  # the encoder of tests/model_helpers.SMALL_REFERENCE_YAML


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (test servers bind loopback only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_step_metrics(out_dir: str) -> dict[int, dict]:
    """A training run's per-step records from ``metrics.jsonl`` (the last one per step: a resumed run repeats the
    steps after its checkpoint)."""
    import json

    rows = {}
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "kind" not in r:
                rows[r["step"]] = r
    return rows


def torchrun(out_dir: str, *overrides: str, expect_ok: bool = True, timeout: int = 240) -> str:
    """Train ``configs/train_tiny.yaml`` for 4 steps on 2 CPU ranks (``torch.distributed.run`` on 127.0.0.1) with
    the given config overrides; assert the exit status (``expect_ok``) and return the combined output."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "jobs.train", TRAIN_TINY, f"run.out_dir={out_dir}", "run.max_steps=4",
           "run.ckpt_every=2", "run.log_every=1", "run.image_every=2", "run.progress=false", *overrides]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    if expect_ok:
        assert p.returncode == 0, out[-6000:]
    else:
        assert p.returncode != 0, out[-3000:]
    return out


# --------------------------------------------------------------------------------------------------------- tiny models


def make_tiny_model(seed: int = 0):
    """A GQ UNet small enough for CPU tests (downsampling 8, 16 latent channels, K=4096, one group)."""
    import torch

    from gq_model import GQConfig, GQModel

    torch.manual_seed(seed)
    return GQModel(GQConfig(arch="unet", encoder=dict(TINY_ENCODER), decoder=dict(TINY_ENCODER),
                            codebook_size=4096, group=16)).eval()


def make_tiny_attn_model(seed: int = 0, **overrides):
    """The tiny UNet with attention at resolution 8 (the architecture of ``SMALL_REFERENCE_YAML``); ``overrides``
    replace GQConfig fields (``codebook_size=1024, group=8`` is the YAML's quantizer)."""
    import torch

    from gq_model import GQConfig, GQModel

    torch.manual_seed(seed)
    cfg = dict(arch="unet", encoder=dict(TINY_ATTN_ENCODER), decoder=dict(TINY_ATTN_ENCODER), codebook_size=4096,
               group=16)
    cfg.update(overrides)
    return GQModel(GQConfig(**cfg)).eval()


# -------------------------------------------------------------------------------------------------------- test images


def smooth_rgb(h: int, w: int, seed: int):
    """A smooth random RGB image (compresses like a photo; random noise would make JPEGs large and odd)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (3, 4, 4))
    ys, xs = np.linspace(0, 3, h), np.linspace(0, 3, w)
    y0, x0 = np.clip(ys.astype(int), 0, 2), np.clip(xs.astype(int), 0, 2)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    out = np.empty((h, w, 3))
    for c in range(3):
        b = base[c]
        out[:, :, c] = (b[y0][:, x0] * (1 - fy) * (1 - fx) + b[y0 + 1][:, x0] * fy * (1 - fx)
                        + b[y0][:, x0 + 1] * (1 - fy) * fx + b[y0 + 1][:, x0 + 1] * fy * fx)
    return np.clip(out + rng.normal(0, 6, out.shape), 0, 255).astype(np.uint8)


def encode_image(im, fmt: str, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb_bytes(h: int, w: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    from PIL import Image

    return encode_image(Image.fromarray(smooth_rgb(h, w, seed)), fmt)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims a huge size (its data is bogus): must be refused from the header alone."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def messy_images() -> dict[str, tuple[bytes, str | None]]:
    """name -> (file bytes, expected error kind or None): every awkward input the pipeline must survive."""
    import numpy as np
    from PIL import Image

    out: dict[str, tuple[bytes, str | None]] = {}
    for i, (h, w) in enumerate([(48, 64), (64, 48), (40, 80), (33, 35), (64, 64), (90, 30)]):
        out[f"ok_{i:02d}.jpg"] = (rgb_bytes(h, w, seed=i), None)
    out["a.jpg"] = (rgb_bytes(40, 40, seed=100), None)  # duplicate stems -> distinct keys
    out["a.png"] = (rgb_bytes(40, 40, seed=101, fmt="PNG"), None)
    out["gray.jpg"] = (encode_image(Image.fromarray(smooth_rgb(40, 52, 7)).convert("L"), "JPEG"), None)
    out["cmyk.jpg"] = (encode_image(Image.fromarray(smooth_rgb(44, 40, 8)).convert("CMYK"), "JPEG"), None)
    rgba = np.dstack([smooth_rgb(40, 40, 9), np.full((40, 40), 255, np.uint8)])
    rgba[:, :20, 3] = 0  # left half transparent over arbitrary colours
    out["rgba.png"] = (encode_image(Image.fromarray(rgba, "RGBA"), "PNG"), None)
    pal = Image.fromarray(smooth_rgb(40, 48, 10)).convert("P", palette=Image.ADAPTIVE, colors=16)
    out["palette.png"] = (encode_image(pal, "PNG", transparency=0), None)
    g16 = (np.linspace(0, 65535, 48 * 40).reshape(40, 48)).astype(np.uint16)
    out["gray16.png"] = (encode_image(Image.fromarray(g16), "PNG"), None)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out["exif_rotated.jpg"] = (encode_image(Image.fromarray(smooth_rgb(32, 64, 11)), "JPEG", exif=exif), None)
    frames = [Image.fromarray(np.full((36, 36, 3), v, np.uint8)) for v in (30, 220)]
    out["animated.gif"] = (encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50,
                                        loop=0), None)
    out["pic.webp"] = (rgb_bytes(40, 44, seed=12, fmt="WEBP"), None)
    out["pic.bmp"] = (rgb_bytes(40, 44, seed=13, fmt="BMP"), None)
    out["pic.tiff"] = (rgb_bytes(40, 44, seed=14, fmt="TIFF"), None)
    out["UPPER.JPG"] = (rgb_bytes(40, 44, seed=15), None)
    out["empty.jpg"] = (b"", "empty")
    good = encode_image(Image.fromarray(np.random.default_rng(16).integers(0, 255, (128, 128, 3), np.uint8)), "JPEG")
    out["truncated.jpg"] = (good[: len(good) * 2 // 3], "decode")  # header intact, pixel data cut
    out["random.jpg"] = (np.random.default_rng(17).bytes(3000), "decode")
    out["bomb.png"] = (bomb_png(), "too_large")
    return out


def write_messy_folder(root) -> dict[str, tuple[bytes, str | None]]:
    """Write :func:`messy_images` under ``root`` (plus a nested file, a non-image and a hidden file)."""
    import pathlib

    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images = messy_images()
    images["sub/nested.jpg"] = (rgb_bytes(50, 40, seed=18), None)
    for name, (data, _) in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "notes.txt").write_text("not an image")
    (root / "._ok_00.jpg").write_bytes(b"macOS resource fork")
    return images


def make_wds_tar(samples: list[dict]) -> bytes:
    """A WebDataset tar (written by webdataset.TarWriter) from dicts with ``__key__`` and extension -> bytes/str."""
    import io

    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf) as w:
        for s in samples:
            w.write(s)
    return buf.getvalue()


def make_image_parquet(rows: int, *, style: str = "hf", seed: int = 0, bad_rows: tuple[int, ...] = ()) -> bytes:
    """A Parquet file of images: ``style="hf"`` uses an ``image`` struct{bytes, path} column (Hugging Face),
    ``"img2dataset"`` a binary ``jpg`` column; both carry ``caption`` and ``label`` pass-through columns."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [b"not an image" if i in bad_rows else rgb_bytes(36 + i % 5, 40, seed=seed + i) for i in range(rows)]
    captions = [f"caption {i}" for i in range(rows)]
    labels = pa.array(list(range(rows)), pa.int16())
    if style == "hf":
        col = pa.array([{"bytes": b, "path": f"img{i}.jpg"} for i, b in enumerate(images)],
                       pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = pa.table({"image": col, "caption": captions, "label": labels})
    else:
        table = pa.table({"key": [f"{i:09d}" for i in range(rows)], "jpg": pa.array(images, pa.binary()),
                          "caption": captions, "label": labels})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
