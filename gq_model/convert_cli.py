"""``gq convert``: an official reference checkpoint (+ YAML or preset) -> a GQ bundle."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an official .ckpt (+ its YAML) into a GQ model bundle",
                       description="Load the reference's Lightning checkpoint strictly (encoder./decoder. only) and "
                                   "write a safetensors bundle with its codebook fingerprint.")
    p.add_argument("checkpoint", help="path or fsspec URL of the .ckpt (e.g. sd3unet_gq_0.25.ckpt)")
    p.add_argument("output", help="bundle directory or fsspec URL to write")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="the reference YAML (e.g. sd3unet_gq_0.25.yaml)")
    src.add_argument("--preset", help="a built-in preset instead of the YAML (e.g. sd3unet_gq_0.25)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow non-tensor pickled objects in the checkpoint (only for files you trust)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gq_model.model import GQModel

    model = GQModel.from_reference_checkpoint(args.checkpoint, args.config, preset=args.preset,
                                              trust_checkpoint=args.trust_checkpoint)
    report = model.load_report
    model.save_pretrained(args.output, converted_from=str(args.checkpoint))
    print(f"loaded {report.loaded} autoencoder tensors, ignored {len(report.ignored)} trainer tensors"
          + (f", {len(report.unexpected)} unexpected (not loaded)" if report.unexpected else ""))
    print(f"wrote {args.output}  codebook {model.fingerprint}  model {model.model_fingerprint}")
    return 0
