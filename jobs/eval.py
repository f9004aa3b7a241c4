"""``gq eval``: reconstruction quality, codebook use and a codebook-size verdict for a GQ model on a folder of images.

One process, a Ray pool (``--workers N``) or torchrun ranks (``torchrun --nproc-per-node 8 -m jobs.eval ...``) all
run the same shard function; shards are strided slices of the sorted file list and their statistics are exact sums
(:mod:`gq_model.metrics.evaluator`), so the numbers do not depend on how the work was split. The protocol (listing,
resize, crop, clamping, FID conventions) is written into the JSON report and documented in docs/eval.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import math
import os
import posixpath
import sys
import time
from typing import Any, Iterator

from gq_model.storage import parse_storage_options

__all__ = ["add_parser", "run", "list_images", "main"]



# ---------------------------------------------------------------------------------------------------------- CLI
def add_parser(sub: argparse._SubParsersAction) -> None:
    from gq_model.metrics.advisor import POSTERIOR_SAMPLE_MISS

    p = sub.add_parser("eval", help="evaluate a model: PSNR/SSIM/LPIPS/rFID, codebook usage, KL rate, K advice",
                       description="Reconstruct every image (quantized and Gaussian-mean), report PSNR, SSIM, LPIPS "
                                   "(AlexNet), rFID, codebook usage/perplexity, the posterior's per-group KL bits and "
                                   "whether the codebook size suffices. See docs/eval.md for the protocol.")
    p.add_argument("--model", required=True, help="official:sd3unet_gq_0.25, hf://owner/repo/file.ckpt, bundle "
                                                  "directory/URL, built-in name (demo), DeepSpeed checkpoint dir, or "
                                                  "a reference .ckpt (then also --reference-config or --preset)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--reference-config", help="reference YAML for a .ckpt --model")
    src.add_argument("--preset", help="built-in preset for a .ckpt --model (e.g. sd3unet_gq_0.25); overrides the one "
                                      "inferred from an hf:// file name")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle a local .ckpt or DeepSpeed checkpoint with weights_only=False (files you trust only)")
    p.add_argument("--input", required=True, help="folder (searched recursively), glob or brace pattern of images, "
                                                  "local or fsspec URL (s3://...), listed as gq tokenize lists; "
                                                  "sorted by path")
    p.add_argument("--storage-options", type=parse_storage_options, default=None, metavar="JSON",
                   help="fsspec options for --input, as gq tokenize takes them (flat, or keyed by protocol)")
    p.add_argument("--image-size", type=int, default=256, help="shorter side resized to this, then centre crop")
    p.add_argument("--preprocess", choices=("gq", "reference"), default="gq",
                   help="gq (default): gq tokenize's pixels (EXIF, alpha onto white, bicubic); reference: the GQ "
                        "reference pipeline's (no EXIF, alpha dropped, bilinear), for numbers comparable with it")
    p.add_argument("--limit", type=int, help="evaluate only the first N images of the sorted list")
    p.add_argument("--batch-size", type=int, default=16)
    lp = p.add_mutually_exclusive_group()
    lp.add_argument("--lpips-weights", help="directory with alexnet*.pth (torchvision) and alex.pth (LPIPS heads); "
                                            "default: gq's weight cache, else a verified download (gq weights fetch)")
    lp.add_argument("--no-lpips", action="store_true", help="skip LPIPS on purpose (reported as a warning)")
    fid = p.add_mutually_exclusive_group()
    fid.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth (or its directory); default: "
                                                 "gq's weight cache, else a verified download (gq weights fetch)")
    fid.add_argument("--no-fid", action="store_true", help="skip rFID on purpose (reported as a warning)")
    p.add_argument("--json", help="write the JSON report here (local path or fsspec URL)")
    p.add_argument("--workers", type=int, default=0, help="Ray pool size (0: in this process, or torchrun ranks)")
    p.add_argument("--ray-address", help="Ray cluster to join (default: start a local one)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--perceptual-input", choices=("clamped", "unclamped"), default="clamped",
                   help="reconstructions fed to LPIPS and Inception (the reference feeds them unclamped)")
    p.add_argument("--advisor-percentile", type=float, default=99.0,
                   help="percentile of the per-group KL bits that the codebook must cover")
    p.add_argument("--advisor-delta", type=float, default=POSTERIOR_SAMPLE_MISS,
                   help="target bound on P(|z_hat - mu| >= sigma) that sets the theorem margin")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.eval ...`` (also what torchrun launches)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.eval")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"gq eval: error: {e}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------------------- inputs
def list_images(url: str, limit: int | None = None, storage_options: dict | None = None,
                in_process: bool = True) -> tuple[list[str], int]:
    """(full URLs of the images to evaluate, number listed before ``--limit``).

    Listed as ``gq tokenize`` lists (``gq_pipeline.planning.list_input_files``: a folder recursively, a glob, a
    brace pattern; the tokenizer's image extensions; hidden names skipped), sorted by URL (code-point order), so
    ``--limit N`` always takes the same N images.
    """
    from gq_pipeline.planning import list_input_files
    from gq_pipeline.records import IMAGE_EXTENSIONS

    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    try:
        files = list_input_files(url, storage_options, kinds=("files",), in_process=in_process)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--input {url}: no such file, folder or matching glob ({e})") from None
    if not files:
        raise FileNotFoundError(f"--input {url}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return (files[:limit] if limit else files), len(files)


def _batches(files: list[str], spec: dict) -> Iterator[tuple[Any, list[dict]]]:
    """Yield (float batch [B,3,S,S] in [-1,1] or None, skipped records), reading the next batch in the background."""
    import torch

    from gq_model.storage import url_to_fs
    from gq_pipeline.preprocess import preprocess_image
    from gq_pipeline.records import SampleError

    fs, _ = url_to_fs(files[0], spec.get("storage_options")) if files else (None, None)
    size, bs, multiple = spec["image_size"], spec["batch_size"], spec["multiple_of"]
    policy = spec.get("preprocess", "gq")

    def read_one(url: str):
        try:
            data = fs.cat_file(fs._strip_protocol(url))
            return preprocess_image(data, size, "center", multiple_of=multiple, policy=policy), None
        except SampleError as e:
            return None, {"path": url, "error": f"{e.kind}: {e}"}
        except OSError as e:  # unreadable file: reported, like an undecodable one, never silently dropped
            return None, {"path": url, "error": f"read: {type(e).__name__}: {e}"}

    def load(chunk: list[str], readers: cf.ThreadPoolExecutor):
        results = list(readers.map(read_one, chunk))  # concurrent reads matter on object stores
        images = [im for im, _ in results if im is not None]
        return (torch.stack(images) if images else None), [bad for _, bad in results if bad is not None]

    chunks = [files[i:i + bs] for i in range(0, len(files), bs)]
    with cf.ThreadPoolExecutor(max_workers=1) as ahead, cf.ThreadPoolExecutor(max_workers=8) as readers:
        pending = ahead.submit(load, chunks[0], readers) if chunks else None
        for i in range(len(chunks)):
            batch = pending.result()
            pending = ahead.submit(load, chunks[i + 1], readers) if i + 1 < len(chunks) else None
            yield batch


# ---------------------------------------------------------------------------------------------------------- work
def _load_model(spec: dict):
    """Every model form ``gq tokenize`` takes (see gq_model/loading.py): one resolver for all CLIs."""
    from gq_model.loading import load_model

    if spec["model"].endswith(".ckpt") and not (spec.get("reference_config") or spec.get("preset")):
        raise ValueError("a .ckpt --model needs --reference-config or --preset")  # eval's own flag name
    return load_model(spec["model"], config=spec.get("reference_config"), preset=spec.get("preset"),
                      trust_checkpoint=bool(spec.get("trust_checkpoint")))


def load_metric_nets(spec: dict) -> tuple[Any, Any, dict, list[str]]:
    """(LPIPS-Alex or None, FID Inception or None, their info for the report, warnings), loaded on CPU.

    Each network's weights come from its flag, else gq's weight cache, else a verified download
    (:mod:`gq_model.weights`). A metric is skipped only when asked (``--no-lpips`` / ``--no-fid``, noted as a
    warning); weights that cannot be had are an error that says how to get them.
    """
    import warnings

    from gq_model.metrics.inception import build_fid_inception
    from gq_model.metrics.lpips_alex import build_lpips_alex

    lpips = inception = None
    info, notes = {"lpips": None, "inception": None}, []
    where = {"cache": spec.get("weights_cache"), "base_url": spec.get("weights_base_url")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if spec.get("no_lpips"):
            notes.append("LPIPS skipped (--no-lpips)")
        else:
            lpips, files = build_lpips_alex(spec.get("lpips_weights"), **where)
            info["lpips"] = {"net": "alex", "version": "0.1", **files}
        if spec.get("no_fid"):
            notes.append("rFID skipped (--no-fid)")
        else:
            inception, info["inception"] = build_fid_inception(spec.get("inception_weights"), **where)
    notes += [str(w.message) for w in caught if issubclass(w.category, (UserWarning, RuntimeWarning))]
    return lpips, inception, info, notes


def eval_shard(spec: dict, files: list[str], device: str | None = None, model=None, nets=None) -> dict:
    """Evaluate ``files`` in this process: {"state": evaluator state, "skipped": [...]} (what workers return).

    ``model`` and ``nets`` (LPIPS, Inception) are loaded from ``spec`` unless given (Ray workers load their own).
    """
    import torch

    from gq_model.metrics.evaluator import ReconstructionEvaluator

    device = device or spec["device"]
    model = (model if model is not None else _load_model(spec)).to(device).eval()
    lpips, inception = nets if nets is not None else load_metric_nets(spec)[:2]
    lpips = lpips.to(device) if lpips is not None else None
    inception = inception.to(device) if inception is not None else None
    ev = ReconstructionEvaluator(model, lpips=lpips, inception=inception, perceptual_input=spec["perceptual_input"])
    skipped = []
    for batch, bad in _batches(files, spec):
        skipped += bad
        if batch is not None:
            with torch.no_grad():
                ev.update(batch.to(device))
    return {"state": ev.state(), "skipped": skipped}


def _run_ray(spec: dict, shards: list[list[str]], address: str | None) -> list[dict]:
    import ray

    from gq_pipeline.ray_init import init_ray

    started = init_ray(address, log_to_driver=False)
    try:
        gpus = 1 if spec["device"].startswith("cuda") else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus)(eval_shard)
        return ray.get([task.remote(spec, s, "cuda" if gpus else "cpu") for s in shards if s])
    finally:
        if started:
            ray.shutdown()


def _weights_cache() -> str:
    """The driver's gq cache root, passed to Ray workers (which do not see the driver's environment changes)."""
    from gq_model.weights import cache_dir

    return cache_dir()


def _distributed() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# ---------------------------------------------------------------------------------------------------------- report
def _finite(obj: Any) -> Any:
    """NaN/inf -> None, recursively, so the report is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _fmt(section: dict, name: str, digits: int) -> str:
    v = section.get(name)
    if v is None:
        return "n/a"
    return f"{(v['mean'] if isinstance(v, dict) else v):.{digits}f}"


def summary_line(report: dict) -> str:
    """One line: per reconstruction kind, each pixel metric as ``clamped (unclamped value)``; the unclamped ones are
    the reference's (see ``paper_comparable`` in the report)."""
    r, cb, adv = report["reconstruction"], report["codebook"], report["advisor"]
    proto = report["protocol"]
    parts = [f"gq eval: {proto['num_images']} images @{proto['image_size']}px "
             f"preprocess {proto.get('preprocess_policy', 'gq')}"]
    for kind in ("quantized", "gaussian"):
        s = r[kind]
        pixel = " ".join(f"{label} {_fmt(s, m, d)} (unclamped {_fmt(s, m + '_unclamped', d)})"
                         for label, m, d in (("PSNR", "psnr", 2), ("SSIM", "ssim", 4), ("MS-SSIM", "msssim", 4)))
        parts.append(f"{kind}: {pixel} LPIPS {_fmt(s, 'lpips', 4)} rFID {_fmt(s, 'rfid', 3)}")
    parts.append(f"usage {cb['usage']:.1%} perplexity {cb['perplexity']:.0f}/{cb['codebook_size']}")
    rec = adv["recommended_log2"]
    parts.append(f"KL p{adv['percentile']:g} {adv['rate_bits']:.2f} bits vs log2 K {adv['log2_codebook_size']:g}: "
                 f"{adv['verdict']}, smallest sufficient K = 2^{rec}")
    return " | ".join(parts)


_PREPROCESS_TEXT = {
    "gq": "EXIF transpose, RGB (alpha over white), shorter side -> image_size with PIL bicubic (longer side rounded), "
          "centre crop (offsets floored), x = uint8/127.5 - 1",
    "reference": "PIL convert('RGB') (no EXIF transpose, alpha dropped), shorter side -> image_size with PIL bilinear "
                 "(longer side truncated, torchvision Resize), CenterCrop (offsets int(round)), x = (uint8/255 - "
                 "0.5)/0.5",
}


def paper_comparable(args, n_images: int) -> dict:
    """Which report numbers are computed the way the reference ``eval.py`` (the source of the published GQ/FSQ/BSQ
    tables) computes them, and which of its conditions this run meets (gq-reference.md, section 5)."""
    unclamped_perceptual = args.perceptual_input == "unclamped"
    numbers = [f"reconstruction.quantized.{m}" for m in ("psnr_unclamped", "ssim_unclamped", "msssim_unclamped")]
    numbers += [f"reconstruction.quantized.{m}" for m in ("lpips", "rfid") if unclamped_perceptual]
    conditions = {
        "preprocess_reference": args.preprocess == "reference",
        "image_size_256": args.image_size == 256,
        "perceptual_input_unclamped": unclamped_perceptual,
        "at_least_2048_images": n_images >= 2048,
    }
    return {
        "numbers": numbers,
        "conditions": conditions,
        "all_conditions_met": all(conditions.values()),
        "note": "the reference reports the quantized reconstruction, unclamped, on ImageNet val at 256 px (49,920 "
                "images with its drop_last) after its own preprocessing; clamped and Gaussian-mean numbers are gq's "
                "additions. Published tables are comparable only when every condition holds and the images are the "
                "same set (--input ImageNet val).",
    }


def _protocol(args, files: list[str], listed: int, n_images: int, skipped: list, mode: str, world: int,
              device: str) -> dict:
    return {
        "input": args.input, "listing": "recursive (folder) or fsspec glob; image extensions; hidden names skipped; "
                                        "sorted by URL; --limit takes the first N",
        "num_listed": listed, "limit": args.limit, "num_selected": len(files), "num_images": n_images,
        "first_file": files[0], "last_file": files[-1],
        "files_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(),
        "skipped_images": skipped,
        "image_size": args.image_size,
        "preprocess_policy": args.preprocess,
        "preprocess": _PREPROCESS_TEXT[args.preprocess],
        "metric_scale": "(x + 1) * 127.5 in [0, 255], not rounded; originals and reconstructions alike",
        "clamping": "psnr/ssim: reconstructions clipped to [-1, 1]; *_unclamped: raw decoder output (the reference's)",
        "ssim": "Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data_range 255, valid region, mean over channels",
        "msssim": "pytorch_msssim.ms_ssim convention: 5 scales, weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), the "
                  "SSIM above per scale, negative cs/ssim set to 0, avg_pool 2 (padding side % 2) between scales; "
                  "only when H, W >= 256 (else null)",
        "perceptual_input": args.perceptual_input,
        "rfid": "pool3 2048-d of the FID InceptionV3, bilinear resize to 299 (align_corners=False), inputs in "
                "[-1, 1]; reference statistics = the same original images; unbiased covariance",
        "std": "population standard deviation over images",
        "mode": mode, "processes": world, "device": device, "batch_size": args.batch_size,
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from gq_model.metrics.evaluator import FID_MIN_IMAGES, ReconstructionEvaluator, merge_states
    from gq_model.metrics.image import MS_SSIM_MIN_SIZE

    t0 = time.time()
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    args.preprocess = getattr(args, "preprocess", "gq")
    if not 0.0 < args.advisor_percentile <= 100.0:
        raise ValueError(f"--advisor-percentile must be in (0, 100], got {args.advisor_percentile}")
    rank, world = _distributed()
    if world > 1 and args.workers:
        raise ValueError("use either torchrun or --workers, not both")
    mode = "torchrun" if world > 1 else ("ray" if args.workers else "single")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if mode == "torchrun" and device == "cuda":  # one GPU per rank
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"

    files, listed = list_images(args.input, args.limit, args.storage_options, in_process=mode == "single")
    model = _load_model(vars(args)).eval()  # validates the model before any worker starts, and sizes the report
    spec = {"model": args.model, "reference_config": args.reference_config, "preset": args.preset,
            "trust_checkpoint": args.trust_checkpoint,
            "image_size": args.image_size, "batch_size": args.batch_size, "multiple_of": model.downsample_factor,
            "preprocess": args.preprocess,
            "lpips_weights": args.lpips_weights, "inception_weights": args.inception_weights,
            "no_lpips": args.no_lpips, "no_fid": args.no_fid, "weights_cache": _weights_cache(),
            "weights_base_url": os.environ.get("GQ_WEIGHTS_BASE_URL"),
            "perceptual_input": args.perceptual_input, "device": device,
            "storage_options": args.storage_options}
    model._check_size(args.image_size, args.image_size)
    lpips, inception, weights, notes = load_metric_nets(spec)  # validated here, before any worker starts

    if mode == "torchrun":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        try:
            out = eval_shard(spec, files[rank::world], device, model, (lpips, inception))
            ev = ReconstructionEvaluator(model, fid=weights["inception"] is not None)
            ev.load_state(out["state"])
            ev.all_reduce()
            gathered = [None] * world
            dist.all_gather_object(gathered, out["skipped"])
            skipped = [s for part in gathered for s in part]
        finally:
            dist.destroy_process_group()
        if rank != 0:
            return 0
    else:
        if mode == "ray":
            outs = _run_ray(spec, [files[i::args.workers] for i in range(args.workers)], args.ray_address)
        else:
            outs = [eval_shard(spec, files, device, model, (lpips, inception))]
        ev = ReconstructionEvaluator(model, fid=weights["inception"] is not None)
        state = outs[0]["state"]
        for o in outs[1:]:
            state = merge_states(state, o["state"])
        ev.load_state(state)
        skipped = sorted((s for o in outs for s in o["skipped"]), key=lambda s: s["path"])

    processes = world if mode == "torchrun" else max(args.workers, 1)
    n = ev.num_images
    if n == 0:
        raise ValueError(f"none of the {len(files)} selected images could be read: {skipped[:3]}")
    for s in skipped:
        notes.append(f"skipped {s['path']}: {s['error']}")
    if weights["inception"] is not None and n < FID_MIN_IMAGES:
        notes.append(f"rFID from {n} < {FID_MIN_IMAGES} images: the 2048-d covariance is rank-deficient and rFID is "
                     f"biased upward; compare it only with runs on the same images")
    if args.image_size < MS_SSIM_MIN_SIZE:
        notes.append(f"MS-SSIM not computed: images are {args.image_size}px < {MS_SSIM_MIN_SIZE}px (the reference "
                     f"reports NaN below that)")
    metrics = ev.report(args.advisor_percentile, args.advisor_delta)
    cfg = model.config
    report = {
        "gq_eval_version": 1,
        "model": {"url": args.model, "arch": cfg.arch, "codebook_size": cfg.codebook_size, "group": cfg.group,
                  "num_groups": cfg.num_groups, "downsample_factor": model.downsample_factor,
                  "codebook_fingerprint": model.fingerprint, "model_fingerprint": model.model_fingerprint},
        "protocol": _protocol(args, files, listed, n, skipped, mode, processes, device),
        "weights": weights,
        **metrics,
        "paper_comparable": paper_comparable(args, n),
        "warnings": notes,
        "elapsed_s": time.time() - t0,
    }
    report["summary"] = summary_line(report)
    report = _finite(report)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    if args.json:
        import fsspec

        from gq_model.storage import is_local_fs

        fs, path = fsspec.core.url_to_fs(args.json)
        if is_local_fs(fs):
            fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
        with fs.open(path, "w") as f:
            json.dump(report, f, indent=2, allow_nan=False)
    print(report["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
