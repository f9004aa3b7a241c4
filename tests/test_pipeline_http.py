"""http(s):// inputs: an image folder (its HTML index page is the listing), a WebDataset tar and a Parquet file served
by a real HTTP server on 127.0.0.1, read by the Ray workers through fsspec's HTTP filesystem."""
from __future__ import annotations

import functools
import http.server
import os
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

import gq_pipeline
from gq_pipeline import preprocess_image
from tests.helpers import make_image_parquet, make_wds_tar, rgb_bytes

SIZE = 32


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture()
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_folder_tar_and_parquet_inputs(ray_cluster, tiny_model, tiny_model_dir, http_root, tmp_path):
    root, url = http_root
    (root / "imgs").mkdir()
    images = {f"im{i}.jpg": rgb_bytes(40 + i, 44, seed=i) for i in range(3)}
    for name, data in images.items():
        (root / "imgs" / name).write_bytes(data)
    (root / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
    tar_samples = [{"__key__": f"{i:03d}", "jpg": rgb_bytes(36, 40, seed=20 + i), "txt": f"t{i}"} for i in range(2)]
    (root / "shard.tar").write_bytes(make_wds_tar(tar_samples))
    (root / "part.parquet").write_bytes(make_image_parquet(2, style="img2dataset", seed=40))

    out = str(tmp_path / "tokens")
    s = gq_pipeline.tokenize(tiny_model_dir, [f"{url}/imgs/", f"{url}/shard.tar", f"{url}/part.parquet"], out,
                             image_size=SIZE, batch_size=4, progress=False)
    assert (s["inputs"], s["tokenized"], s["errors"]) == (8, 7, 1) and s["errors_by_kind"] == {"decode": 1}

    rows = [r for n in os.listdir(os.path.join(out, "parquet"))
            for r in pq.read_table(os.path.join(out, "parquet", n)).to_pylist()]
    by_source = {(r["source"], r["member"]): r for r in rows}
    for name, data in images.items():
        r = by_source[(f"{url}/imgs/{name}", None)]
        want = tiny_model.tokenize(preprocess_image(data, SIZE)[None])[0].numpy().reshape(-1)
        assert np.array_equal(np.array(r["tokens"]), want), name
    r = by_source[(f"{url}/shard.tar", "001")]
    assert r["txt"] == "t1"
    want = tiny_model.tokenize(preprocess_image(tar_samples[1]["jpg"], SIZE)[None])[0].numpy().reshape(-1)
    assert np.array_equal(np.array(r["tokens"]), want)
    assert (f"{url}/part.parquet", "row=1") in by_source
