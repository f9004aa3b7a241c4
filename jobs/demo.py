"""``gq demo``: the first thing a newcomer runs (``make demo``).

Writes scikit-image's bundled sample images (plus one deliberately corrupt file) into ``OUT/input/``, tokenizes them
with the built-in ``demo`` model through the real job (:func:`gq_pipeline.tokenize`: a local Ray cluster, Parquet and
WebDataset shards, error accounting, manifest), prints the run summary, decodes the tokens back with the functions of
``gq decode`` and writes:

* ``OUT/demo-grid.png``: originals (the exact pixels the tokenizer saw) above their reconstructions from the tokens;
* ``OUT/demo-grid-small.jpg``: the same at web size (JPEG 4:4:4, no palette);
* ``OUT/codebook-usage.png``: the token histogram of the run (the plot of ``gq inspect --plot``);
* ``OUT/tokens/``: the tokenize output (``parquet/``, ``webdataset/``, and ``.gq/`` with errors, records and the manifest);
* ``OUT/summary.json``: the summary printed at the end.
"""
from __future__ import annotations

import os

# Ray must bind to 127.0.0.1 only; set before ray is imported anywhere (the Makefile exports it as well).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

# (skimage.data name, file format). Color and grayscale photographs, textures, a document scan and two images that
# the built-in model never saw in training (chelsea, stereo_motorcycle's left view).
SAMPLES = [
    ("astronaut", "png"), ("chelsea", "jpg"), ("coffee", "jpg"), ("rocket", "jpg"), ("stereo_motorcycle", "jpg"),
    ("immunohistochemistry", "png"), ("hubble_deep_field", "jpg"), ("retina", "jpg"), ("colorwheel", "png"),
    ("logo", "png"), ("camera", "png"), ("coins", "png"), ("brick", "png"), ("grass", "jpg"), ("gravel", "jpg"),
    ("moon", "png"), ("clock", "png"), ("page", "png"),
]
CORRUPT_NAME = "corrupt.jpg"
MAX_SIDE = 768  # sample images larger than this are shrunk before writing (retina is 1411 px): faster reads


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="tokenize sample images with the built-in model and show the reconstructions",
                       description="Write scikit-image sample images (and one corrupt file) to OUT/input, tokenize "
                                   "them with the built-in 'demo' model through the Ray pipeline (Parquet + "
                                   "WebDataset), decode the tokens and write a reconstruction grid and a codebook "
                                   "usage plot to OUT.")
    p.add_argument("--out", default="gq-demo-out", help="output folder (default ./gq-demo-out)")
    p.add_argument("--num-images", type=int, default=len(SAMPLES),
                   help=f"number of sample images, 1..{len(SAMPLES)} (default {len(SAMPLES)}); plus one corrupt file")
    p.add_argument("--model", default="demo", help="model bundle or built-in name (default: the built-in 'demo')")
    p.add_argument("--image-size", type=int, default=256, help="tokenizer input size (default 256)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress output, only the final summary")
    p.set_defaults(func=run)


def _step(quiet: bool, i: int, n: int, msg: str, t0: float) -> None:
    if not quiet:
        print(f"[gq demo {i}/{n} +{time.perf_counter() - t0:5.1f}s] {msg}", flush=True)


def _sample_array(name: str):
    """An skimage sample as uint8 RGB [H, W, 3]."""
    import numpy as np
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        img = np.clip(img * 255.0 if img.max() <= 1.0 else img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 4:  # composite on white, as the pipeline does
        a = img[:, :, 3:4].astype(np.float32) / 255.0
        img = (img[:, :, :3] * a + 255.0 * (1 - a)).round().astype(np.uint8)
    return img


def write_inputs(folder: str, num_images: int) -> list[str]:
    """Write ``num_images`` sample images and one corrupt file into ``folder``; returns the paths written."""
    from PIL import Image

    if not 1 <= num_images <= len(SAMPLES):
        raise ValueError(f"--num-images must be 1..{len(SAMPLES)}, got {num_images}")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, (name, fmt) in enumerate(SAMPLES[:num_images]):
        im = Image.fromarray(_sample_array(name))
        if max(im.size) > MAX_SIDE:
            s = MAX_SIDE / max(im.size)
            im = im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC)
        path = os.path.join(folder, f"{i:02d}_{name}.{fmt}")
        if fmt == "jpg":
            im.save(path, format="JPEG", quality=92)
        else:
            im.save(path, format="PNG")
        paths.append(path)
    corrupt = os.path.join(folder, CORRUPT_NAME)
    with open(corrupt, "wb") as f:  # a JPEG header followed by garbage: listed as an image, fails to decode
        f.write(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"this is not a picture " * 20)
    paths.append(corrupt)
    return paths


def decode_side_by_side(model, token_dir: str, image_size: int, cols: int = 6):
    """(grid uint8 array, per-image PSNR dict): originals above their reconstructions, read back from the Parquet
    shards, so the picture shows what was actually stored."""
    import numpy as np

    from gq_pipeline.dataset import TokenDataset
    from gq_pipeline.decode_cli import make_grid, model_layout, to_uint8
    from gq_pipeline.preprocess import preprocess_uint8

    ds = TokenDataset(os.path.join(token_dir, "parquet"), format="parquet", shuffle=False, batch_size=8)
    if ds.fingerprint != model.fingerprint:
        raise ValueError(f"the shards' codebook {ds.fingerprint} is not the model's {model.fingerprint}")
    originals, recons, names = [], [], []
    for batch in ds:
        recons.extend(to_uint8(model.detokenize(model_layout(model, batch["tokens"]))))
        names.extend(batch["source"])
    order = np.argsort(names, kind="stable")
    names = [names[i] for i in order]
    recons = [recons[i] for i in order]
    psnr = {}
    for name, rec in zip(names, recons):
        path = name[len("file://"):] if name.startswith("file://") else name
        with open(path, "rb") as f:
            orig, _ = preprocess_uint8(f.read(), image_size, "center", multiple_of=model.downsample_factor)
        orig = np.ascontiguousarray(np.asarray(orig).transpose(1, 2, 0))
        if orig.shape != rec.shape:  # should not happen: same preprocessing as the tokenizer
            raise ValueError(f"{name}: original {orig.shape} vs reconstruction {rec.shape}")
        originals.append(orig)
        mse = float(((orig.astype(np.float64) - rec.astype(np.float64)) ** 2).mean())
        psnr[os.path.basename(path)] = round(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)), 2)
    # rows: originals, then reconstructions, `cols` images per row pair
    tiles = []
    for start in range(0, len(originals), cols):
        o, r = originals[start:start + cols], recons[start:start + cols]
        blank = [np.full_like(originals[0], 255)] * (cols - len(o)) if len(originals) > cols else []
        tiles.extend(o + blank)
        tiles.extend(r + blank)
    grid = make_grid(np.stack(tiles), cols=min(cols, len(originals)), pad=4)
    return grid, psnr


def write_web_image(grid, path: str, max_bytes: int = 400_000) -> None:
    """A web-sized copy of a grid: a JPEG at quality 92 with full-resolution chroma (4:4:4), the widest of
    960/840/720/600/480 px that stays under ``max_bytes``.

    Not a palette PNG: 256 colours dithered over a photo grid change exactly what a reader of the picture is judging
    (colour fidelity), and 4:2:0 chroma subsampling would blur the colours of 256 px tiles the same way."""
    import io

    from PIL import Image

    full = Image.fromarray(grid)
    data = b""
    for width in (960, 840, 720, 600, 480):
        im = full if full.width <= width else full.resize((width, round(full.height * width / full.width)),
                                                          Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=92, subsampling=0, optimize=True)
        data = buf.getvalue()
        if len(data) <= max_bytes:
            break
    with open(path, "wb") as f:
        f.write(data)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    t0 = time.perf_counter()
    quiet = bool(args.quiet)
    n = 5
    out = os.path.abspath(args.out)
    input_dir, token_dir = os.path.join(out, "input"), os.path.join(out, "tokens")
    if not 1 <= int(args.num_images) <= len(SAMPLES):
        raise ValueError(f"--num-images must be 1..{len(SAMPLES)}, got {args.num_images}")
    import shutil

    # a fresh run each time: the job itself would resume and skip every committed unit
    shutil.rmtree(token_dir, ignore_errors=True)
    shutil.rmtree(input_dir, ignore_errors=True)
    _step(quiet, 1, n, f"writing {args.num_images} sample images + 1 corrupt file to {input_dir}", t0)
    paths = write_inputs(input_dir, int(args.num_images))

    _step(quiet, 2, n, f"loading model {args.model!r}", t0)
    from gq_model import GQModel

    model = GQModel.from_pretrained(args.model).eval()
    c = model.config
    if not quiet:
        print(f"           {c.arch} f={model.downsample_factor} K={c.codebook_size} m={c.group} codebook "
              f"{model.fingerprint} model {model.model_fingerprint}", flush=True)

    _step(quiet, 3, n, "tokenizing with gq_pipeline.tokenize (local Ray cluster, Parquet + WebDataset)", t0)
    import gq_pipeline

    summary = gq_pipeline.tokenize(model, input_dir, token_dir, format="both", image_size=int(args.image_size),
                                   batch_size=8, unit_size=8, progress=not quiet, num_cpus=args.num_cpus)

    _step(quiet, 4, n, "decoding the tokens back and drawing the grid", t0)
    import torch

    with torch.no_grad():
        grid, psnr = decode_side_by_side(model, token_dir, int(args.image_size))
    grid_path = os.path.join(out, "demo-grid.png")
    Image.fromarray(grid).save(grid_path, optimize=True)
    small_path = os.path.join(out, "demo-grid-small.jpg")
    write_web_image(grid, small_path)

    _step(quiet, 5, n, "codebook usage plot", t0)
    from gq_pipeline.inspect_cli import plot_usage, token_histogram, usage_stats
    from gq_pipeline.shards import list_shards

    shards = list_shards(os.path.join(token_dir, "parquet"), "parquet")
    counts, _ = token_histogram(shards)
    stats = usage_stats(counts, c.codebook_size)
    usage_path = os.path.join(out, "codebook-usage.png")
    plot_usage(counts, stats, usage_path)

    tp = summary["throughput"]
    report = {
        "inputs": summary["inputs"], "tokenized": summary["tokenized"], "errors": summary["errors"],
        "errors_by_kind": summary["errors_by_kind"], "images_per_s": tp.get("images_per_s"),
        "tokens": int(counts.sum()), "tokens_per_image": int(counts.sum()) // max(1, summary["tokenized"]),
        "bits_per_token": int(round(np.log2(c.codebook_size))),
        "codebook_usage": {"used": stats["used"], "codebook_size": stats["codebook_size"],
                           "usage": round(stats["usage"], 6), "perplexity": round(stats["perplexity"], 1)},
        "psnr_db": psnr, "mean_psnr_db": round(float(np.mean(list(psnr.values()))), 2) if psnr else None,
        "model": args.model, "codebook_fingerprint": model.fingerprint, "model_fingerprint": model.model_fingerprint,
        "files": {"input": input_dir, "tokens": token_dir, "parquet": os.path.join(token_dir, "parquet"),
                  "webdataset": os.path.join(token_dir, "webdataset"), "grid": grid_path, "grid_small": small_path, "usage_plot": usage_path},
        "wall_s": round(time.perf_counter() - t0, 1), "num_written": len(paths),
    }
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    u = report["codebook_usage"]
    print(f"\ngq demo: {report['tokenized']} tokenized + {report['errors']} errors = {report['inputs']} inputs "
          f"{report['errors_by_kind'] or ''}\n"
          f"         {report['images_per_s']} images/s in the pipeline, {report['tokens']} tokens "
          f"({report['tokens_per_image']} per image, {report['bits_per_token']} bits each)\n"
          f"         codebook usage {u['used']}/{u['codebook_size']} codes, perplexity {u['perplexity']}; "
          f"mean reconstruction PSNR {report['mean_psnr_db']} dB\n"
          f"         grid: {grid_path}\n         usage plot: {usage_path}\n"
          f"         shards: {token_dir}/parquet, {token_dir}/webdataset (gq inspect {token_dir})\n"
          f"         done in {report['wall_s']}s", flush=True)
    if report["tokenized"] + report["errors"] != report["inputs"]:
        print("gq demo: error: tokenized + errors != inputs", file=sys.stderr)
        return 1
    return 0
