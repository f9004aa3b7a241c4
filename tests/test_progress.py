"""The ``gq tokenize`` progress line (gq_pipeline/progress.py): what it counts, how it is written, and a real run."""
from __future__ import annotations

import io
import re

from gq_pipeline.progress import ProgressReporter, format_duration, render
from gq_pipeline.scheduler import RunStats


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _units(*sizes):
    """Planned units as the scheduler gets them: folder units know their files, tar units (None) do not."""
    out = []
    for i, n in enumerate(sizes):
        if n is None:
            out.append({"kind": "tar", "source": f"s3://b/{i}.tar", "files": [], "unit_id": f"u{i}"})
        else:
            out.append({"kind": "files", "source": "/in", "files": [f"{j}.jpg" for j in range(n)], "unit_id": f"u{i}"})
    return out


def _commit(stats, uid, inputs, errors=0):
    """A committed unit's outcome as the worker returns it: ``inputs`` are its rows, image rows plus error rows."""
    stats.committed.append({"unit_id": uid, "status": "committed", "inputs": inputs,
                            "record": {"unit_id": uid, "inputs": inputs, "tokenized": inputs - errors,
                                       "errors": errors}})
    stats.images += inputs


def test_format_duration():
    assert [format_duration(s) for s in (0, 42.4, 185, 7620, None, float("nan"), -1)] == \
        ["0s", "42s", "3m05s", "2h07m", "--", "--", "--"]


def test_counts_rate_eta_and_errors():
    clock = Clock()
    rep = ProgressReporter(_units(100, 200, 41), stream=io.StringIO(), tty=False, every_s=10, clock=clock)
    stats = RunStats()
    _commit(stats, "u0", 100, errors=3)
    clock.t += 20
    snap = rep.snapshot(stats, live=(50, 1))
    assert (snap.images_done, snap.images_total, snap.errors, snap.units_committed) == (150, 341, 4, 1)
    line = render(snap)
    assert line == "150/341 images (44%) | 7.5 img/s | ETA 25s | 4 errors | 1/3 units committed"


def test_no_end_marker_rows_when_all_units_commit():
    """The report: 344 "rows" for 341 inputs in 3 units (one end marker per unit). The count is the inputs."""
    rep = ProgressReporter(_units(100, 200, 41), stream=io.StringIO(), tty=False, clock=Clock())
    stats = RunStats()
    for uid, n in (("u0", 100), ("u1", 200), ("u2", 41)):
        _commit(stats, uid, n)
    line = rep.close(stats)
    assert line.startswith("341/341 images (100%)") and "3/3 units committed" in line and "ETA 0s" in line


def test_unknown_sizes_show_a_lower_bound_then_the_total():
    clock = Clock()
    rep = ProgressReporter(_units(10, None), stream=io.StringIO(), tty=False, clock=clock)
    stats = RunStats()
    _commit(stats, "u0", 10)
    clock.t += 5
    snap = rep.snapshot(stats)
    assert snap.images_total is None and render(snap).startswith("10/10+ images")
    assert "ETA 5s" in render(snap)  # by units: one of two done in 5 s
    _commit(stats, "u1", 25)
    assert render(rep.snapshot(stats)).startswith("35/35 images (100%)")


def test_failed_units_leave_the_total_and_are_named():
    rep = ProgressReporter(_units(10, 20), stream=io.StringIO(), tty=False, clock=Clock())
    stats = RunStats(retries=2)
    _commit(stats, "u0", 10)
    stats.failed.append({"unit_id": "u1", "source": "/in", "reason": "boom", "attempts": 3})
    line = render(rep.snapshot(stats))
    assert line.startswith("10/10 images") and line.endswith("(1 units failed, 2 retried)")


def test_live_counts_never_make_the_line_go_back():
    """A unit's samples move from in flight to committed; a gap between the two must not show as a drop."""
    rep = ProgressReporter(_units(50), stream=io.StringIO(), tty=False, clock=Clock())
    stats = RunStats()
    assert rep.snapshot(stats, live=(30, 0)).images_done == 30
    assert rep.snapshot(stats, live=(0, 0)).images_done == 30


def test_plain_lines_every_n_seconds_when_not_a_tty():
    clock, out = Clock(), io.StringIO()
    rep = ProgressReporter(_units(10), stream=out, tty=False, every_s=10, clock=clock)
    stats = RunStats()
    assert rep.update(stats) is None  # nothing in the first seconds
    clock.t += 10
    assert rep.update(stats, live=(4, 0)).startswith("4/10 images")
    clock.t += 3
    assert rep.update(stats, live=(6, 0)) is None  # throttled
    clock.t += 7
    assert rep.update(stats, live=(8, 1)).startswith("8/10 images")
    _commit(stats, "u0", 10, errors=1)
    rep.close(stats)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and all(l.startswith("[gq tokenize] ") for l in lines) and "\r" not in out.getvalue()
    assert lines[-1].startswith("[gq tokenize] 10/10 images (100%)") and "| 1 error |" in lines[-1]


def test_one_line_rewritten_in_place_on_a_tty():
    clock, out = Clock(), io.StringIO()
    rep = ProgressReporter(_units(10), stream=out, tty=True, every_s=10, tty_every_s=0.5, clock=clock)
    stats = RunStats()
    for i in range(1, 9):
        clock.t += 0.3
        rep.update(stats, live=(i, 0))
    _commit(stats, "u0", 10)
    rep.close(stats)
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1  # one line, ended once
    frames = text.rstrip("\n").split("\r")[1:]
    assert 3 <= len(frames) <= 6  # 8 updates 0.3 s apart, throttled to 0.5 s, plus the final one
    assert all(f.startswith("[gq tokenize] ") and f.endswith("\x1b[K") for f in frames)
    assert frames[-1].startswith("[gq tokenize] 10/10 images (100%)")


def test_disabled_writes_nothing():
    out = io.StringIO()
    rep = ProgressReporter(_units(3), stream=out, enabled=False, clock=Clock())
    assert rep.close(RunStats()) is None and out.getvalue() == ""


# ----------------------------------------------------------------------------------------------- a real run
def test_real_run_progress_lines_count_the_inputs(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """``gq tokenize`` over a folder of 46 images and 2 broken files in 2 units: the lines in between count samples
    of the units in progress, and the last one equals the inputs exactly (no end-marker rows)."""
    from jobs.cli import main
    from tests.helpers import rgb_bytes

    src = tmp_path / "in"
    src.mkdir()
    for i in range(46):
        (src / f"{i:02d}.jpg").write_bytes(rgb_bytes(64 + i, 96, seed=i))
    (src / "broken.jpg").write_bytes(b"not an image")
    (src / "empty.png").write_bytes(b"")
    monkeypatch.setenv("GQ_PROGRESS_INTERVAL", "0.05")
    rc = main(["tokenize", "--model", tiny_model_dir, "--input", str(src), "--output", str(tmp_path / "out"),
               "--image-size", "64", "--batch-size", "2", "--unit-size", "24"])
    assert rc == 0
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if re.match(r"\[gq tokenize\] \d+/\d+\+? images", l)]
    assert lines, err
    counts = [int(re.match(r"\[gq tokenize\] (\d+)/", l).group(1)) for l in lines]
    assert counts == sorted(counts) and all(re.match(r"\[gq tokenize\] \d+/48 images", l) for l in lines)
    print("\n".join(lines))
    assert any(c < 48 for c in counts), "no line while the run was in progress"
    assert lines[-1].startswith("[gq tokenize] 48/48 images (100%)") and "| 2 errors | 2/2 units committed" in lines[-1]
    assert "img/s" in lines[-1] and "ETA" in lines[-1]


def test_ray_run_stderr_is_gq_lines_only(tiny_model_dir, tmp_path):
    """With Ray (actor placement) and no --verbose, stderr holds gq's own lines only: no Ray start-up notices (the
    token-auth WARNING), no worker log lines, no memory hints. A fresh process, so that this run starts its Ray."""
    import os
    import subprocess
    import sys

    from tests.helpers import rgb_bytes

    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.jpg").write_bytes(rgb_bytes(40, 48, seed=i))
    env = dict(os.environ, RAY_ADDRESS="")
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "tokenize", "--model", tiny_model_dir, "--input",
                        str(src), "--output", str(tmp_path / "out"), "--image-size", "32", "--model-placement",
                        "actors", "--num-cpus", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines and all(l.startswith("[gq tokenize] ") for l in lines), r.stderr
    assert lines[-2].startswith("[gq tokenize] 4/4 images (100%)")
