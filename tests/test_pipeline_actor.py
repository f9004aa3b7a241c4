"""The model actor's failure handling, run in this process (the Ray path of a failing model is in test_pipeline_job):
a batch that raises is retried image by image, so only the images the model cannot take become ``model`` error
records; a model that fails on every image stops the job; set-up errors surface on the first batch."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gq_pipeline import preprocess_image
from gq_pipeline.records import ROW_ERROR, ROW_OK
from gq_pipeline.sources import RawSample
from gq_pipeline.stages import READ_SCHEMA, TokenizerActor, _rows_to_table, _sample_row, model_payload
from tests.conftest import encode_image, rgb_bytes

SIZE = 32
CFG = {"image_size": SIZE, "crop": "center", "max_pixels": 10_000_000, "multiple_of": 8}
BLACK = encode_image(Image.new("RGB", (40, 40)), "PNG")


def _table(images: list[bytes]):
    rows = [_sample_row("u-test", RawSample(idx=i, key=f"k{i}", member=None, source=f"file:///d/{i}.png", data=d), CFG)
            for i, d in enumerate(images)]
    return _rows_to_table(rows, READ_SCHEMA)


def _actor(model, batch_size=4):
    actor = TokenizerActor(model_payload(model), batch_size=batch_size, cpu_threads=1)
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
    out = _actor(tiny_model)(_table(images)).to_pylist()
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
        _actor(tiny_model)(_table([BLACK] * 3))


def test_set_up_errors_surface_on_the_first_batch(tiny_model):
    payload = model_payload(tiny_model)
    payload["model_fingerprint"] = "0" * 16
    actor = TokenizerActor(payload, batch_size=4)  # does not raise: Ray Data would restart a failing constructor
    with pytest.raises(RuntimeError, match="set-up failed.*fingerprint mismatch"):
        actor(_table([rgb_bytes(40, 40)]))
