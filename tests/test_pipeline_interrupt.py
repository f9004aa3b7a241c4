"""Ctrl-C and SIGTERM stop a real ``gq tokenize`` run within seconds with one line saying what was committed, exit
130, and leave an output the same command resumes to exactly once; a second signal exits at once."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tests.helpers import rgb_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_IMAGES = 240


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    src = tmp_path_factory.mktemp("interrupt_in")
    for i in range(N_IMAGES):
        (src / f"{i:04d}.png").write_bytes(rgb_bytes(120, 100, seed=i))
    return str(src)


def _start(model_dir: str, src: str, out: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "jobs.tokenize", "--model", model_dir, "--input", src, "--output", out,
           "--image-size", "96", "--unit-size", "4", "--batch-size", "4"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_commits(out: str, proc: subprocess.Popen, n: int = 2, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while len(glob.glob(os.path.join(out, ".gq", "units", "*.json"))) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run committed nothing in time"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_one_signal_stops_cleanly_and_a_rerun_resumes(tiny_model_dir, many_images, tmp_path, sig):
    out = str(tmp_path / "out")
    proc = _start(tiny_model_dir, many_images, out)
    _wait_for_commits(out, proc)
    t0 = time.time()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    stopped_in = time.time() - t0
    assert proc.returncode == 130, stderr[-3000:]
    assert stopped_in < 20, stopped_in
    assert "Traceback" not in stderr, stderr[-3000:]
    line = [ln for ln in stderr.splitlines() if "interrupted" in ln]
    assert len(line) == 1 and "units committed" in line[0] and "rerun the same command" in line[0], stderr[-2000:]
    committed = len(glob.glob(os.path.join(out, ".gq", "units", "*.json")))
    assert 2 <= committed < N_IMAGES // 4
    rerun = subprocess.run([sys.executable, "-m", "jobs.tokenize", "--model", tiny_model_dir, "--input",
                            many_images, "--output", out, "--image-size", "96", "--unit-size", "4", "--quiet"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    keys = pq.read_table(glob.glob(os.path.join(out, "parquet", "*.parquet")), columns=["key"]).column("key")
    assert len(keys) == N_IMAGES and len(set(keys.to_pylist())) == N_IMAGES


def test_a_second_signal_exits_at_once(tiny_model_dir, many_images, tmp_path):
    out = str(tmp_path / "out")
    proc = _start(tiny_model_dir, many_images, out)
    _wait_for_commits(out, proc, n=1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode in (130, -signal.SIGINT)
