"""``gq export CKPT_DIR OUT``: write a GQModel bundle straight from a training checkpoint of any ZeRO stage.

CKPT_DIR is a run directory, its ``checkpoints`` folder (the tag defaults to the one in ``latest``) or one tag folder.
The architecture comes from the ``gq_config.json`` the trainer saves with every checkpoint, so nothing else is needed.
Every file is read ``weights_only`` (see gq_model/zero_checkpoint.py): exporting never runs code from the checkpoint.
"""
from __future__ import annotations

import argparse
import sys

from gq_model.zero_checkpoint import load_model_from_zero_checkpoint, resolve_checkpoint

__all__ = ["add_parser", "run", "load_model_from_zero_checkpoint", "main"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt_dir", help="run dir, checkpoints dir or checkpoint tag dir")
    p.add_argument("out", help="output bundle directory (local path or fsspec URL)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' one)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoint files with weights_only=False (only for files you trust; gq's own "
                        "checkpoints never need it)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="export a training checkpoint (ZeRO 0-3) to a model bundle",
                              description=__doc__)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    root, tag = resolve_checkpoint(args.ckpt_dir, args.tag)
    model = load_model_from_zero_checkpoint(root, tag, trust_checkpoint=args.trust_checkpoint)
    model.save_pretrained(args.out, source="gq export", checkpoint=f"{root}/{tag}")
    print(f"gq export: {root}/{tag} -> {args.out} (codebook {model.fingerprint}, model {model.model_fingerprint})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__)
    _add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
