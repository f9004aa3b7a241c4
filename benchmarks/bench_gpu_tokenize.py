#!/usr/bin/env python
"""GPU throughput of ``gq tokenize`` with the released architecture (not a test; the issue's goal: >= 1000 img/s per
H100 at 256² with a bf16 encoder). Prints markdown; ``--json PATH`` writes the numbers.

    python benchmarks/bench_gpu_tokenize.py                        # sd3unet_gq_0.25 layout, 256², bf16, 4096 images
    python benchmarks/bench_gpu_tokenize.py --model demo --images 32 --size 64   # a CPU smoke run of the script

Two measurements on the same model, in one run:

1. **model ceiling**: encoder (bf16 autocast) + fp32 codebook search on device-resident batches, timed with CUDA
   synchronisation: what the GPU can do when it never waits for data;
2. **pipeline**: ``gq_pipeline.tokenize`` over JPEG files on local disk (decode, EXIF, resize and crop in Ray read
   tasks on the CPUs, GPU actors, Parquet shards, commit), reported as images/s of the pipeline phase, the model
   actors' busy fraction, and the ratio to (1): how close the pipeline keeps the GPU to its ceiling.

Weights are random (the official checkpoint is the user's): throughput does not depend on their values. Images are
smooth synthetic 320x256 JPEGs, so decoding costs about what a photo of that size costs.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import torch

from report import print_table, write_json  # benchmarks/report.py (this script's folder is on sys.path)


def build_model(args):
    from gq_model import GQConfig, GQModel
    from gq_model.reference_config import preset_config

    if args.model:
        from gq_model.loading import load_model

        return load_model(args.model)
    torch.manual_seed(0)
    return GQModel(GQConfig.from_reference(preset_config(args.preset))).eval()


def write_jpegs(folder: str, n: int, seed: int = 0) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:320].astype(np.float32)
    for i in range(n):
        a, b, c = rng.uniform(0.01, 0.08, 3)
        img = np.stack([np.sin(xx * a + i), np.cos(yy * b + 2 * i), np.sin((xx + yy) * c)], -1)
        img = ((img + 1) * 127.5 + rng.normal(0, 6, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def model_ceiling(model, device, size: int, batch: int, precision: str, seconds: float) -> dict:
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1

    bf16 = precision == "bf16" and device.type == "cuda"  # as in the pipeline's actors: bf16 on GPU only

    def step():
        with torch.no_grad():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                mu, logvar = model.encode_moments(x)
            model.quantizer.quantize(mu.float(), logvar.float())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up: cudnn autotuning, Triton autotune of the search kernel
        step()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        step()
        n += 1
    sync()
    dt = time.perf_counter() - t0
    return {"images_per_s": n * batch / dt, "batches": n, "batch": batch}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sd3unet_gq_0.25")
    ap.add_argument("--model", help="a bundle/.ckpt/built-in name instead of a randomly initialised preset")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of the model-ceiling measurement")
    ap.add_argument("--workdir", default=None, help="where to write images and tokens (default: a temp dir)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import gq_pipeline

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = build_model(args)
    work = args.workdir or tempfile.mkdtemp(prefix="gq-gpu-bench-")
    try:
        t0 = time.perf_counter()
        write_jpegs(os.path.join(work, "images"), args.images)
        write_s = time.perf_counter() - t0
        ceiling = model_ceiling(model.to(device), device, args.size, args.batch, args.precision, args.seconds)
        model = model.cpu()
        summary = gq_pipeline.tokenize(model, os.path.join(work, "images"), os.path.join(work, "tokens"),
                                       image_size=args.size, batch_size=args.batch, precision=args.precision,
                                       gpus_per_worker=1 if cuda else None, unit_size=512, progress=False)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    tp = summary["throughput"]
    res = {"date": datetime.date.today().isoformat(),
           "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} CPUs)",
           "cpus": os.cpu_count(), "model": args.model or args.preset, "params": sum(p.numel() for p in
                                                                                    model.parameters()),
           "image_size": args.size, "batch": args.batch, "precision": args.precision, "images": args.images,
           "write_images_s": round(write_s, 1), "model_ceiling_images_per_s": round(ceiling["images_per_s"], 1),
           "pipeline_images_per_s": tp["images_per_s"], "pipeline_s": tp["pipeline_s"], "wall_s": tp["wall_s"],
           "model_utilization": tp["model_utilization"], "time_split": tp["time_split"],
           "tokenized": summary["tokenized"], "errors": summary["errors"]}
    res["pipeline_over_ceiling"] = round(res["pipeline_images_per_s"] / res["model_ceiling_images_per_s"], 3)
    print(f"## gq tokenize on {res['device']}: {res['model']}, {args.size}², batch {args.batch}, {args.precision}\n")
    print_table(["model ceiling (img/s)", "pipeline (img/s)", "pipeline / ceiling", "model actor busy", "images"],
                [[f"{res['model_ceiling_images_per_s']:.0f}", res["pipeline_images_per_s"],
                  f"{res['pipeline_over_ceiling']:.2f}", res["model_utilization"],
                  f"{res['tokenized']} ok, {res['errors']} errors"]])
    write_json(args.json, res)
    assert res["tokenized"] == args.images and res["errors"] == 0, res
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
