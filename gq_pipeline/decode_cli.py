"""``gq decode``: token shards -> PNG images and a grid, to eyeball what a tokenization run produced.

It refuses a model whose codebook fingerprint differs from the shards': with another codebook the same ids select
other codewords and the pictures would be plausible-looking garbage, which is worse than an error.
"""
from __future__ import annotations

import argparse
import math
import posixpath


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
    p.add_argument("--format", default="auto", choices=["auto", "parquet", "webdataset"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--grid-cols", type=int, default=0, help="grid columns (default: about sqrt(N))")
    p.set_defaults(func=run)


def model_layout(model, tokens):
    """Shards store ``[B, G, h, w]``; ViT models take ``[B, L, G]`` (L = h*w), as the format page says."""
    if model.config.latent_format == "bchw":
        return tokens
    b, g = tokens.shape[:2]
    return tokens.reshape(b, g, -1).transpose(1, 2)


def to_uint8(images):
    """[B,3,H,W] in [-1,1] -> uint8 [B,H,W,3] numpy (the one conversion decode and its tests share)."""
    import torch

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to("cpu")
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images, cols: int = 0, pad: int = 2):
    """Tile uint8 [N,H,W,3] images into one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, 3] array."""
    import numpy as np

    n, h, w, _ = images.shape
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return grid


def _save_png(fs, path: str, array) -> None:
    from PIL import Image

    with fs.open(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")


def run(args: argparse.Namespace) -> int:
    import fsspec
    import numpy as np

    from gq_model.loading import load_model
    from gq_pipeline.dataset import TokenDataset
    from gq_pipeline.records import file_name_for_key

    if args.limit < 1:
        raise ValueError("--limit must be >= 1")
    ds = TokenDataset(args.input, format=args.format, shuffle=False, batch_size=args.batch_size)
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
    decoded = []
    for batch in ds:
        room = args.limit - len(decoded)
        tokens, batch_keys = batch["tokens"][:room], batch["key"][:room]
        images = to_uint8(model.detokenize(model_layout(model, tokens.to(args.device))))
        for key, img in zip(batch_keys, images):
            _save_png(fs, posixpath.join(out, file_name_for_key(str(key), ".png")), img)
            decoded.append(img)
        if len(decoded) >= args.limit:
            break
    if not decoded:
        raise ValueError(f"{args.input}: no samples to decode")
    _save_png(fs, posixpath.join(out, "grid.png"), make_grid(np.stack(decoded), args.grid_cols))
    print(f"decoded {len(decoded)} sample(s) with codebook {model.fingerprint}: {args.out}/<key>.png and grid.png")
    return 0
