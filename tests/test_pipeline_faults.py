"""Faults are budgeted, not fatal: a node removed mid-run, a node whose workers cannot start, one bad image, one
failing batch, a failure budget, exit code 3.

The multi-node cases run a real ``ray.cluster_utils.Cluster`` (several raylets on 127.0.0.1) in a subprocess, so
that the session's single-node Ray instance and this one never meet in one process.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import gq_pipeline
from gq_pipeline import preprocess_image
from gq_pipeline.job import JobError
from tests.helpers import encode_image, make_tiny_model, rgb_bytes

SIZE = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLUSTER_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, time, glob
    import ray
    from ray.cluster_utils import Cluster
    import gq_pipeline

    model_dir, src, out, mode = sys.argv[1:5]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": 100 << 20})
    good = cluster.add_node(num_cpus=1, object_store_memory=100 << 20)
    if mode == "bad_node":  # a node with a broken install: every worker started there fails to import gq
        other = cluster.add_node(num_cpus=1, object_store_memory=100 << 20,
                                 env_vars={"PYTHONPATH": os.environ["GQ_BROKEN_SITE"]})
    else:
        other = cluster.add_node(num_cpus=1, object_store_memory=100 << 20)
    ray.init(address=cluster.address, log_to_driver=False)
    result = {}

    def run():
        try:
            result["summary"] = gq_pipeline.tokenize(model_dir, [src], out, image_size=32, unit_size=2, batch_size=4,
                                                     progress=False, model_placement="actors")
        except Exception as e:
            result["error"] = repr(e)

    t = threading.Thread(target=run)
    t.start()
    def worker_alive_on(node):  # the GCS actor table (ray.util.state needs the dashboard, off here)
        return any(a["State"] == "ALIVE" and a["Address"]["NodeID"] == node.node_id
                   and "UnitWorkerActor" in a["ActorClassName"] for a in ray._private.state.actors().values())

    if mode == "remove_node":
        # remove the node once its worker is up and units are being committed, so it dies with work in flight
        deadline = time.time() + 180
        while t.is_alive() and time.time() < deadline and not (
                len(glob.glob(os.path.join(out, ".gq", "units", "*.json"))) >= 3 and worker_alive_on(other)):
            time.sleep(0.02)
        result["committed_at_removal"] = len(glob.glob(os.path.join(out, ".gq", "units", "*.json")))
        cluster.remove_node(other, allow_graceful=False)
    t.join(timeout=300)
    print("RESULT " + json.dumps(result, default=str))
    ray.shutdown()
    cluster.shutdown()
""")


def _folder(tmp_path, n: int) -> tuple[str, list[bytes]]:
    src = tmp_path / "in"
    src.mkdir()
    images = [rgb_bytes(40 + i % 5, 36 + i % 7, seed=i) for i in range(n)]
    for i, data in enumerate(images):
        (src / f"{i:03d}.png").write_bytes(data)
    return str(src), images


def _run_cluster(tmp_path, model_dir: str, src: str, mode: str, env_extra=None) -> dict:
    script = tmp_path / "cluster_run.py"
    script.write_text(CLUSTER_SCRIPT)
    out = str(tmp_path / "out")
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **(env_extra or {}))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(script), model_dir, src, out, mode], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    result["out"] = out
    return result


def _check_exactly_once(out: str, images: list[bytes], model) -> None:
    rows = pq.read_table(sorted(glob.glob(os.path.join(out, "parquet", "*.parquet")))).to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == len(images), (len(keys), len(set(keys)), len(images))
    by_source = {os.path.basename(r["source"]): r for r in rows}
    for i, data in enumerate(images):
        r = by_source[f"{i:03d}.png"]
        want = model.tokenize(preprocess_image(data, SIZE)[None])[0].numpy()
        got = np.asarray(r["tokens"], dtype=np.int64).reshape(r["token_shape"])
        assert np.array_equal(got, want), i
    manifest = json.load(open(os.path.join(out, ".gq", "manifest.json")))
    assert manifest["inputs"] == manifest["tokenized"] == len(images)


@pytest.mark.slow
def test_a_worker_node_removed_mid_run_is_survived_in_the_same_run(tmp_path, tiny_model, tiny_model_dir):
    src, images = _folder(tmp_path, 160)  # 80 units: enough to outlast the second worker's start on 2 cores
    res = _run_cluster(tmp_path, tiny_model_dir, src, "remove_node")
    assert "error" not in res, res
    s = res["summary"]
    assert 3 <= res["committed_at_removal"] < 80, res  # the node really went away mid-run, its worker busy
    assert s["units_failed"] == [] and s["units_committed"] == 80
    assert s["throughput"]["faults"]["workers_lost"] >= 1, s["throughput"]["faults"]
    _check_exactly_once(res["out"], images, tiny_model)


@pytest.mark.slow
def test_a_node_whose_workers_cannot_start_does_not_end_the_job(tmp_path, tiny_model, tiny_model_dir):
    broken = tmp_path / "broken_site" / "gq_pipeline"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this node has a broken gq install')\n")
    src, images = _folder(tmp_path, 12)
    res = _run_cluster(tmp_path, tiny_model_dir, src, "bad_node", {"GQ_BROKEN_SITE": str(broken.parent)})
    assert "error" not in res, res
    assert res["summary"]["units_failed"] == [] and res["summary"]["units_committed"] == 6
    _check_exactly_once(res["out"], images, tiny_model)


# ---------------------------------------------------------------------------------------------- application faults

def _picky(model):
    """The real tiny GQ model, made unable to encode all-black images (as a real model may fail on NaNs or a shape)
    and failing outright on any batch holding an all-white image."""
    encode = model.encode_moments

    def encode_moments(x):
        peak = x.flatten(1).amax(1)
        low = x.flatten(1).amin(1)
        if bool((low >= 1.0).any()):
            raise RuntimeError("this batch breaks the encoder")
        if bool((peak <= -1.0).any()):
            raise ValueError("cannot encode an all-black image")
        return encode(x)

    model.encode_moments = encode_moments
    return model


def _faulty_inputs(tmp_path):
    """folder a: 4 good images and 1 black one (one unit); folder b: 2 good and 1 white (its own unit)."""
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(4):
        (root / "a" / f"{i}.png").write_bytes(rgb_bytes(40, 40, seed=i))
    (root / "a" / "black.png").write_bytes(encode_image(Image.new("RGB", (40, 40)), "PNG"))
    for i in range(2):
        (root / "b" / f"{i}.png").write_bytes(rgb_bytes(40, 40, seed=10 + i))
    (root / "b" / "white.png").write_bytes(encode_image(Image.new("RGB", (40, 40), (255, 255, 255)), "PNG"))
    return str(root)


def test_one_bad_image_is_an_error_record_and_one_failing_unit_is_retried_then_recorded(tmp_path):
    src = _faulty_inputs(tmp_path)
    out = str(tmp_path / "out")
    model = _picky(make_tiny_model())
    s = gq_pipeline.tokenize(model, [src], out, image_size=SIZE, unit_size=10, batch_size=8, progress=False,
                             model_placement="driver")
    # Each bad image is its own model error and its neighbours are tokenized: the black one fails alone, and the
    # batch the white one breaks is retried image by image. Both units commit.
    assert s["units_failed"] == [] and s["units_committed"] == 2
    assert s["tokenized"] == 6 and s["errors_by_kind"] == {"model": 2} and s["inputs"] == 8
    errors = pq.read_table(glob.glob(os.path.join(out, ".gq", "errors", "*.parquet"))).to_pylist()
    messages = {os.path.basename(e["source"]): e["message"] for e in errors}
    assert messages == {"black.png": "ValueError: cannot encode an all-black image",
                        "white.png": "RuntimeError: this batch breaks the encoder"}


def test_a_unit_that_keeps_failing_is_recorded_and_the_job_goes_on_to_exit_3(tmp_path):
    """A unit where the model fails on every image is retried (3 attempts), then recorded as a failed unit with its
    error; the other unit commits; the CLI's exit code for that summary is 3; a rerun retries only the failed unit."""
    from jobs.tokenize import EXIT_UNITS_FAILED

    root = tmp_path / "in"
    (root / "good").mkdir(parents=True)
    (root / "bad").mkdir()
    for i in range(3):
        (root / "good" / f"{i}.png").write_bytes(rgb_bytes(40, 40, seed=i))
        (root / "bad" / f"{i}.png").write_bytes(encode_image(Image.new("RGB", (40, 40), (255, 255, 255)), "PNG"))
    out = str(tmp_path / "out")
    s = gq_pipeline.tokenize(_picky(make_tiny_model()), [str(root)], out, image_size=SIZE, unit_size=10,
                             progress=False, model_placement="driver")
    assert s["units_committed"] == 1 and s["tokenized"] == 3
    (failed,) = s["units_failed"]
    assert failed["source"].endswith("/bad") and failed["attempts"] == 3
    assert "fails on every image of a batch of 3" in failed["reason"]
    assert s["throughput"]["faults"]["retries"] == 2
    assert EXIT_UNITS_FAILED == 3
    manifest = json.load(open(os.path.join(out, ".gq", "manifest.json")))
    assert manifest["failed_units"][0]["unit_id"] == failed["unit_id"]
    again = gq_pipeline.tokenize(make_tiny_model(), [str(root)], out, image_size=SIZE, unit_size=10, progress=False,
                                 model_placement="driver")
    assert again["units_skipped"] == 1 and again["units_committed"] == 1 and again["units_failed"] == []
    assert again["inputs"] == again["tokenized"] == 6


def test_the_failed_unit_budget_stops_a_runaway_job(tmp_path):
    root = tmp_path / "in"
    for d in range(4):
        (root / f"d{d}").mkdir(parents=True)
        (root / f"d{d}" / "w.png").write_bytes(encode_image(Image.new("RGB", (40, 40), (255, 255, 255)), "PNG"))
    out = str(tmp_path / "out")
    with pytest.raises(JobError, match="more than --max-failed-units allows"):
        gq_pipeline.tokenize(_picky(make_tiny_model()), [str(root)], out, image_size=SIZE, progress=False,
                             model_placement="driver", max_failed_units=1, max_attempts=1)
    manifest = json.load(open(os.path.join(out, ".gq", "manifest.json")))
    assert len(manifest["failed_units"]) >= 2 and manifest["inputs"] == 0


@pytest.mark.parametrize("spec,planned,limit", [(None, 10, 10), (None, 1000, 50), ("3", 100, 3), ("0.1", 100, 10),
                                                 ("5%", 200, 10), (0, 5, 0)])
def test_failure_budget_forms(spec, planned, limit):
    from gq_pipeline.scheduler import FailureBudget

    assert FailureBudget(spec, planned).limit == limit
    with pytest.raises(ValueError, match="max-failed-units"):
        FailureBudget("lots", 10)
