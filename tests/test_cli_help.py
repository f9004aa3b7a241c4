"""``gq <command> --help`` is read in a terminal: plain text, and every option says what it does."""
from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.cli import SUBCOMMANDS, main, plain_text


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help_has_no_rst_markup(capsys, command):
    text = _help(capsys, [command] if command else [])
    assert text.strip() and "``" not in text and ":mod:`" not in text and ":func:`" not in text, text


def test_plain_text_drops_literals_and_roles():
    assert plain_text("``gq decode`` see :mod:`gq_pipeline.job` and :func:`~a.b`") == \
        "gq decode see gq_pipeline.job and a.b"
    assert plain_text(None) is None and plain_text("") == ""


def test_every_decode_option_has_help(capsys):
    """``--batch-size`` and ``--device`` used to show no text at all."""
    text = _help(capsys, ["decode"])
    for option in ("--batch-size", "--device", "--format", "--limit", "--grid-cols"):
        block = text.split("\n  " + option, 1)[1].split("\n  -", 1)[0]  # its entry under "options:"
        words = [w for w in block.split() if not w.isupper() and not w.startswith("{")]
        assert len(words) >= 3, f"{option} has no help text: {block!r}"


def test_console_script_help_is_plain():
    """The installed entry point, as a user runs it (a real process, the real argparse output)."""
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "tokenize", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--allow-empty" in out.stdout and "``" not in out.stdout


def test_old_entry_point_still_works():
    """``gq_model.cli`` was the command's first home; scripts and installs that name it keep working."""
    import gq_model.cli
    import jobs.cli
    assert gq_model.cli.main is jobs.cli.main and gq_model.cli.plain_text is jobs.cli.plain_text
    out = subprocess.run([sys.executable, "-m", "gq_model.cli", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "tokenize" in out.stdout
