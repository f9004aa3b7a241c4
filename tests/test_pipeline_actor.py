"""The model stage's failure handling, run in this process (the Ray path of a failing model is in test_pipeline_job
and test_pipeline_faults): a batch that runs out of memory is halved and retried; a batch that raises otherwise is
retried image by image, so only the images the model cannot take become ``model`` error records; a model that fails
on every image raises; a weight payload that changed in transit is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gq_pipeline import preprocess_image
from gq_pipeline.records import ROW_ERROR, ROW_OK
from gq_pipeline.preprocess import decode_sample
from gq_pipeline.sources import RawSample
from gq_pipeline.worker import ModelRunner, is_out_of_memory, model_payload
from gq_pipeline.writers import rows_to_table
from tests.helpers import encode_image, rgb_bytes

SIZE = 32
CFG = {"image_size": SIZE, "crop": "center", "max_pixels": 10_000_000, "multiple_of": 8}
BLACK = encode_image(Image.new("RGB", (40, 40)), "PNG")


def _rows(images: list[bytes]):
    return [decode_sample("u-test", RawSample(idx=i, key=f"k{i}", member=None, source=f"file:///d/{i}.png", data=d),
                          CFG) for i, d in enumerate(images)]


def _tokenized(runner, images):
    rows = _rows(images)
    runner.tokenize(rows)
    return rows_to_table(rows).to_pylist()


def _actor(model, batch_size=4):
    actor = ModelRunner.from_payload(model_payload(model), use_gpu=False, cpu_threads=1, batch_size=batch_size)
    encode = actor.model.encode_moments

    def encode_refusing_black(x):  # an input-dependent failure, as a real model might have (NaNs, a shape it rejects)
        if bool((x.flatten(1).amax(1) <= -1.0).any()):
            raise ValueError("cannot encode an all-black image")
        return encode(x)

    actor.model.encode_moments = encode_refusing_black
    return actor


def test_a_batch_that_fails_is_retried_image_by_image(tiny_model):
    images = [rgb_bytes(40, 44, seed=i) for i in range(6)]
    images[2] = images[4] = BLACK
    out = _tokenized(_actor(tiny_model), images)
    assert [r["kind"] for r in out] == [ROW_OK, ROW_OK, ROW_ERROR, ROW_OK, ROW_ERROR, ROW_OK]
    for i in (2, 4):
        assert out[i]["error"] == "model" and out[i]["message"] == "ValueError: cannot encode an all-black image"
        assert out[i]["tokens"] == b""
    for i in (0, 1, 3, 5):
        want = tiny_model.tokenize(preprocess_image(images[i], SIZE)[None])[0].numpy()
        got = np.frombuffer(out[i]["tokens"], np.uint16).reshape(out[i]["tg"], out[i]["th"], out[i]["tw"])
        assert np.array_equal(got, want)


def test_a_model_failing_on_every_image_of_a_batch_raises(tiny_model):
    with pytest.raises(RuntimeError, match="fails on every image of a batch of 3.*all-black"):
        _tokenized(_actor(tiny_model), [BLACK] * 3)


def test_a_changed_weight_payload_is_refused(tiny_model):
    payload = model_payload(tiny_model)
    payload["model_fingerprint"] = "0" * 16
    with pytest.raises(RuntimeError, match="fingerprint mismatch"):
        ModelRunner.from_payload(payload, use_gpu=False, cpu_threads=1, batch_size=4)


def test_out_of_memory_halves_the_batch_and_keeps_every_image(tiny_model):
    """An allocator failure on batches of more than two images: the runner halves its batch until it fits, tokenizes everything with
    the same tokens as a plain run, and keeps the smaller size."""
    images = [rgb_bytes(40, 44, seed=i) for i in range(7)]
    runner = ModelRunner.from_payload(model_payload(tiny_model), use_gpu=False, cpu_threads=1, batch_size=8)
    encode = runner.model.encode_moments

    def encode_small_batches_only(x):
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")  # what torch raises
        return encode(x)

    runner.model.encode_moments = encode_small_batches_only
    out = _tokenized(runner, images)
    assert [r["kind"] for r in out] == [ROW_OK] * 7
    assert runner.batch_size <= 2 and runner.oom_halvings >= 1  # 7 -> 3 -> 1: halved from the size that failed
    for i, r in enumerate(out):
        want = tiny_model.tokenize(preprocess_image(images[i], SIZE)[None])[0].numpy()
        assert np.array_equal(np.frombuffer(r["tokens"], np.uint16).reshape(want.shape), want)



def test_a_real_cpu_allocator_failure_halves_the_batch_too(tiny_model):
    """torch's CPU allocator raises a plain RuntimeError, not torch.OutOfMemoryError: here it really fails (an
    allocation of 2**50 bytes) on batches of more than two images, and the runner halves its batch as it does for a
    device."""
    images = [rgb_bytes(40, 44, seed=i) for i in range(5)]
    runner = ModelRunner.from_payload(model_payload(tiny_model), use_gpu=False, cpu_threads=1, batch_size=8)
    encode = runner.model.encode_moments

    def allocate_too_much_for_big_batches(x):
        if x.shape[0] > 2:
            torch.empty(1 << 50, dtype=torch.uint8)  # raises: no machine has a petabyte
        return encode(x)

    runner.model.encode_moments = allocate_too_much_for_big_batches
    out = _tokenized(runner, images)
    assert [r["kind"] for r in out] == [ROW_OK] * 5
    assert runner.batch_size <= 2 and runner.oom_halvings >= 1
    with pytest.raises(RuntimeError) as e:  # the assumption this relies on: no type of its own
        torch.empty(1 << 50, dtype=torch.uint8)
    assert type(e.value) is RuntimeError and is_out_of_memory(e.value)
    assert not is_out_of_memory(RuntimeError("expected input with 3 channels"))