"""Test helper: write a small ``gq tokenize``-style output (docs/token-format.md) with known tokens.

Reader tests use it to choose exact tokens and layouts (many units, mixed schemas) without running the job; it follows
the format page column by column, so a reader passing here reads the job's output too (the end-to-end test checks it).
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

DEFAULT_CODEBOOK_FP = "80f16be97539daa4"  # the tiny test model's codebook (K=4096, m=16, seed 42)
DEFAULT_MODEL_FP = "045ccc212bfaf6c5"


def random_tokens(rng: np.random.Generator, shape, codebook_size: int, index: int) -> np.ndarray:
    return rng.integers(0, codebook_size, size=shape)


def counting_tokens(rng: np.random.Generator, shape, codebook_size: int, index: int) -> np.ndarray:
    """A learnable stream: each token is the previous one plus one (mod 16), from a random start."""
    start = int(rng.integers(0, 16))
    return ((start + np.arange(int(np.prod(shape)))) % 16).reshape(shape)


def write_token_output(url: str, samples_per_shard=(5, 3, 7), *, token_shape=(1, 4, 4), codebook_size: int = 4096,
                       codebook_fp: str = DEFAULT_CODEBOOK_FP, model_fp: str = DEFAULT_MODEL_FP,
                       formats=("parquet", "webdataset"), row_group_size: int | None = None, latents: bool = False,
                       seed: int = 0, tokens_fn=random_tokens, errors: dict[str, int] | None = None,
                       manifest: bool = True, unit_offset: int = 0, storage_options: dict | None = None,
                       index: bool = True, version: int = 2) -> dict[str, dict]:
    """Write shards under ``url``; return ``{key: {"tokens": int64 array [G,h,w], **fields}}`` for every sample.
    ``version`` is the format version, whose layout (gq_pipeline.layout) places manifest, errors and index."""
    from gq_pipeline.layout import layout_of_version

    lay = layout_of_version(version)
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    dtype = np.uint16 if codebook_size <= 65536 else np.int32
    rng = np.random.default_rng(seed)
    expected: dict[str, dict] = {}
    units, shardlist = [], []
    for u, n in enumerate(samples_per_shard):
        uid = f"u-{hashlib.sha256(f'unit{u + unit_offset}'.encode()).hexdigest()[:16]}"
        name = f"{uid}-{model_fp}"
        rows = []
        for i in range(n):
            key = f"{uid}-{i:05d}"
            tok = np.asarray(tokens_fn(rng, token_shape, codebook_size, len(expected)), dtype=np.int64)
            row = {"key": key, "source": f"s3://in/{uid}.tar", "member": None if i % 2 else f"img{i}",
                   "width": 32 + i, "height": 30 + u, "txt": f"caption {key}", "cls": i % 3, "tokens": tok}
            if latents:
                row["latent"] = rng.standard_normal((16,) + tuple(token_shape[1:])).astype(np.float16)
            rows.append(row)
            expected[key] = row
        meta = {"gq.format_version": str(version), "gq.model_fingerprint": model_fp, "gq.codebook_fingerprint": codebook_fp,
                "gq.codebook_size": str(codebook_size), "gq.group": "16", "gq.seed": "42", "gq.beta": "1.0",
                "gq.arch": "unet", "gq.preprocess": json.dumps({"image_size": 32, "crop": "center"}),
                "gq.unit_id": uid}
        shards = []
        if "parquet" in formats:
            path = posixpath.join(root, "parquet", name + ".parquet")
            _write_parquet(fs, path, rows, meta, dtype, latents, row_group_size)
            shards.append(f"parquet/{name}.parquet")
        if "webdataset" in formats:
            path = posixpath.join(root, "webdataset", name + ".tar")
            _write_tar(fs, path, rows, dtype, latents)
            shards.append(f"webdataset/{name}.tar")
            shardlist.append({"url": lay.wids_url(f"webdataset/{name}.tar"), "nsamples": n})
        units.append({"unit_id": uid, "source": f"s3://in/{uid}.tar", "inputs": n, "tokenized": n, "errors": 0,
                      "shards": shards})
    n_err = 0
    if errors:
        kinds = [k for k, c in errors.items() for _ in range(c)]
        tbl = pa.table({"key": [f"bad{i}" for i in range(len(kinds))], "source": ["s3://in/x.tar"] * len(kinds),
                        "member": pa.array([None] * len(kinds), pa.string()), "error": kinds,
                        "message": [f"{k} failed" for k in kinds]})
        fs.makedirs(posixpath.join(root, lay.errors), exist_ok=True)
        with fs.open(posixpath.join(root, lay.errors, f"u-errors-{model_fp}.parquet"), "wb") as f:
            pq.write_table(tbl, f)
        n_err = len(kinds)
        units[0]["errors"] += n_err
        units[0]["inputs"] += n_err
    if "webdataset" in formats and index:
        idx = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "tokens", "shardlist": shardlist}
        fs.makedirs(posixpath.dirname(posixpath.join(root, lay.wids_index)), exist_ok=True)
        with fs.open(posixpath.join(root, lay.wids_index), "w") as f:
            json.dump(idx, f)
    if manifest:
        total = sum(samples_per_shard)
        m = {"format_version": version, "model_fingerprint": model_fp, "codebook_fingerprint": codebook_fp,
             "codebook_size": codebook_size, "group": 16, "preprocess": {"image_size": 32},
             "inputs": total + n_err, "tokenized": total, "errors": n_err, "errors_by_kind": dict(errors or {}),
             "units": units, "throughput": {}, "codebook_usage": {}}
        fs.makedirs(posixpath.dirname(posixpath.join(root, lay.manifest)), exist_ok=True)
        with fs.open(posixpath.join(root, lay.manifest), "w") as f:
            json.dump(m, f)
    return expected


def _write_parquet(fs, path, rows, meta, dtype, latents, row_group_size):
    cols = {
        "key": pa.array([r["key"] for r in rows], pa.string()),
        "source": pa.array([r["source"] for r in rows], pa.string()),
        "member": pa.array([r["member"] for r in rows], pa.string()),
        "tokens": pa.array([r["tokens"].reshape(-1).astype(dtype) for r in rows],
                           pa.list_(pa.uint16() if dtype == np.uint16 else pa.int32())),
        "token_shape": pa.array([list(r["tokens"].shape) for r in rows], pa.list_(pa.int32())),
        "width": pa.array([r["width"] for r in rows], pa.int32()),
        "height": pa.array([r["height"] for r in rows], pa.int32()),
        "txt": pa.array([r["txt"] for r in rows], pa.string()),
        "cls": pa.array([r["cls"] for r in rows], pa.int64()),
    }
    if latents:
        cols["latent"] = pa.array([r["latent"].reshape(-1) for r in rows], pa.list_(pa.float16()))
        cols["latent_shape"] = pa.array([list(r["latent"].shape) for r in rows], pa.list_(pa.int32()))
    table = pa.table(cols).replace_schema_metadata(meta)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size or len(rows) or 1)


def _write_tar(fs, path, rows, dtype, latents):
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    with wds.TarWriter(buf) as sink:
        for r in rows:
            sample = {"__key__": r["key"], "tokens.npy": r["tokens"].astype(dtype),
                      "json": {"source": r["source"], "member": r["member"], "width": r["width"],
                               "height": r["height"], "token_shape": list(r["tokens"].shape)},
                      "txt": r["txt"], "cls": r["cls"]}
            if latents:
                sample["latent.npy"] = r["latent"]
            sink.write(sample)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())



def make_bucket(storage_options: dict, name: str) -> None:
    """Create a bucket on the moto server. (s3fs ``mkdir`` sends region us-east-1 as a LocationConstraint, which S3
    rejects, when the region comes from ``client_kwargs``.)"""
    import boto3

    boto3.client("s3", endpoint_url=storage_options["endpoint_url"], aws_access_key_id=storage_options["key"],
                 aws_secret_access_key=storage_options["secret"], region_name="us-east-1").create_bucket(Bucket=name)
