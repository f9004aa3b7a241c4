"""Model specs (gq_model/loading.py): every form ``--model`` takes, and none of them runs code from a model file.

Each form gets a malicious pickle whose ``__reduce__`` writes a marker file: loading refuses it and the marker is
never written; with ``trust_checkpoint`` the legitimate checkpoint still loads. The DeepSpeed checkpoints are real
ones, written by this project's trainer at ZeRO stages 0, 1, 2 and 3 (one process, CPU) and read back without
DeepSpeed's own (unpickling) consolidation. Bundles must record their weights' sha256.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), ".cache", "torch_extensions"))

from gq_model import GQModel  # noqa: E402
from gq_model.bundle import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from gq_model.loading import describe_spec, load_model  # noqa: E402
from tests.helpers import make_tiny_attn_model, make_tiny_model, torchrun  # noqa: E402
from tests.model_helpers import SMALL_REFERENCE_YAML, WritesMarker, same_tokens, write_lightning_checkpoint  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "train_tiny.yaml")


def add_malicious_entry(path: Path, marker: Path) -> None:
    """Rewrite a torch file we wrote ourselves with one more entry holding the malicious object."""
    obj = torch.load(path, map_location="cpu", weights_only=False)  # our own legitimate file
    obj["gq_payload"] = WritesMarker(marker)
    torch.save(obj, path)


# ---------------------------------------------------------------------------------------------- reference .ckpt
@pytest.fixture()
def reference_files(tmp_path):
    yaml_path = tmp_path / "small_gq.yaml"
    yaml_path.write_text(SMALL_REFERENCE_YAML)
    source = make_tiny_model_small()
    write_lightning_checkpoint(source, tmp_path / "small.ckpt")
    return source, tmp_path / "small.ckpt", yaml_path


def make_tiny_model_small(seed: int = 9) -> GQModel:
    return make_tiny_attn_model(seed=seed, codebook_size=1024, group=8)


def test_reference_ckpt_with_malicious_pickle_is_refused(reference_files, tmp_path):
    source, ckpt, yaml_path = reference_files
    marker = tmp_path / "PWNED"
    add_malicious_entry(ckpt, marker)
    with pytest.raises(ValueError, match="weights_only.*(exec|Unsupported global).*--trust-checkpoint"):
        load_model(str(ckpt), config=str(yaml_path))
    assert not marker.exists()
    # the CLI refuses it too, with the same message and no traceback
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "convert", str(ckpt), str(tmp_path / "out"),
                        "--config", str(yaml_path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and "--trust-checkpoint" in r.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
    # trusted on purpose: the checkpoint loads (and, being trusted, its code ran)
    model = load_model(str(ckpt), config=str(yaml_path), trust_checkpoint=True)
    assert marker.exists() and same_tokens(model, source)


def test_reference_ckpt_over_http_is_read_weights_only(reference_files, tmp_path):
    source, ckpt, yaml_path = reference_files
    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(ckpt, served / "good.ckpt")
    shutil.copy(ckpt, served / "evil.ckpt")
    marker = tmp_path / "PWNED"
    add_malicious_entry(served / "evil.ckpt", marker)
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert same_tokens(load_model(f"{base}/good.ckpt", config=str(yaml_path)), source)
        with pytest.raises(ValueError, match="trust_checkpoint"):
            load_model(f"{base}/evil.ckpt", config=str(yaml_path))
        assert not marker.exists()
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_reference_ckpt_needs_an_architecture(reference_files):
    _, ckpt, yaml_path = reference_files
    with pytest.raises(ValueError, match="--config or a built-in --preset"):
        load_model(str(ckpt))
    with pytest.raises(ValueError, match="not both"):
        load_model(str(ckpt), config=str(yaml_path), preset="sd3unet_gq_0.25")


# ---------------------------------------------------------------------------------------------- bundles, built-ins
def test_bundle_dir_is_never_unpickled(tmp_path):
    """A bundle is safetensors only: a pickle in its place, or a DeepSpeed 'latest' beside it, runs nothing."""
    marker = tmp_path / "PWNED"
    source = make_tiny_model()
    bundle = tmp_path / "bundle"
    source.save_pretrained(bundle)
    # a 'latest' file and a malicious model-states file next to config.json: still read as the bundle it is
    (bundle / "latest").write_text("step_1")
    (bundle / "step_1").mkdir()
    torch.save({"module": {}, "evil": WritesMarker(marker)}, bundle / "step_1" / "mp_rank_00_model_states.pt")
    assert describe_spec(str(bundle)) == "bundle"
    assert same_tokens(load_model(str(bundle)), source)
    # the weights file swapped for a pickle: refused by its hash, never unpickled
    torch.save({"evil": WritesMarker(marker)}, bundle / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="sha256"):
        load_model(str(bundle))
    with pytest.raises(ValueError, match="sha256"):
        load_model(str(bundle), trust_checkpoint=True)
    assert not marker.exists()


def test_bundle_without_weights_hash_is_refused_with_the_way_out(tmp_path):
    source = make_tiny_model(seed=3)
    old = tmp_path / "old_bundle"
    source.save_pretrained(old)
    meta = json.loads((old / CONFIG_NAME).read_text())
    del meta["weights_sha256"]  # what bundles from before the hash look like
    (old / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no weights_sha256.*trust_unhashed=True.*save_pretrained"):
        GQModel.from_pretrained(old)
    with pytest.raises(ValueError, match="no weights_sha256"):
        load_model(str(old))
    # the way out the message gives: load it once on purpose and re-save it
    resaved = tmp_path / "resaved"
    GQModel.from_pretrained(old, trust_unhashed=True).save_pretrained(resaved)
    assert json.loads((resaved / CONFIG_NAME).read_text())["weights_sha256"]
    assert same_tokens(load_model(str(resaved)), source)


def test_tampered_bundle_weights_are_refused(tmp_path):
    """Weights edited in place (valid safetensors, same size) no longer match the recorded hash."""
    from safetensors.torch import load_file, save_file

    source = make_tiny_model(seed=4)
    bundle = tmp_path / "b"
    source.save_pretrained(bundle)
    tensors = load_file(bundle / WEIGHTS_NAME)
    name = next(k for k in tensors if k.startswith("decoder."))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, bundle / WEIGHTS_NAME, metadata={"format": "gq-bundle"})
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_model(str(bundle))


def test_builtin_demo_carries_its_hash_and_loads():
    import hashlib
    from importlib import resources

    root = resources.files("gq_model") / "builtin" / "demo"
    meta = json.loads((root / CONFIG_NAME).read_text())
    assert meta["weights_sha256"] == hashlib.sha256((root / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert describe_spec("demo") == "builtin"
    model = load_model("demo")
    assert model.fingerprint == meta["codebook_fingerprint"]
    with pytest.raises(ValueError, match="records its own architecture"):
        load_model("demo", preset="sd3unet_gq_0.25")


def test_a_local_folder_shadowing_a_builtin_name_is_not_trusted(tmp_path, monkeypatch):
    """``--model demo`` with a folder named ``demo`` in the working directory reads that folder, weights_only."""
    marker = tmp_path / "PWNED"
    fake = tmp_path / "demo"
    (fake / "step_1").mkdir(parents=True)
    (fake / "latest").write_text("step_1")
    (fake / "gq_config.json").write_text(json.dumps(make_tiny_model().config.to_dict()))
    torch.save({"module": {}, "evil": WritesMarker(marker)}, fake / "step_1" / "mp_rank_00_model_states.pt")
    monkeypatch.chdir(tmp_path)
    assert describe_spec("demo") == "deepspeed"
    with pytest.raises(ValueError, match="trust_checkpoint"):
        load_model("demo")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- DeepSpeed
def _train_checkpoint(out: Path, stage: int, precision: str) -> Path:
    from jobs.training.loop import train

    rng = np.random.default_rng(stage)
    imgs = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(5)]
    overrides = [f"run.out_dir={out}", "run.max_steps=1", "run.ckpt_every=1", "run.image_every=0",
                 "run.progress=false", "run.threads=1", f"deepspeed.zero_stage={stage}",
                 f"deepspeed.precision={precision}", "data.holdout=1", "data.repeat=1", "data.batch_size=2",
                 "loss.disc.enabled=false"]
    if stage == 3:  # partition even the tiny parameters (the zero_optimization override keeps stage 3 too)
        overrides += ["deepspeed.config.zero_optimization.stage=3",
                      "deepspeed.config.zero_optimization.stage3_param_persistence_threshold=0"]
    train(TINY, overrides, train_images=imgs)
    return out


STAGES = [(0, "fp32"), (1, "bf16"), (2, "fp32"), (3, "bf16")]


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory):
    """One real training run per ZeRO stage (one step, one checkpoint, the bundle the run exported itself)."""
    root = tmp_path_factory.mktemp("ds_runs")
    return {stage: _train_checkpoint(root / f"z{stage}_{prec}", stage, prec) for stage, prec in STAGES}


def _tag_dir(run: Path) -> Path:
    ckpt = run / "checkpoints"
    return ckpt / (ckpt / "latest").read_text().strip()


@pytest.mark.parametrize("stage", [s for s, _ in STAGES])
def test_deepspeed_checkpoint_loads_weights_only_at_every_zero_stage(ds_runs, stage):
    run = ds_runs[stage]
    tag = _tag_dir(run)
    names = sorted(os.listdir(tag))
    if stage == 0:
        assert "mp_rank_00_model_states.pt" in names and not any("optim_states" in n for n in names)
    else:
        assert any(n.endswith("zero_pp_rank_0_mp_rank_00_optim_states.pt") for n in names), names
    if stage == 3:  # really partitioned: ZeRO-3 names its model states per rank
        assert "zero_pp_rank_0_mp_rank_00_model_states.pt" in names
        # deepspeed.config reaches DeepSpeed as plain containers (engines.ds_config), so nothing of OmegaConf is
        # pickled any more; checkpoints of earlier gq versions that hold OmegaConf nodes load through the stand-ins
        # (test_old_checkpoints_with_omegaconf_nodes_load_weights_only)
        found = torch.serialization.get_unsafe_globals_in_checkpoint(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        assert not any(g.startswith("omegaconf") for g in found), found
    own_bundle = GQModel.from_pretrained(run / "bundle")
    for spec in (run, run / "checkpoints", tag):  # run dir, checkpoints dir, tag dir
        assert describe_spec(str(spec)) == "deepspeed"
        model = load_model(str(spec))
        for k, v in own_bundle.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
    assert same_tokens(model, own_bundle)


@pytest.mark.parametrize("stage", [s for s, _ in STAGES])
def test_deepspeed_checkpoint_with_malicious_pickle_is_refused(ds_runs, stage, tmp_path):
    """The malicious object in the model states, then in the ZeRO optimizer shard: refused each time."""
    marker = tmp_path / "PWNED"
    clean = GQModel.from_pretrained(ds_runs[stage] / "bundle")
    tag = _tag_dir(ds_runs[stage])
    files = sorted(n for n in os.listdir(tag) if n.endswith("_states.pt"))
    for name in files:
        run = tmp_path / f"run_{name}"
        shutil.copytree(ds_runs[stage] / "checkpoints", run / "checkpoints")
        add_malicious_entry(_tag_dir(run) / name, marker)
        with pytest.raises(ValueError, match="weights_only.*trust_checkpoint"):
            load_model(str(run))
        assert not marker.exists(), name
        # gq export refuses it as well, and says how to override
        r = subprocess.run([sys.executable, "-m", "jobs.export", str(run), str(tmp_path / "out")],
                           capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
        assert r.returncode != 0 and "trust" in r.stderr and not marker.exists()
        trusted = load_model(str(run), trust_checkpoint=True)
        assert marker.exists() and same_tokens(trusted, clean)
        marker.unlink()


def test_deepspeed_latest_cannot_point_outside_the_checkpoint(ds_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ds_runs[0] / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "latest").write_text("../../elsewhere")
    with pytest.raises(ValueError, match="not a folder name inside the checkpoint"):
        load_model(str(run))


def test_deepspeed_checkpoint_with_a_missing_rank_shard_is_refused(ds_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ds_runs[2] / "checkpoints", run / "checkpoints")
    tag = _tag_dir(run)
    shard = next(n for n in os.listdir(tag) if n.endswith("optim_states.pt"))
    # a second rank's shard name with nothing behind the first: the shard count no longer matches the run's ranks
    shutil.copy(tag / shard, tag / shard.replace("zero_pp_rank_0", "zero_pp_rank_1"))
    with pytest.raises(ValueError, match="1 ranks but 2 optimizer shards"):
        load_model(str(run))


def test_unknown_directory_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a GQ bundle"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model(str(tmp_path / "nowhere" / "x"))
    with pytest.raises(ValueError, match="memory://"):
        load_model("memory://x")


def test_pipeline_loader_is_the_same_function():
    from gq_pipeline import job

    assert job.load_model is load_model


@pytest.mark.slow
def test_two_rank_zero3_checkpoint_reads_like_deepspeeds_own_consolidation(tmp_path):
    """Two ranks (torchrun, gloo on 127.0.0.1), ZeRO-3 with every parameter partitioned, odd sizes padded: the
    weights_only reader gives exactly what DeepSpeed's (unpickling) zero_to_fp32 gives, and the run's own bundle."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from gq_model.zero_checkpoint import read_generator_state_dict, resolve_checkpoint

    run = tmp_path / "z3x2"
    torchrun(str(run), "run.max_steps=1", "run.ckpt_every=1", "deepspeed.zero_stage=3",
             "deepspeed.config.zero_optimization.stage=3",
             "deepspeed.config.zero_optimization.stage3_param_persistence_threshold=0", "loss.disc.enabled=false")
    root, tag = resolve_checkpoint(str(run))
    names = sorted(os.listdir(os.path.join(root, tag)))
    assert [n for n in names if n.startswith("zero_pp_rank_")] == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    mine = read_generator_state_dict(root, tag)
    assert any(v.numel() % 2 for v in mine.values())  # some parameter was padded to split over two ranks
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)  # our own fresh run: trusted here
    assert set(mine) == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(mine[k], v.float()), k
    assert same_tokens(load_model(str(run)), GQModel.from_pretrained(run / "bundle"))


def test_old_checkpoints_with_omegaconf_nodes_load_weights_only(tmp_path):
    """Before engines.ds_config merged plain containers, DeepSpeed pickled the OmegaConf nodes of deepspeed.config
    into its model-states files: those files still load without --trust-checkpoint, and no OmegaConf code runs."""
    from omegaconf import OmegaConf

    from gq_model.safe_load import load_torch_file

    path = tmp_path / "mp_rank_00_model_states.pt"
    cfg = OmegaConf.create({"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    torch.save({"module": {"w": torch.ones(2)}, "ds_config": cfg, "nested": cfg.zero_optimization}, path)
    found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    assert any(g.startswith("omegaconf") for g in found)
    got = load_torch_file(str(path))
    assert torch.equal(got["module"]["w"], torch.ones(2))
