"""The launchers the README documents, run for real on this machine (loopback only):

* ``deepspeed --num_gpus 2 --module jobs.train`` (DeepSpeed's own launcher, 2 CPU ranks on gloo);
* ``ray job submit -- python -m jobs.train ... --ray-workers 2`` (Ray Train's TorchTrainer around the same loop) on a
  ``ray start --head`` cluster: it must reproduce the DeepSpeed launcher's losses exactly, because the launchers only
  differ in how ranks start;
* ``ray job submit -- python -m jobs.tokenize ...`` on the same cluster: its shards must be byte-identical to an
  in-process ``gq_pipeline.tokenize`` of the same inputs.

The head is started with its own temp dir and explicit ports, and torn down by killing exactly its processes:
``ray stop`` would also kill the session's in-process Ray (tests/conftest.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from PIL import Image

from jobs.training.engines import free_port
from tests.helpers import read_step_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "train_tiny.yaml")
BIN = os.path.dirname(sys.executable)
TRAIN_ARGS = ["run.max_steps=2", "run.ckpt_every=2", "run.log_every=1", "run.image_every=2", "run.progress=false",
              "deepspeed.zero_stage=2"]

pytestmark = pytest.mark.slow


def _tool(name: str) -> str:
    path = os.path.join(BIN, name)
    found = path if os.path.exists(path) else shutil.which(name)
    assert found, f"the {name!r} command is not installed next to {sys.executable}"
    return found


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", **extra)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "RAY_ADDRESS"):
        env.pop(var, None)
    return env


def _kill_ray_head(temp_dir: str) -> None:
    """SIGKILL the processes of the head started with ``--temp-dir=temp_dir`` and everything they spawned."""
    import psutil

    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    victims = {}
    for p in roots:
        try:
            victims[p.pid] = p
            for c in p.children(recursive=True):
                victims[c.pid] = c
        except psutil.NoSuchProcess:
            continue
    for p in victims.values():
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(victims.values()), timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    """A ``ray start --head`` cluster on 127.0.0.1 (4 logical CPUs); yields its job-submission address."""
    temp_dir = tempfile.mkdtemp(prefix="gqhead", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    dashboard = free_port()
    cmd = [_tool("ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}", "--num-cpus=4",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--ray-client-server-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        _kill_ray_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, *entrypoint: str, timeout: int = 420) -> str:
    """``ray job submit --working-dir REPO -- ENTRYPOINT`` (blocking); returns the job's output."""
    runtime_env = {"env_vars": {"TORCH_EXTENSIONS_DIR": _env()["TORCH_EXTENSIONS_DIR"], "OMP_NUM_THREADS": "1"}}
    cmd = [_tool("ray"), "job", "submit", "--address", address, "--working-dir", REPO,
           "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO, env=_env(RAY_AUTH_MODE="token"), capture_output=True, text=True,
                       timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    assert "succeeded" in out, out[-3000:]
    print(f"ray job submit {' '.join(entrypoint[1:4])}: {time.monotonic() - t0:.1f} s")
    return out


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    """The tiny config, ZeRO-2, 2 ranks started by DeepSpeed's own launcher."""
    out = str(tmp_path_factory.mktemp("ds_launcher") / "run")
    cmd = [_tool("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "jobs.train",
           TINY, f"run.out_dir={out}", *TRAIN_ARGS]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    return out, p.stdout + p.stderr


def test_deepspeed_launcher_runs_two_ranks(deepspeed_run, tmp_path):
    from gq_model import GQModel

    out, log = deepspeed_run
    assert "GQ training: 2 rank(s), ZeRO-2" in log
    assert sorted(read_step_metrics(out)) == [1, 2]
    ckpt = os.path.join(out, "checkpoints", "step_00000002")
    assert sorted(f for f in os.listdir(ckpt) if f.endswith("optim_states.pt")) == \
        ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    model = GQModel.from_pretrained(os.path.join(out, "bundle"))
    import torch

    tokens = model.tokenize(torch.zeros(1, 3, 32, 32))
    assert tokens.shape == (1, 1, 8, 8)


def test_ray_job_submit_train_reproduces_the_deepspeed_launcher(ray_head, deepspeed_run, tmp_path):
    ds_out, _ = deepspeed_run
    out = str(tmp_path / "ray_run")
    log = _submit(ray_head, sys.executable, "-m", "jobs.train", TINY, f"run.out_dir={out}", *TRAIN_ARGS,
                  "--ray-workers", "2")
    assert "GQ training: 2 rank(s), ZeRO-2" in log
    a, b = read_step_metrics(ds_out), read_step_metrics(out)
    assert sorted(a) == sorted(b) == [1, 2]
    for step in (1, 2):
        for key in ("loss_g", "nll", "kl", "g_loss", "d_weight", "loss_d", "lam", "bits_mean"):
            assert b[step][key] == a[step][key], (step, key, a[step][key], b[step][key])
    ckpt = os.path.join(out, "checkpoints", "step_00000002")
    assert len([f for f in os.listdir(ckpt) if f.endswith("optim_states.pt")]) == 2
    assert os.path.exists(os.path.join(out, "bundle", "model.safetensors"))


def _shard_hashes(root: str) -> dict[str, str]:
    hashes = {}
    for sub in ("parquet", "webdataset", ".gq/errors"):
        folder = os.path.join(root, sub)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            with open(os.path.join(folder, name), "rb") as f:
                hashes[f"{sub}/{name}"] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def test_ray_job_submit_tokenize_matches_in_process_run(ray_head, ray_cluster, tiny_model_dir, tmp_path):
    from gq_pipeline import tokenize

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40 + i, 36, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    args = dict(format="both", image_size=32, batch_size=4, unit_size=3)

    local = tmp_path / "in_process" / "tokens"  # the same folder name: the wids index records it
    summary = tokenize(tiny_model_dir, str(images), str(local), progress=False, **args)
    assert (summary["inputs"], summary["tokenized"], summary["errors"]) == (6, 5, 1)

    submitted = tmp_path / "submitted" / "tokens"
    _submit(ray_head, sys.executable, "-m", "jobs.tokenize", "--model", tiny_model_dir, "--input", str(images),
            "--output", str(submitted), "--format", "both", "--image-size", "32", "--batch-size", "4",
            "--unit-size", "3", "--quiet")
    with open(submitted / ".gq" / "manifest.json", encoding="utf-8") as f:
        manifest = json.load(f)
    assert (manifest["inputs"], manifest["tokenized"], manifest["errors"]) == (6, 5, 1)
    remote, ours = _shard_hashes(str(submitted)), _shard_hashes(str(local))
    assert remote == ours and len(ours) >= 5, (sorted(remote), sorted(ours))
