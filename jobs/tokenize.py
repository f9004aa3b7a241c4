"""``gq tokenize`` / ``python -m jobs.tokenize``: tokenize an image dataset into GQ token shards.

Runs on the Ray cluster named by --ray-address or RAY_ADDRESS (e.g. under ``ray job submit --working-dir . -- python
-m jobs.tokenize ...``; a driver started outside the cluster needs gq installed on its nodes); with GPUs or actor
options and no cluster named, on a local Ray instance it starts; otherwise in this process alone. Credentials for s3:// or gs:// are best set in the cluster's environment; --storage-options
travels to every task. Rerunning the same command resumes: committed units are skipped, unfinished ones redone
with the same file names and bytes. One run writes an output at a time: a second run on a leased output refuses
(naming the owner and when its lease expires); --force-lease takes the lease of a crashed owner. A rerun that finds
every unit committed writes nothing (a complete output on read-only storage checks fine). Exit status: 0 done,
1 bad arguments or refused output (incompatible, or leased by another run), 2 malformed command line (an unknown
option, --storage-options that is not a JSON object of options), 3 some units failed, the job stopped (storage full,
read-only or unreachable, workers lost; one line names the cause and what was committed) or its lease was lost
(rerun to retry them), 130 interrupted by Ctrl-C or SIGTERM (rerun to resume; a second Ctrl-C exits at once).

Example: gq tokenize --model demo --input s3://bucket/shards/{00000..00999}.tar --output s3://bucket/tokens
         --format both --image-size 256 --batch-size 128
         gq tokenize --model demo --input-list s3://bucket/inventory/.../manifest.json --output s3://bucket/tokens
"""
from __future__ import annotations

import argparse
import json
import sys

EXIT_UNITS_FAILED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``gq tokenize``. Their defaults and choices are gq_pipeline.options' (stated there once, shared
    with the Python API); the help text is here."""
    from gq_model.storage import parse_storage_options
    from gq_pipeline.options import FORMATS, PLACEMENTS, PRECISIONS, Resources, TokenizeOptions, defaults
    from gq_pipeline.preprocess import CROP_MODES, PREPROCESS_POLICIES

    d = {**defaults(TokenizeOptions), **defaults(Resources)}

    p.add_argument("--model", required=True,
                   help="official:sd3unet_gq_0.25 or hf://owner/repo/file.ckpt (Hugging Face Hub), GQ bundle "
                        "dir/URL, built-in name (demo), reference .ckpt (+ --config/--preset) or DeepSpeed "
                        "checkpoint dir")
    p.add_argument("--input", nargs="+", metavar="URL", default=[],
                   help="image folders, globs, WebDataset tars (brace patterns ok) or Parquet files; any fsspec URL "
                        "(local, file://, s3://, gs://, http(s)://)")
    p.add_argument("--input-list", metavar="FILE",
                   help="a list of inputs instead of (or besides) listing folders: .txt (one URL or path per line), "
                        ".csv/.tsv or .parquet with a url/path column (compressed text ok, e.g. .txt.gz), or an S3 "
                        "Inventory manifest.json. Paths resolve against the list's directory; rows are cut into "
                        "units of --unit-size rows, planned once into OUTPUT/.gq/plan/")
    p.add_argument("--input-list-column", metavar="NAME", help="the URL column of a CSV/Parquet --input-list "
                   "(default: url, path, uri, file, filename or key)")
    p.add_argument("--relist", action="store_true",
                   help="plan the --input-list and brace patterns again instead of reading the plan persisted under "
                        "OUTPUT/.gq/plan/ (folders and globs are listed on every run anyway)")
    p.add_argument("--output", required=True, metavar="URL", help="output directory or URL (see docs/token-format.md)")
    p.add_argument("--format", default=d["format"], choices=list(FORMATS),
                   help=f"shard format: Parquet, WebDataset tars, or both (default {d['format']})")
    p.add_argument("--image-size", type=int, default=d["image_size"],
                   help=f"shorter side after resizing (default {d['image_size']})")
    p.add_argument("--crop", default=d["crop"], choices=list(CROP_MODES),
                   help="center: square crop; none: keep the aspect ratio (longer side cut to a multiple of the "
                        "model's downsampling factor)")
    p.add_argument("--preprocess", default=d["preprocess"], choices=list(PREPROCESS_POLICIES),
                   help="gq (default): EXIF rotation, alpha onto white, bicubic; reference: the GQ reference "
                        "pipeline's pixels (no EXIF, alpha dropped, bilinear; docs/eval.md). Recorded in every "
                        "shard; an output never mixes the two")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help=f"images per model call (default {d['batch_size']})")
    p.add_argument("--model-placement", default=d["model_placement"], choices=list(PLACEMENTS),
                   help="where units are processed: in this process, without Ray, on a single CPU-only machine "
                        "(driver), or in Ray actors, one per GPU or per CPU node (actors). auto: driver when no "
                        "cluster, GPU or actor option is given, actors otherwise")
    p.add_argument("--workers", type=int, default=d["workers"],
                   help="model workers, the most kept alive (default: #GPUs / --gpus-per-worker, or one per node "
                        "on CPU-only clusters); dead ones are replaced")
    p.add_argument("--min-workers", type=int, default=d["min_workers"],
                   help="stop the job when fewer workers than this have been ready for --worker-timeout seconds "
                        f"(default {d['min_workers']}); between it and --workers the pool shrinks and regrows with "
                        "the cluster")
    p.add_argument("--worker-timeout", type=float, default=d["worker_timeout_s"],
                   help="seconds to wait for --min-workers workers to be ready, at start or after losing them "
                        f"(default {d['worker_timeout_s']:g}: time for an autoscaler to add nodes)")
    p.add_argument("--gpus-per-worker", type=float, default=d["gpus_per_worker"],
                   help="GPUs per model worker (default 1 if the cluster has GPUs now, 0 otherwise). Given "
                        "explicitly, workers wait for GPU nodes an autoscaler adds")
    p.add_argument("--cpus-per-worker", type=float, default=d["cpus_per_worker"],
                   help="CPUs reserved per model worker for decoding (and torch threads on CPU); default 2-8 per GPU "
                        "from the cluster's CPU/GPU ratio, or a whole node on CPU-only clusters")
    p.add_argument("--decode-threads", type=int, default=d["decode_threads"],
                   help="decode threads per worker (default: its CPUs with GPUs, 2 on CPU)")
    p.add_argument("--max-failed-units", default=d["max_failed_units"], metavar="N|FRACTION",
                   help="stop the job when more units than this have failed after retries: a count (20) or a "
                        "fraction of the planned units (0.05 or 5%%); default 5%% of the units, at least 10")
    p.add_argument("--max-attempts", type=int, default=d["max_attempts"],
                   help="tries of a unit that fails (read error, model failing on a whole batch, write error) "
                        f"before it is recorded as failed (default {d['max_attempts']}); units whose worker died "
                        "are redone anyway")
    p.add_argument("--latents", action="store_true", help="also write the Gaussian mean mu as float16")
    p.add_argument("--precision", default=d["precision"], choices=list(PRECISIONS),
                   help="bf16 autocast for the encoder on GPU actors (the codebook search stays fp32); needs GPU "
                        "actors, changes ~2%% of tokens, and is recorded: an output never mixes precisions")
    p.add_argument("--config", help="reference YAML for a .ckpt --model")
    p.add_argument("--preset", help="built-in preset for a .ckpt --model (e.g. sd3unet_gq_0.25)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow pickled objects in a .ckpt or DeepSpeed checkpoint you trust (weights_only otherwise; "
                        "never applies to hf:// or official: models)")
    p.add_argument("--unit-size", type=int, default=d["unit_size"],
                   help="image files per work unit for folders and rows per unit for --input-list (tars and Parquet "
                        f"files are one unit each; default {d['unit_size']})")
    p.add_argument("--max-pixels", type=int, default=d["max_pixels"],
                   help=f"refuse larger images as too_large errors (default {d['max_pixels']})")
    p.add_argument("--image-column", help="image column of Parquet inputs (default: auto-detect)")
    p.add_argument("--allow-external-refs", nargs="*", metavar="PREFIX", default=None,
                   help="let Parquet image path references reach beyond the Parquet file's own folder tree (local, "
                        "HTTP) or bucket (object stores): to these URL prefixes, or anywhere when none is given. "
                        "Without it such rows (absolute paths, ../ escapes, other hosts) are 'refused' error records")
    p.add_argument("--extensions", nargs="+", metavar="EXT", default=None,
                   help="image file extensions to read besides jpg jpeg png webp bmp gif tiff tif, e.g. ico ppm tga "
                        "(the summary's ignored_decodable counts the files Pillow could decode that were left out)")
    p.add_argument("--storage-options", type=parse_storage_options, default=d["storage_options"], metavar="JSON",
                   help='fsspec options for remote URLs, e.g. \'{"endpoint_url": "http://host:9000"}\', or per '
                        'protocol when a run mixes stores: \'{"s3": {...}, "gs": {...}}\'')
    p.add_argument("--num-cpus", type=int, default=d["num_cpus"],
                   help="CPUs of the local Ray instance (no RAY_ADDRESS)")
    p.add_argument("--object-store-memory", type=int, default=d["object_store_memory"],
                   help="bytes, local Ray instance only")
    p.add_argument("--ray-address", default=d["ray_address"],
                   help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    p.add_argument("--force-lease", action="store_true",
                   help="take the output's lease (.gq/lease.json) even though another run holds it: for an owner that "
                        "crashed on another machine; a live owner would then write alongside this run")
    p.add_argument("--summary-json", metavar="PATH", help="also write the run summary to this local file")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.add_argument("--verbose", action="store_true", help="also show Ray's own messages and its workers' logs")
    p.add_argument("--allow-empty", action="store_true",
                   help="accept inputs that hold no image (default: an error, since it is usually a wrong path)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``gq tokenize`` (called by jobs.cli)."""
    p = subparsers.add_parser("tokenize", help="tokenize an image dataset into token shards (one process, or Ray actors)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.tokenize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from gq_pipeline.job import JobError, RunInterrupted, tokenize
    from gq_pipeline.lease import LeaseHeldError, LeaseLostError
    from gq_pipeline.planning import ListingError

    if not args.input and not args.input_list:
        print("gq tokenize: error: give --input URL..., --input-list FILE, or both", file=sys.stderr)
        return 1
    try:
        summary = _tokenize(tokenize, args)
    except (ListingError, LeaseHeldError) as e:  # a leased output is refused, like an incompatible one
        print(f"gq tokenize: error: {e}", file=sys.stderr)
        return 1
    except RunInterrupted as e:  # one line: what was committed, and that a rerun resumes
        print(f"gq tokenize: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("gq tokenize: interrupted before any unit was committed; rerun the same command to start",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (JobError, LeaseLostError) as e:
        print(f"gq tokenize: {e}", file=sys.stderr)
        return EXIT_UNITS_FAILED
    text = json.dumps(summary, indent=1)
    print(text)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            f.write(text)
    return EXIT_UNITS_FAILED if summary["units_failed"] else 0


def _tokenize(tokenize, args: argparse.Namespace) -> dict:
    opts, res = settings(args)
    return tokenize(args.model, args.input, args.output, options=opts, resources=res)


# Flags whose value reaches a settings field under another name or in another form
_RENAMED = {"progress": lambda a: not a.quiet, "worker_timeout_s": lambda a: a.worker_timeout,
            "allow_external_refs": lambda a: _external_refs(a.allow_external_refs)}


def settings(args: argparse.Namespace):
    """The command line as ``(TokenizeOptions, Resources)``: every field from the flag of the same name (or
    ``_RENAMED``), so a field added to gq_pipeline.options needs only its flag here."""
    import dataclasses

    from gq_pipeline.options import Resources, TokenizeOptions

    def build(cls):
        return cls(**{f.name: _RENAMED[f.name](args) if f.name in _RENAMED else getattr(args, f.name)
                      for f in dataclasses.fields(cls)})
    return build(TokenizeOptions), build(Resources)


def _external_refs(given: list[str] | None) -> tuple[str, ...]:
    """``--allow-external-refs`` alone allows any reference ("*"); with prefixes, only those; absent, none."""
    if given is None:
        return ()
    return tuple(given) if given else ("*",)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"gq tokenize: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
