"""``gq decode``: token shards -> PNG images and a grid, to eyeball what a tokenization run produced.

It refuses a model whose codebook fingerprint differs from the shards': with another codebook the same ids select
other codewords and the pictures would be plausible-looking garbage, which is worse than an error.
"""
from __future__ import annotations

import argparse
import math
import posixpath
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decode", help="decode token shards back to PNG images (plus a grid)",
                       description="Read token shards (Parquet or WebDataset, any fsspec URL), detokenize them with "
                                   "MODEL and write <key>.png per sample and grid.png to OUT.")
    p.add_argument("--model", required=True, help="the model that made the tokens: official:NAME, hf://..., bundle "
                                                  "(path, fsspec URL or built-in name), DeepSpeed checkpoint dir or "
                                                  "reference .ckpt (with --config or --preset)")
    p.add_argument("--config", help="reference YAML for a .ckpt --model")
    p.add_argument("--preset", help="built-in preset for a .ckpt --model, or to override an hf:// file's")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle a local .ckpt or DeepSpeed checkpoint with weights_only=False (files you trust only)")
    p.add_argument("--input", required=True, help="shards: tokenize output root, its parquet/ or webdataset/ folder, "
                                                  "a glob or a file")
    p.add_argument("--out", required=True, help="output folder (local or fsspec URL)")
    p.add_argument("--limit", type=int, default=64, help="decode at most N samples, in shard order (default 64)")
    p.add_argument("--format", default="auto", choices=["auto", "parquet", "webdataset"],
                   help="which shards to read when an output has both (default auto: Parquet if present)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="samples per decoder call (default 16); samples of different token shapes (--crop none "
                        "outputs) are batched by shape")
    p.add_argument("--device", default="cpu", help="torch device to decode on, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--grid-cols", type=int, default=0,
                   help="grid columns (default: about sqrt(N)); images of different sizes are letterboxed into "
                        "equal cells")
    p.set_defaults(func=run)


def model_layout(model, tokens):
    """Shards store ``[B, G, h, w]``; the model maps them to its own layout (:meth:`GQModel.from_grid`)."""
    return model.from_grid(tokens)


def to_uint8(images):
    """[B,3,H,W] in [-1,1] -> uint8 [B,H,W,3] numpy (the one conversion decode and its tests share)."""
    import torch

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to("cpu")
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images, cols: int = 0, pad: int = 2, fill: int = 0):
    """Tile uint8 ``[H,W,3]`` images into one contact sheet, ``cols`` per row (default about sqrt(N)).

    Every cell is the largest height by the largest width among ``images``, so samples of different sizes (``--crop
    none``) keep their own pixels and aspect ratio: each sits centred in its cell, letterboxed with ``fill`` (black);
    the ``pad``-pixel lines between cells are white. Equal sizes give cells without any letterbox."""
    import numpy as np

    images = list(images)
    if not images:
        raise ValueError("no images to put in a grid")
    n = len(images)
    h = max(int(img.shape[0]) for img in images)
    w = max(int(img.shape[1]) for img in images)
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = fill
        ih, iw = img.shape[:2]
        top, left = y0 + (h - ih) // 2, x0 + (w - iw) // 2
        grid[top:top + ih, left:left + iw] = img
    return grid


def iter_shape_batches(samples, batch_size: int, limit: int):
    """Group the first ``limit`` samples by token shape: yields ``(positions, keys, tokens [B,...])`` batches of at
    most ``batch_size`` samples of one shape, so the decoder gets stacked tensors even when every image of a ``--crop
    none`` output has its own shape. A shape's batch goes out once it is full; the rest at the end. ``positions`` are
    the samples' places in shard order (the grid keeps that order)."""
    import torch

    waiting: dict[tuple[int, ...], list[tuple[int, str, Any]]] = {}
    n = 0
    for sample in samples:
        if n >= limit:
            break
        tokens = sample["tokens"]
        group = waiting.setdefault(tuple(tokens.shape), [])
        group.append((n, str(sample["key"]), tokens))
        n += 1
        if len(group) >= batch_size:
            del waiting[tuple(tokens.shape)]
            yield _stack(group, torch)
    for group in waiting.values():
        yield _stack(group, torch)


def _stack(group, torch):
    return [g[0] for g in group], [g[1] for g in group], torch.stack([g[2] for g in group])


def _save_png(fs, path: str, array) -> None:
    from PIL import Image

    with fs.open(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")


def run(args: argparse.Namespace) -> int:
    import fsspec

    from gq_model.loading import load_model
    from gq_pipeline.dataset import TokenDataset
    from gq_pipeline.records import file_name_for_key

    if args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    # One sample at a time, batched here by token shape: a --crop none output has a shape per image.
    ds = TokenDataset(args.input, format=args.format, shuffle=False, batch_size=None, columns=[])
    model = load_model(args.model, config=args.config, preset=args.preset,
                       trust_checkpoint=args.trust_checkpoint).to(args.device).eval()
    if ds.fingerprint is None:
        raise ValueError(f"{args.input}: the shards record no codebook fingerprint, so the model cannot be checked "
                         "against them (no manifest.json or Parquet metadata)")
    if ds.fingerprint != model.fingerprint:
        raise ValueError(f"the model's codebook ({model.fingerprint}) is not the one these shards were made with "
                         f"({ds.fingerprint}): its decoder would read the ids as other codewords. Use the model that "
                         "tokenized them (or one with the same codebook size, group and seed)")
    models = {s.model_fingerprint for s in ds.shards.shards}
    if models - {model.model_fingerprint, None}:
        print(f"note: shards come from model(s) {', '.join(sorted(m for m in models if m))}, decoding with "
              f"{model.model_fingerprint} (same codebook, other weights)")
    fs, out = fsspec.core.url_to_fs(args.out)
    fs.makedirs(out, exist_ok=True)
    decoded: dict[int, Any] = {}
    for positions, keys, tokens in iter_shape_batches(ds, args.batch_size, args.limit):
        images = to_uint8(model.detokenize(model.from_grid(tokens.to(args.device))))
        for pos, key, img in zip(positions, keys, images):
            _save_png(fs, posixpath.join(out, file_name_for_key(key, ".png")), img)
            decoded[pos] = img
    if not decoded:
        raise ValueError(f"{args.input}: no samples to decode")
    sizes = {img.shape[:2] for img in decoded.values()}
    _save_png(fs, posixpath.join(out, "grid.png"), make_grid([decoded[i] for i in sorted(decoded)], args.grid_cols))
    print(f"decoded {len(decoded)} sample(s) with codebook {model.fingerprint}: {args.out}/<key>.png and grid.png"
          + (f" ({len(sizes)} image sizes, letterboxed in the grid)" if len(sizes) > 1 else ""))
    return 0
