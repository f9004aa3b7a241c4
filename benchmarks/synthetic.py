"""Synthetic inputs for the benchmarks: photo-like images, the small test UNet, and a token output to read.

Benchmarks run without the test tree (an installed checkout, or a GPU machine, may carry ``benchmarks/`` but not
``tests/``), so they import nothing from ``tests/``. These are small deliberate copies of test helpers
(``tests/helpers.py`` for images and the model, ``tests/shard_writer.py`` for the token output); the benchmarks
only need them to produce inputs of the right shape and cost, not to define the format, which gq_pipeline's own
writers and docs/token-format.md do.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath

import numpy as np

TINY_ENCODER = dict(ch=32, out_ch=3, ch_mult=[1, 2, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
                    resolution=32, in_channels=3, z_channels=16, double_z=True)


def make_tiny_model(seed: int = 0):
    """The CPU test UNet (downsampling 8, 16 latent channels, K=4096, one group); no real checkpoint is offline."""
    import torch

    from gq_model import GQConfig, GQModel

    torch.manual_seed(seed)
    return GQModel(GQConfig(arch="unet", encoder=dict(TINY_ENCODER), decoder=dict(TINY_ENCODER),
                            codebook_size=4096, group=16)).eval()


def smooth_rgb(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random RGB image, uint8 (h, w, 3): compresses like a photo, where noise would make JPEGs large."""
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


def rgb_bytes(h: int, w: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """:func:`smooth_rgb` encoded as ``fmt``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(smooth_rgb(h, w, seed)).save(buf, fmt)
    return buf.getvalue()


def write_token_output(root: str, samples_per_shard, *, token_shape=(1, 32, 32), codebook_size: int = 65536,
                       row_group_size: int = 1000, seed: int = 0) -> int:
    """Write a local ``gq tokenize``-style output (format version 2, Parquet and WebDataset shards with ``txt`` and
    ``cls`` pass-through fields, the wids index and the manifest) of random tokens under ``root``; return the number
    of samples. The same tokens and columns as ``tests/shard_writer.write_token_output`` for these arguments."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    from gq_pipeline.layout import layout_of_version

    lay = layout_of_version(2)
    model_fp, codebook_fp = "045ccc212bfaf6c5", "80f16be97539daa4"
    dtype, arrow_type = (np.uint16, pa.uint16()) if codebook_size <= 65536 else (np.int32, pa.int32())
    rng = np.random.default_rng(seed)
    units, shardlist = [], []
    for u, n in enumerate(samples_per_shard):
        uid = f"u-{hashlib.sha256(f'unit{u}'.encode()).hexdigest()[:16]}"
        name = f"{uid}-{model_fp}"
        keys = [f"{uid}-{i:05d}" for i in range(n)]
        tokens = [rng.integers(0, codebook_size, size=token_shape).astype(dtype) for _ in range(n)]
        source = f"s3://in/{uid}.tar"
        members = [None if i % 2 else f"img{i}" for i in range(n)]
        widths, heights = [32 + i for i in range(n)], [30 + u] * n
        captions, classes = [f"caption {key}" for key in keys], [i % 3 for i in range(n)]
        meta = {"gq.format_version": "2", "gq.model_fingerprint": model_fp, "gq.codebook_fingerprint": codebook_fp,
                "gq.codebook_size": str(codebook_size), "gq.group": "16", "gq.seed": "42", "gq.beta": "1.0",
                "gq.arch": "unet", "gq.preprocess": json.dumps({"image_size": 32, "crop": "center"}),
                "gq.unit_id": uid}
        table = pa.table({
            "key": pa.array(keys, pa.string()),
            "source": pa.array([source] * n, pa.string()),
            "member": pa.array(members, pa.string()),
            "tokens": pa.array([t.reshape(-1) for t in tokens], pa.list_(arrow_type)),
            "token_shape": pa.array([list(token_shape)] * n, pa.list_(pa.int32())),
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
            "txt": pa.array(captions, pa.string()),
            "cls": pa.array(classes, pa.int64()),
        }).replace_schema_metadata(meta)
        os.makedirs(os.path.join(root, "parquet"), exist_ok=True)
        pq.write_table(table, os.path.join(root, "parquet", name + ".parquet"), row_group_size=row_group_size)
        os.makedirs(os.path.join(root, "webdataset"), exist_ok=True)
        with open(os.path.join(root, "webdataset", name + ".tar"), "wb") as f, wds.TarWriter(f) as sink:
            for i, (key, tok) in enumerate(zip(keys, tokens)):
                sink.write({"__key__": key, "tokens.npy": tok,
                            "json": {"source": source, "member": members[i], "width": widths[i],
                                     "height": heights[i], "token_shape": list(token_shape)},
                            "txt": captions[i], "cls": classes[i]})
        shards = [f"parquet/{name}.parquet", f"webdataset/{name}.tar"]
        shardlist.append({"url": lay.wids_url(shards[1]), "nsamples": n})
        units.append({"unit_id": uid, "source": source, "inputs": n, "tokenized": n, "errors": 0, "shards": shards})
    total = sum(samples_per_shard)
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "tokens", "shardlist": shardlist}
    manifest = {"format_version": 2, "model_fingerprint": model_fp, "codebook_fingerprint": codebook_fp,
                "codebook_size": codebook_size, "group": 16, "preprocess": {"image_size": 32}, "inputs": total,
                "tokenized": total, "errors": 0, "errors_by_kind": {}, "units": units, "throughput": {},
                "codebook_usage": {}}
    for relpath, obj in ((lay.wids_index, index), (lay.manifest, manifest)):
        path = os.path.join(root, *posixpath.split(relpath))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f)
    return total
