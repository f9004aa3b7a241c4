"""The ``gq`` console command: one front for convert, tokenize, train, export, eval, decode, inspect, gc and demo.

It lives on the top floor (``jobs``) because it names every floor's sub-commands; ``gq_model`` and ``gq_pipeline``
below it never import it. Each sub-command lives next to the code it drives and registers itself through an
``add_parser(subparsers)`` function, imported lazily so that ``gq convert --help`` never pays for Ray or DeepSpeed.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys

# name -> module with add_parser(subparsers) that sets func=...; modules that are missing are skipped (partial installs).
SUBCOMMANDS = {
    "convert": "gq_model.convert_cli",
    "tokenize": "jobs.tokenize",
    "train": "jobs.train",
    "export": "jobs.export",
    "eval": "jobs.eval",
    "decode": "gq_pipeline.decode_cli",
    "inspect": "gq_pipeline.inspect_cli",
    "gc": "gq_pipeline.gc_cli",
    "demo": "jobs.demo",
    "weights": "gq_model.weights_cli",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gq", description="Gaussian Quant (GQ) image tokenizer")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        first = next((a for a in argv if not a.startswith("-")), None)
        wanted = first if first in SUBCOMMANDS else None
    for name, module_name in SUBCOMMANDS.items():
        if wanted is not None and name != wanted:
            sub.add_parser(name, help=f"(see gq {name} --help)")
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
                continue  # this sub-command is not part of this installation
            raise
        module.add_parser(sub)
    for sub_parser in sub.choices.values():
        plain_help(sub_parser)
    for choice in sub._choices_actions:  # the one-line summaries `gq --help` lists
        choice.help = plain_text(choice.help)
    return parser


_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # :mod:`gq_pipeline.job` -> gq_pipeline.job


def plain_text(text: str | None) -> str | None:
    """Docstrings double as ``--help`` text; a terminal shows RST markup literally, so drop it there."""
    if not text:
        return text
    return _ROLE.sub(r"\1", text).replace("``", "")


def plain_help(parser: argparse.ArgumentParser) -> None:
    """Make one sub-command's description, epilog and argument help plain text (see :func:`plain_text`)."""
    parser.description = plain_text(parser.description)
    parser.epilog = plain_text(parser.epilog)
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = plain_text(action.help)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"gq {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
