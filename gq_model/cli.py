"""Compatibility alias for :mod:`jobs.cli`, where the ``gq`` command now lives (the top floor, since it names ``jobs``).

Kept so that ``python -m gq_model.cli`` and ``from gq_model.cli import main`` written before the move still work.
Nothing inside ``gq_model`` imports this module, so importing the model package never pulls in ``jobs``.
"""
from __future__ import annotations

import sys

from jobs.cli import SUBCOMMANDS, build_parser, main, plain_help, plain_text

__all__ = ["SUBCOMMANDS", "build_parser", "main", "plain_help", "plain_text"]

if __name__ == "__main__":
    sys.exit(main())
