"""Tiny synthetic JPEGs for the examples (no downloads): smooth colour gradients with a little noise."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def sample_jpegs(n: int = 6, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(48, 96)), int(rng.integers(48, 96))
        y, x = np.mgrid[0:h, 0:w]
        rgb = np.stack([x * 255 / w, y * 255 / h, np.full((h, w), 40.0 * i)], axis=2)
        rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out
