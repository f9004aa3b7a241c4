"""The whole flow on real files: images -> gq_pipeline.tokenize (Ray) -> TokenDataset / gq decode -> same tokens and
images as calling the model directly."""

import numpy as np
import torch
from PIL import Image

from gq_pipeline import preprocess_image, tokenize
from gq_pipeline.dataset import TokenDataset


def _write_images(folder, n=6):
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        yy, xx = np.mgrid[0:48, 0:40]
        arr = np.stack([(xx * (3 + i)) % 256, (yy * (5 + i)) % 256, (xx + yy + 20 * i) % 256], -1).astype(np.uint8)
        arr = np.clip(arr.astype(int) + rng.integers(-10, 10, arr.shape), 0, 255).astype(np.uint8)
        p = folder / f"img{i:02d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return paths


def test_tokenize_then_read_with_token_dataset(tmp_path, ray_cluster, tiny_model, tiny_model_dir):
    paths = _write_images(tmp_path / "images")
    out = tmp_path / "tokens"
    summary = tokenize(tiny_model_dir, str(tmp_path / "images"), str(out), format="both", image_size=32,
                       batch_size=4, unit_size=4, progress=False)
    assert summary["inputs"] == 7 and summary["tokenized"] == 6 and summary["errors"] == 1

    expected = {}
    for p in paths:
        x = preprocess_image(p.read_bytes(), 32)[None]
        expected[p.stem] = tiny_model.tokenize(x)[0]
    for fmt in ("parquet", "webdataset"):
        ds = TokenDataset(str(out), format=fmt, shuffle=False, rank=0, world_size=1)
        got = {}
        for sample in ds:
            stem = next(s for s in expected if s in sample["key"])
            got[stem] = sample["tokens"]
        assert set(got) == set(expected), fmt
        for stem, tokens in got.items():
            assert torch.equal(tokens, expected[stem]), (fmt, stem)
    # the tokens decode to what the model's own detokenize gives
    first = next(iter(TokenDataset(str(out), shuffle=False, rank=0, world_size=1)))
    image = tiny_model.detokenize(first["tokens"][None])
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
