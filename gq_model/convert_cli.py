"""``gq convert``: an official reference checkpoint (+ YAML or preset), local or on the Hub, -> a GQ bundle."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an official .ckpt (+ its YAML) into a GQ model bundle",
                       description="Load the reference's Lightning checkpoint strictly (encoder./decoder. only) and "
                                   "write a safetensors bundle with its codebook fingerprint.")
    p.add_argument("checkpoint", help="path or fsspec URL of the .ckpt (e.g. sd3unet_gq_0.25.ckpt), or a Hub name: "
                                      "official:sd3unet_gq_0.25, hf://owner/repo/file.ckpt (preset from the file name)")
    p.add_argument("output", help="bundle directory or fsspec URL to write")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="the reference YAML (e.g. sd3unet_gq_0.25.yaml)")
    src.add_argument("--preset", help="a built-in preset instead of the YAML (e.g. sd3unet_gq_0.25)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow non-tensor pickled objects in the checkpoint (only for files you trust)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gq_model.hub import is_hub_spec
    from gq_model.loading import load_model

    if not is_hub_spec(args.checkpoint) and not (args.config or args.preset):
        raise ValueError(f"{args.checkpoint}: give its YAML (--config) or a preset (--preset)")
    model = load_model(args.checkpoint, config=args.config, preset=args.preset,
                       trust_checkpoint=args.trust_checkpoint)
    report = getattr(model, "load_report", None)  # absent when a Hub model came from the converted-bundle cache
    model.save_pretrained(args.output, converted_from=str(args.checkpoint))
    if report is not None:
        print(f"loaded {report.loaded} autoencoder tensors, ignored {len(report.ignored)} trainer tensors"
              + (f", {len(report.unexpected)} unexpected (not loaded)" if report.unexpected else ""))
    print(f"wrote {args.output}  codebook {model.fingerprint}  model {model.model_fingerprint}")
    return 0
