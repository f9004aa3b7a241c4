"""``TokenizeOptions`` and ``Resources``: one set of defaults for ``gq tokenize`` and ``gq_pipeline.tokenize``, checked
before any model is loaded, and the same run whichever way the settings are given."""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import os

import numpy as np
import pytest
from PIL import Image

import gq_pipeline
from gq_pipeline.options import Resources, TokenizeOptions, defaults, split_keywords
from gq_pipeline.placement import Placement, choose_placement, local_placement, needs_ray
from jobs.tokenize import build_parser, settings

BASE = ["--model", "demo", "--input", "x", "--output", "o"]


def test_cli_defaults_are_the_settings_defaults():
    """No flag given: the command line builds exactly the dataclasses' defaults (stated once, in options.py)."""
    assert settings(build_parser().parse_args(BASE)) == (TokenizeOptions(), Resources())


def test_cli_flags_reach_their_fields():
    args = build_parser().parse_args(BASE + [
        "--format", "both", "--image-size", "64", "--quiet", "--worker-timeout", "5", "--workers", "3",
        "--allow-external-refs", "s3://b/", "--extensions", "ico", "--max-failed-units", "5%",
        "--storage-options", '{"anon": true}', "--model-placement", "actors"])
    opts, res = settings(args)
    assert (opts.format, opts.formats, opts.image_size, opts.progress) == ("both", ("parquet", "webdataset"), 64,
                                                                            False)
    assert opts.allow_external_refs == ("s3://b/",) and opts.extensions == ("ico",)
    assert opts.max_failed_units == "5%" and opts.storage_options == {"anon": True}
    assert (res.worker_timeout_s, res.workers, res.model_placement) == (5.0, 3, "actors")
    assert settings(build_parser().parse_args(BASE + ["--allow-external-refs"]))[0].allow_external_refs == ("*",)


def test_every_field_has_a_default_and_every_setting_is_a_tokenize_keyword():
    import inspect

    names = set(defaults(TokenizeOptions)) | set(defaults(Resources))
    assert all(v is not dataclasses.MISSING for v in {**defaults(TokenizeOptions), **defaults(Resources)}.values())
    params = inspect.signature(gq_pipeline.tokenize).parameters
    assert names | {"model", "inputs", "output", "options", "resources"} == set(params)
    assert params["batch_size"].default == TokenizeOptions().batch_size == 64


@pytest.mark.parametrize("bad, match", [
    ({"format": "tiff"}, "format must be one of"),
    ({"crop": "left"}, "crop must be one of"),
    ({"preprocess": "reference", "crop": "none"}, "only the centre crop"),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"batch_size": 0}, "must be positive"),
    ({"unit_size": -1}, "must be positive"),
    ({"max_failed_units": "many"}, "max-failed-units"),
    ({"storage_options": "endpoint=x"}, "storage_options must be a JSON object"),
    ({"model_placement": "gpu"}, "model placement must be one of"),
])
def test_bad_settings_fail_before_the_model_is_loaded(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):  # a model that does not exist is never looked at
        gq_pipeline.tokenize(str(tmp_path / "no-such-model"), [str(tmp_path)], str(tmp_path / "out"), **bad)


def test_keywords_replace_fields_of_the_objects_given():
    opts, res = split_keywords({"format": "both", "workers": 4}, TokenizeOptions(image_size=64),
                               Resources(min_workers=2))
    assert (opts.format, opts.image_size, res.workers, res.min_workers) == ("both", 64, 4, 2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'image_sise'"):
        split_keywords({"image_sise": 64})
    with pytest.raises(TypeError, match="expected a TokenizeOptions"):
        split_keywords({}, Resources())
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.format = "parquet"


def test_placement_policy_without_a_cluster():
    """Nothing asks for a cluster: the driver placement on this machine, described without Ray."""
    p = local_placement(Resources(decode_threads=3))
    assert (p.model_placement, p.workers, p.decode_threads, p.ray, p.decode_niceness) == ("driver", 1, 3, False, 10)
    assert list(p.as_dict()) == ["cluster_cpus", "cluster_gpus", "nodes", "model_placement", "workers",
                                 "gpus_per_worker", "cpus_per_worker", "decode_threads", "ray"]
    with pytest.raises(ValueError, match="bf16"):
        p.check_precision("bf16")
    for res in (Resources(workers=2), Resources(model_placement="actors"), Resources(cpus_per_worker=1.0),
                Resources(gpus_per_worker=1), Resources(ray_address="127.0.0.1:1")):
        assert needs_ray(res), res
    assert choose_placement("auto", 0.0, 1, None, None) == "driver"
    waiting = Placement(**{**p.as_dict(), "model_placement": "actors", "gpus_per_worker": 1.0})
    assert waiting.describe()[-1].startswith("no GPU node") and waiting.decode_niceness == 0


def _images(folder, n: int = 5) -> None:
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
        with open(os.path.join(folder, f"im{i}.png"), "wb") as f:
            f.write(buf.getvalue())


def _shard_hashes(root: str) -> dict[str, str]:
    return {os.path.relpath(p, root): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for sub in ("parquet", "webdataset") for p in glob.glob(os.path.join(root, sub, "*"))}


def test_options_objects_and_keywords_write_the_same_bytes(tiny_model_dir, tmp_path):
    src = str(tmp_path / "in")
    _images(src)
    a = gq_pipeline.tokenize(tiny_model_dir, src, str(tmp_path / "a"), format="both", image_size=32, unit_size=2,
                             batch_size=3, progress=False, decode_threads=1)
    opts = TokenizeOptions(format="both", image_size=32, unit_size=2, batch_size=3, progress=False)
    b = gq_pipeline.tokenize(tiny_model_dir, [src], str(tmp_path / "b"), options=opts,
                             resources=Resources(decode_threads=1))
    assert a["tokenized"] == b["tokenized"] == 5 and a["units_committed"] == b["units_committed"] == 3
    assert a["throughput"]["resources"]["decode_threads"] == b["throughput"]["resources"]["decode_threads"] == 1
    ha = _shard_hashes(str(tmp_path / "a"))
    assert ha and ha == _shard_hashes(str(tmp_path / "b"))
