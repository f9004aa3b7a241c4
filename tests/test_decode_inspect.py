"""``gq decode`` and ``gq inspect`` on small shards written with known tokens."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.cli import main
from gq_pipeline.decode_cli import to_uint8
from tests.shard_writer import write_token_output

@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tiny_model):
    return tiny_model_dir, tiny_model


@pytest.fixture(scope="module")
def shards(model_dir, tmp_path_factory):
    _, model = model_dir
    root = str(tmp_path_factory.mktemp("out"))
    expected = write_token_output(root, (4, 3), codebook_fp=model.fingerprint, model_fp=model.model_fingerprint,
                                  errors={"decode": 2, "empty": 1})
    return root, expected


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_decode_equals_detokenize(model_dir, shards, tmp_path, fmt):
    mdir, model = model_dir
    root, expected = shards
    out = str(tmp_path / "png")
    rc = main(["decode", "--model", mdir, "--input", root, "--out", out, "--limit", "5", "--batch-size", "5",
               "--format", fmt])
    assert rc == 0
    keys = sorted(expected)[:5]  # shard name order, then row order
    tokens = torch.stack([torch.from_numpy(expected[k]["tokens"]) for k in keys])
    want = to_uint8(model.detokenize(tokens))
    for k, w in zip(keys, want):
        got = np.asarray(Image.open(os.path.join(out, f"{k}.png")))
        assert got.shape == (32, 32, 3) and np.array_equal(got, w)
    assert len(glob.glob(f"{out}/*.png")) == 6
    grid = np.asarray(Image.open(os.path.join(out, "grid.png")))
    assert grid.shape == (2 + 2 * 34, 2 + 3 * 34, 3)
    assert np.array_equal(grid[2:34, 2:34], want[0])


def test_decode_refuses_other_codebook(model_dir, tmp_path, capsys):
    mdir, _ = model_dir
    root = str(tmp_path / "out")
    write_token_output(root, (2,), codebook_fp="0123456789abcdef")
    assert main(["decode", "--model", mdir, "--input", root, "--out", str(tmp_path / "png")]) == 1
    err = capsys.readouterr().err
    assert "0123456789abcdef" in err and "not the one these shards were made with" in err
    assert not os.path.exists(tmp_path / "png" / "grid.png")


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_inspect_json_counts_errors_and_usage(shards, tmp_path, capsys, fmt):
    root, expected = shards
    plot = str(tmp_path / "usage.png")
    assert main(["inspect", root, "--json", "--plot", plot, "--format", fmt]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["format"], r["shards"], r["samples"]) == (fmt, 2, 7)
    assert r["errors"] == {"total": 3, "by_kind": {"decode": 2, "empty": 1}}
    assert r["manifest"]["inputs"] == 10 and r["problems"] == [] and r["unreadable"] == []
    counts = np.bincount(np.concatenate([e["tokens"].ravel() for e in expected.values()]), minlength=4096)
    p = counts[counts > 0] / counts.sum()
    t = r["token_stats"]
    assert t["tokens"] == 7 * 16 and t["used"] == int((counts > 0).sum()) and t["codebook_size"] == 4096
    assert t["perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    assert t["usage"] == pytest.approx((counts > 0).sum() / 4096)
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_inspect_text_reports_mixed_and_broken_shards(tmp_path, capsys):
    root = str(tmp_path)
    write_token_output(root, (3, 2), formats=("parquet",), codebook_fp="a" * 16)
    write_token_output(root, (2,), formats=("parquet",), codebook_fp="b" * 16, model_fp="2" * 16, unit_offset=9,
                       manifest=False)
    broken = sorted(glob.glob(f"{root}/parquet/*.parquet"))[0]
    with open(broken, "r+b") as f:
        f.truncate(50)
    assert main(["inspect", root]) == 1
    out = capsys.readouterr().out
    assert "UNREADABLE" in out and os.path.basename(broken) in out
    assert "different codebooks" in out and "MIXED" in out


def test_decode_never_writes_outside_out_whatever_the_keys(model_dir, tmp_path):
    """A shard key such as ``../../PWNED_decode`` (a foreign or tampered shard) used to write a PNG outside --out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    mdir, model = model_dir
    root = str(tmp_path / "tokens")
    write_token_output(root, (3,), codebook_fp=model.fingerprint, model_fp=model.model_fingerprint,
                       formats=("parquet",), manifest=False)
    (path,) = glob.glob(os.path.join(root, "parquet", "*.parquet"))
    table = pq.read_table(path)
    keys = ["../../PWNED_decode", "/abs/PWNED", "ok-key"]
    table = table.set_column(table.schema.get_field_index("key"), "key", pa.array(keys, pa.string()))
    pq.write_table(table, path)
    out = tmp_path / "deep" / "png"
    rc = main(["decode", "--model", mdir, "--input", path, "--out", str(out), "--format", "parquet"])
    assert rc == 0
    assert not list(tmp_path.glob("**/PWNED*.png")) or all(out in p.parents for p in tmp_path.glob("**/PWNED*"))
    written = sorted(p.name for p in out.glob("*.png"))
    assert len(written) == 4 and "ok-key.png" in written and "grid.png" in written
    assert not (tmp_path / "PWNED_decode.png").exists() and not os.path.exists("/abs/PWNED.png")


# ----------------------------------------------------------------------------- --crop none outputs, model forms
@pytest.fixture(scope="module")
def crop_none_output(model_dir, tmp_path_factory):
    """A real ``gq tokenize --crop none`` run over images of three sizes: every sample has its own token shape."""
    from tests.helpers import rgb_bytes

    mdir, _ = model_dir
    src = tmp_path_factory.mktemp("mixed_sizes")
    for name, (h, w) in {"wide": (48, 72), "tall": (80, 40), "square": (40, 40), "wide2": (50, 75)}.items():
        (src / f"{name}.png").write_bytes(rgb_bytes(h, w, seed=len(name), fmt="PNG"))
    out = str(tmp_path_factory.mktemp("tok_none"))
    rc = main(["tokenize", "--model", mdir, "--input", str(src), "--output", out, "--image-size", "32",
               "--crop", "none", "--format", "both", "--quiet"])
    assert rc == 0
    return out


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_decode_crop_none_output_groups_shapes_and_letterboxes_the_grid(model_dir, crop_none_output, tmp_path,
                                                                       capsys, fmt):
    """It used to stop with "use batch_size=None" (which the CLI does not offer); with --batch-size 1 the grid
    failed."""
    from gq_pipeline.dataset import TokenDataset

    mdir, model = model_dir
    samples = list(TokenDataset(crop_none_output, format=fmt, shuffle=False))
    shapes = {tuple(s["tokens"].shape) for s in samples}
    assert len(samples) == 4 and len(shapes) == 3  # wide and wide2 share one shape: a batch of two
    out = tmp_path / "png"
    assert main(["decode", "--model", mdir, "--input", crop_none_output, "--out", str(out), "--format", fmt]) == 0
    assert "3 image sizes, letterboxed" in capsys.readouterr().out
    cells = []
    for s in samples:
        got = np.asarray(Image.open(out / f"{s['key']}.png"))
        g, h, w = s["tokens"].shape
        assert got.shape == (h * 8, w * 8, 3)
        want = to_uint8(model.detokenize(s["tokens"][None]))[0]
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # batched vs alone: float order may differ
        cells.append(got)
    assert sorted(p.name for p in out.glob("*.png")) == sorted([f"{s['key']}.png" for s in samples] + ["grid.png"])
    grid = np.asarray(Image.open(out / "grid.png"))
    ch, cw = max(c.shape[0] for c in cells), max(c.shape[1] for c in cells)
    assert grid.shape == (2 + 2 * (ch + 2), 2 + 2 * (cw + 2), 3)  # 4 samples: 2 x 2 equal cells
    for i, img in enumerate(cells):  # each image centred in its cell, black bars around it
        r, c = divmod(i, 2)
        y0, x0 = 2 + r * (ch + 2), 2 + c * (cw + 2)
        cell = grid[y0:y0 + ch, x0:x0 + cw]
        top, left = (ch - img.shape[0]) // 2, (cw - img.shape[1]) // 2
        assert np.array_equal(cell[top:top + img.shape[0], left:left + img.shape[1]], img)
        mask = np.ones(cell.shape[:2], bool)
        mask[top:top + img.shape[0], left:left + img.shape[1]] = False
        assert (cell[mask] == 0).all()


def test_make_grid_of_equal_sizes_has_no_letterbox():
    from gq_pipeline.decode_cli import make_grid

    imgs = [np.full((4, 6, 3), 100 + i, np.uint8) for i in range(3)]
    grid = make_grid(imgs, cols=3, pad=1)
    assert grid.shape == (1 + 5, 1 + 3 * 7, 3)
    assert (grid[1:5, 1:7] == 100).all() and (grid[1:5, 15:21] == 102).all() and (grid[0] == 255).all()


def test_decode_with_a_builtin_model_name(tmp_path):
    """``--model demo``, as ``gq tokenize --model demo`` takes it."""
    from gq_model.loading import load_model

    demo = load_model("demo")
    root = str(tmp_path / "tok")
    expected = write_token_output(root, (2,), codebook_size=demo.config.codebook_size, codebook_fp=demo.fingerprint,
                                  model_fp=demo.model_fingerprint, formats=("parquet",))
    out = tmp_path / "png"
    assert main(["decode", "--model", "demo", "--input", root, "--out", str(out)]) == 0
    for key, row in expected.items():
        want = to_uint8(demo.detokenize(torch.from_numpy(row["tokens"])[None]))[0]
        got = np.asarray(Image.open(out / f"{key}.png"))
        assert got.shape == (32, 32, 3) and np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_decode_with_a_reference_ckpt(tmp_path):
    """A reference-layout Lightning .ckpt with its YAML, as ``gq tokenize --model x.ckpt --config y.yaml`` takes it."""
    from tests.helpers import make_tiny_attn_model
    from tests.model_helpers import SMALL_REFERENCE_YAML, write_lightning_checkpoint

    source = make_tiny_attn_model(seed=9, codebook_size=1024, group=8)
    write_lightning_checkpoint(source, tmp_path / "small.ckpt")
    (tmp_path / "small.yaml").write_text(SMALL_REFERENCE_YAML)
    root = str(tmp_path / "tok")
    expected = write_token_output(root, (3,), token_shape=(2, 4, 4), codebook_size=1024,
                                  codebook_fp=source.fingerprint, formats=("webdataset",))
    out = tmp_path / "png"
    rc = main(["decode", "--model", str(tmp_path / "small.ckpt"), "--config", str(tmp_path / "small.yaml"),
               "--input", root, "--out", str(out), "--batch-size", "2"])
    assert rc == 0
    for key, row in expected.items():
        want = to_uint8(source.detokenize(torch.from_numpy(row["tokens"])[None]))[0]
        got = np.asarray(Image.open(out / f"{key}.png"))
        assert got.shape == (32, 32, 3) and np.abs(got.astype(int) - want.astype(int)).max() <= 1
