"""Crash safety: SIGKILL ``python -m jobs.tokenize`` (its whole process group) at random moments, rerun, and compare
with a clean run: same files with the same bytes, every key exactly once, no partial file ever visible."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

import gq_pipeline
from tests.helpers import rgb_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--image-size", "32", "--unit-size", "2", "--batch-size", "4", "--format", "both"]


def _hashes(root: str) -> dict[str, str]:
    out = {}
    for sub in ("parquet", "webdataset", ".gq/errors", ".gq/units"):
        for p in glob.glob(os.path.join(root, sub, "*")):
            if ".tmp-" not in p:
                out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _count(root: str, sub: str, suffix: str) -> int:
    return len([p for p in glob.glob(os.path.join(root, sub, "*" + suffix)) if ".tmp-" not in p])


@pytest.fixture(scope="module")
def kill_inputs(tmp_path_factory):
    src = tmp_path_factory.mktemp("kill_src")
    for i in range(40):
        (src / f"img_{i:03d}.jpg").write_bytes(rgb_bytes(36 + i % 7, 40, seed=i))
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    return str(src)


@pytest.fixture(scope="module")
def clean_run(ray_cluster, tiny_model_dir, kill_inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clean") / "out")
    s = gq_pipeline.tokenize(tiny_model_dir, [kill_inputs], out, format="both", image_size=32, unit_size=2,
                             batch_size=4, progress=False)
    assert s["units_failed"] == [] and s["inputs"] == 41
    return out, s


# (what to wait for before killing, extra random delay upper bound in seconds)
TRIALS = [(".gq/units", 1, 0.15), ("parquet", 6, 0.3), ("time", None, 9.0)]


@pytest.mark.parametrize("trial", range(len(TRIALS)))
def test_sigkill_then_rerun_equals_clean_run(trial, ray_cluster, tiny_model_dir, kill_inputs, clean_run, tmp_path):
    clean_out, clean_summary = clean_run
    clean = _hashes(clean_out)
    rng = random.Random(1234 + trial)
    out = str(tmp_path / "out")
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "jobs.tokenize", "--model", tiny_model_dir, "--input", kill_inputs, "--output", out,
           "--quiet", *ARGS]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    what, threshold, jitter = TRIALS[trial]
    deadline = time.monotonic() + 120
    if what == "time":
        time.sleep(rng.uniform(3.0, jitter))
    else:
        while proc.poll() is None and time.monotonic() < deadline:
            if _count(out, what, ".json" if what.endswith("units") else ".parquet") >= threshold:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, jitter))
    finished_first = proc.poll() is not None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    if finished_first and proc.returncode != 0:
        pytest.fail(f"the job failed before the kill: {proc.stderr.read().decode()[-3000:]}")
    proc.stderr.close()

    # Right after the kill: every visible shard is complete (identical to the clean run's file of that name) and
    # every committed unit's files exist.
    after_kill = _hashes(out) if os.path.isdir(out) else {}
    for name, digest in after_kill.items():
        assert clean.get(name) == digest, f"{name} is visible but not identical to the clean run's"
    committed = [n for n in after_kill if n.startswith(".gq/units/")]
    for n in committed:
        rec = json.load(open(os.path.join(out, n)))
        for shard in rec["shards"]:
            assert shard["path"] in after_kill

    print(f"trial {trial}: killed with {len(committed)} units committed, {len(after_kill)} files visible, "
          f"job finished first: {finished_first}")
    # Rerun: only unfinished units are processed, and the result equals the clean run.
    s = gq_pipeline.tokenize(tiny_model_dir, [kill_inputs], out, format="both", image_size=32, unit_size=2,
                             batch_size=4, progress=False)
    assert s["units_failed"] == []
    assert s["units_skipped"] == len(committed)
    assert s["units_committed"] == clean_summary["units_planned"] - len(committed)
    assert (s["inputs"], s["tokenized"], s["errors"]) == (41, 40, 1)
    assert _hashes(out) == clean
    assert not glob.glob(os.path.join(out, "*", "*.tmp-*"))
    keys = pq.read_table(sorted(glob.glob(os.path.join(out, "parquet", "*.parquet"))), columns=["key"])
    keys = keys.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 40
