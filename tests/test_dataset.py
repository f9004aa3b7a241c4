"""TokenDataset: exactly-once over ranks x workers, deterministic shuffles, exact resume, validation, S3."""
from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gq_pipeline.dataset import EpochOrder, TokenDataset, TokenLoader
from gq_pipeline.shards import FingerprintMismatchError, ShardError, list_shards
from tests.shard_writer import make_bucket, write_token_output

SIZES = (5, 3, 7, 1, 4)  # 20 samples in unequal shards (not divisible by 2 ranks x 2 workers x batch 3)
FORMATS = ["parquet", "webdataset"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tokens"))
    expected = write_token_output(root, SIZES, row_group_size=2, latents=True)
    return root, expected


def keys(items):
    return [k for it in items for k in (it["key"] if isinstance(it["key"], list) else [it["key"]])]


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_ranks_two_workers_read_every_sample_once(out, fmt):
    root, expected = out
    seen = []
    for rank in range(2):
        ds = TokenDataset(root, format=fmt, rank=rank, world_size=2, seed=3, buffer_size=4)
        loader = DataLoader(ds, batch_size=2, num_workers=2)
        for batch in loader:
            assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape[1:] == (1, 4, 4)
            for k, t in zip(batch["key"], batch["tokens"]):
                assert np.array_equal(t.numpy(), expected[k]["tokens"])
            seen += batch["key"]
    assert sorted(seen) == sorted(expected)  # no duplicates, no gaps


@pytest.mark.parametrize("mode", ["drop_last", "pad"])
def test_equal_rank_counts_for_ddp(out, mode):
    root, expected = out
    per_rank = []
    for rank in range(3):  # 20 samples over 3 ranks
        ds = TokenDataset(root, rank=rank, world_size=3, batch_size=2, **{mode: True})
        per_rank.append(keys(TokenLoader(ds, num_workers=2)))
        assert len(TokenLoader(ds, num_workers=2)) == ds.num_batches(2)
    assert len({len(k) for k in per_rank}) == 1
    flat = [k for ks in per_rank for k in ks]
    if mode == "drop_last":
        assert len(flat) == 18 and len(set(flat)) == 18
    else:
        assert len(flat) == 21 and set(flat) == set(expected)


def test_uneven_split_warns_under_ddp(out):
    with pytest.warns(UserWarning, match="drop_last=True or pad=True"):
        TokenDataset(out[0], rank=0, world_size=3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_shuffle_is_deterministic_per_seed_and_epoch(out, fmt):
    root, expected = out
    order = lambda **kw: keys(TokenDataset(root, format=fmt, buffer_size=8, **kw))  # noqa: E731
    a = order(seed=0)
    assert a == order(seed=0) and sorted(a) == sorted(expected)
    assert a != order(seed=1)
    ds = TokenDataset(root, format=fmt, buffer_size=8, seed=0)
    ds.set_epoch(1)
    assert keys(ds) != a and sorted(keys(ds)) == sorted(a)
    assert keys(TokenDataset(root, format=fmt, shuffle=False)) == sorted(expected)  # name order, then row order


@pytest.mark.filterwarnings("ignore:.*do not split evenly", "ignore:This DataLoader will create")
@pytest.mark.parametrize("fmt,workers,rank,world", [("parquet", 0, 0, 1), ("parquet", 2, 0, 1), ("parquet", 3, 0, 1),
                                                    ("webdataset", 2, 0, 1), ("webdataset", 3, 1, 3)])
def test_resume_after_every_number_of_batches_is_exact(out, fmt, workers, rank, world):
    """Stop after 1..9 batches (odd counts too: a resumed DataLoader starts again at worker 0) and resume: exactly
    the batches the uninterrupted run would have produced next, through the end of the next epoch."""
    root, _ = out
    make = lambda: TokenDataset(root, format=fmt, seed=5, shuffle_window=6, batch_size=2,  # noqa: E731
                                rank=rank, world_size=world)
    ds = make()
    full = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        full.append([b["key"] for b in TokenLoader(ds, num_workers=workers)])
    n0 = len(full[0])
    assert n0 == ds.num_batches()
    if world == 1:
        assert sorted(k for b in full[0] for k in b) == sorted(k for b in full[1] for k in b)
    for stop in range(1, min(10, n0 + 1)):
        ds = make()
        loader = TokenLoader(ds, num_workers=workers)
        part = []
        for batch in loader:
            part.append(batch["key"])
            if len(part) == stop:
                state = json.loads(json.dumps(loader.state_dict()))  # JSON-serializable
                break
        ds = make()
        loader = TokenLoader(ds, num_workers=workers)
        loader.load_state_dict(state)
        for epoch in range(ds.epoch, 2):
            ds.set_epoch(epoch)
            part += [b["key"] for b in loader]
        assert part == full[0] + full[1], f"stop after {stop} batches"


def test_resume_with_another_worker_count_and_settings_checks(out):
    root, _ = out
    ds = TokenDataset(root, batch_size=3)
    whole = keys(TokenLoader(ds, num_workers=0))
    loader = TokenLoader(ds, num_workers=2)
    it = iter(loader)
    got = keys([next(it)])
    state = loader.state_dict()
    del it
    assert state["epoch"] == 0 and state["position"] == 3
    other = TokenDataset(root, batch_size=3)
    other.load_state_dict(state)
    assert got + keys(TokenLoader(other, num_workers=3)) == whole  # the order does not depend on workers
    other = TokenDataset(root, batch_size=5)  # nor on the batch size: the state is a position
    other.load_state_dict(state)
    assert got + keys(TokenLoader(other, num_workers=2)) == whole
    with pytest.raises(ValueError, match="seed was 0, now 1"):
        TokenDataset(root, batch_size=3, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="version 1 states"):
        TokenDataset(root).load_state_dict(dict(state, version=1))
    done = dict(state, position=20)
    ds.load_state_dict(done)
    assert ds.epoch == 1 and ds.state_dict()["position"] == 0
    with pytest.raises(TypeError, match="batching"):
        TokenLoader(ds, batch_size=4)
    with pytest.raises(ValueError, match="persistent_workers"):
        TokenLoader(ds, num_workers=1, persistent_workers=True)


def test_epoch_order_is_a_permutation_mixing_blocks(out):
    ds = TokenDataset(out[0], shuffle_window=6)
    order = ds.order(0)
    q = np.arange(order.n)
    src = order.source_index(q)
    assert sorted(src.tolist()) == list(range(20)) and src.tolist() != list(range(20))
    assert all(int(order.window_starts[k + 1] - order.window_starts[k]) >= 6
               for k in range(len(order.window_starts) - 2))  # every window but the last holds >= 6 samples
    assert ds.order(1).source_index(q).tolist() != src.tolist()
    same = EpochOrder(ds.shards, 0, 0, True, 6)
    assert same.source_index(q).tolist() == src.tolist()  # a pure function of (shards, seed, epoch, window)


def test_fields_latents_and_flatten(out):
    root, expected = out
    for fmt in FORMATS:
        s = next(iter(TokenDataset(root, format=fmt, shuffle=False, latents=True, flatten=True)))
        e = expected[s["key"]]
        assert s["tokens"].shape == (16,) and s["latent"].dtype == torch.float32 and s["latent"].shape == (16, 4, 4)
        assert np.array_equal(s["latent"].numpy(), e["latent"].astype(np.float32))
        assert (s["source"], s["width"], s["height"], s["txt"], s["cls"]) == \
               (e["source"], e["width"], e["height"], e["txt"], e["cls"])
        assert s["member"] == (e["member"] or "")


def test_mixed_fingerprints_are_refused(tmp_path):
    write_token_output(str(tmp_path), (3, 2), codebook_fp="a" * 16, model_fp="1" * 16)
    write_token_output(str(tmp_path), (2,), codebook_fp="b" * 16, model_fp="2" * 16, unit_offset=10)
    with pytest.raises(FingerprintMismatchError, match="2 different codebooks.*aaaa.*bbbb"):
        TokenDataset(str(tmp_path), format="parquet")
    with pytest.raises(FingerprintMismatchError, match="different codebooks"):  # via the Parquet siblings
        TokenDataset(str(tmp_path), format="webdataset")
    wds_only = tmp_path / "wds"
    write_token_output(str(wds_only), (3,), formats=("webdataset",), model_fp="1" * 16)
    write_token_output(str(wds_only), (2,), formats=("webdataset",), model_fp="2" * 16, unit_offset=10)
    with pytest.raises(FingerprintMismatchError, match="cannot prove"):
        TokenDataset(str(wds_only))


@pytest.mark.parametrize("size,dtype", [(65536, "uint16"), (100000, "int32")])
def test_large_token_ids_read_back_unsigned(tmp_path, size, dtype):
    high = lambda rng, shape, k, i: rng.integers(k - 40000, k, size=shape)  # noqa: E731
    expected = write_token_output(str(tmp_path), (4, 3), codebook_size=size, tokens_fn=high)
    assert list_shards(str(tmp_path)).shards[0].columns  # sanity
    import pyarrow.parquet as pq
    col_type = pq.read_schema(glob.glob(f"{tmp_path}/parquet/*.parquet")[0]).field("tokens").type.value_type
    assert str(col_type) == dtype
    for fmt in FORMATS:
        got = list(TokenDataset(str(tmp_path), format=fmt, shuffle=False))
        assert len(got) == 7
        for s in got:
            assert s["tokens"].dtype == torch.int64 and int(s["tokens"].min()) >= size - 40000
            assert np.array_equal(s["tokens"].numpy(), expected[s["key"]]["tokens"])
    assert max(int(s["tokens"].max()) for s in got) > 32767


def test_corrupted_and_truncated_shards_name_the_file(tmp_path):
    root = str(tmp_path)
    write_token_output(root, (40, 30), row_group_size=10)
    pq_file = sorted(glob.glob(f"{root}/parquet/*.parquet"))[0]
    tar_file = sorted(glob.glob(f"{root}/webdataset/*.tar"))[0]
    data = open(pq_file, "rb").read()
    open(pq_file, "wb").write(data[: len(data) // 2])  # truncated: no footer
    with pytest.raises(ShardError, match=f"{os.path.basename(pq_file)}.*truncated or corrupted"):
        TokenDataset(root, format="parquet")
    open(pq_file, "wb").write(data[:100] + bytes(300) + data[400:])  # damaged page inside row group 0
    with pytest.raises(ShardError, match=f"{os.path.basename(pq_file)} \\(row group 0\\)"):
        list(TokenDataset(root, format="parquet", shuffle=False))
    data = open(tar_file, "rb").read()
    open(tar_file, "wb").write(data[: len(data) // 2])
    with pytest.raises(ShardError, match=f"{os.path.basename(tar_file)}.*(truncated|corrupted)"):
        list(TokenDataset(root, format="webdataset", shuffle=False))
    block = len(data) // 2 // 512 * 512  # cut on a tar block boundary: tarfile sees a clean end of archive
    open(tar_file, "wb").write(data[:block - 512 * 8])
    with pytest.raises(ShardError, match=f"{os.path.basename(tar_file)}.*(truncated|corrupted)"):
        list(TokenDataset(root, format="webdataset", shuffle=False))


def test_temporaries_are_not_listed(tmp_path):
    root = str(tmp_path)
    write_token_output(root, (2, 2), formats=("parquet",))
    real = sorted(glob.glob(f"{root}/parquet/*.parquet"))[0]
    shutil.copy(real, real + ".tmp-123")
    shutil.copy(real, f"{root}/parquet/x.tmp1.parquet")
    assert len(list_shards(root).shards) == 2
    assert len(list(TokenDataset(os.path.join(root, "parquet", "*.parquet")))) == 4


@pytest.mark.parametrize("fmt", FORMATS)
def test_s3_with_workers(moto_s3, fmt):
    bucket = f"tokens-{fmt}"
    make_bucket(moto_s3, bucket)
    expected = write_token_output(f"s3://{bucket}/run", SIZES, row_group_size=3, storage_options=moto_s3)
    ds = TokenDataset(f"s3://{bucket}/run", format=fmt, storage_options=moto_s3, batch_size=4, seed=1)
    assert ds.fingerprint == "80f16be97539daa4"
    got = keys(TokenLoader(ds, num_workers=2))  # forked workers must not reuse the parent's s3fs event loop
    assert sorted(got) == sorted(expected)

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_ar.py")


def _run(cmd, **env):
    import subprocess
    import sys

    full_env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", **env)
    proc = subprocess.run([sys.executable, *cmd] if cmd[0].endswith(".py") else cmd, capture_output=True, text=True,
                          timeout=120, env=full_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    from tests.shard_writer import counting_tokens

    root = str(tmp_path_factory.mktemp("learnable"))
    write_token_output(root, (20, 13, 7), tokens_fn=counting_tokens, formats=("parquet",))
    return root


def test_train_ar_loss_falls_and_resumes(learnable, tmp_path):
    ckpt = str(tmp_path / "ck.pt")
    first = _run([EXAMPLE, "--shards", learnable, "--steps", "12", "--batch-size", "8", "--checkpoint", ckpt])
    assert first["steps"] == 12 and first["last_loss"] < 0.5 * first["first_loss"]
    resumed = _run([EXAMPLE, "--shards", learnable, "--steps", "15", "--batch-size", "8", "--checkpoint", ckpt,
                    "--resume", "--num-workers", "0"])
    assert resumed["steps"] == 15 and resumed["last_loss"] < first["first_loss"]


def test_train_ar_under_torchrun_ddp(learnable):
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = _run([torchrun, "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
                EXAMPLE, "--shards", learnable, "--steps", "10", "--batch-size", "4"])
    assert out["steps"] == 10 and out["last_loss"] < out["first_loss"]


@pytest.fixture(scope="module")
def learnable_b(tmp_path_factory):
    from tests.shard_writer import counting_tokens

    root = str(tmp_path_factory.mktemp("learnable_b"))
    write_token_output(root, (18, 12), tokens_fn=counting_tokens, formats=("parquet",), unit_offset=40, seed=1)
    return root


def test_train_ar_mixture_on_two_ranks_resumes_on_one(learnable, learnable_b, tmp_path):
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ckpt = str(tmp_path / "mix.pt")
    mix = ["--shards", learnable, learnable_b, "--weights", "0.7", "0.3", "--batch-size", "4", "--checkpoint", ckpt]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    first = _run([torchrun, "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
                  EXAMPLE, *mix, "--steps", "6"])
    # mixture epoch: min(40 / 0.7, 30 / 0.3) = 57 samples; 6 steps x 2 ranks x 4 = position 48
    assert (first["steps"], first["world_size"], first["epoch"], first["position"]) == (6, 2, 0, 48)
    resumed = _run([EXAMPLE, *mix, "--steps", "10", "--resume", "--num-workers", "2"])
    # one rank: 9 samples end epoch 0 (batches 4, 4, 1), then one batch of epoch 1
    assert (resumed["steps"], resumed["world_size"], resumed["epoch"], resumed["position"]) == (10, 1, 1, 4)
    assert resumed["last_loss"] < first["first_loss"]


def test_tar_sample_passthrough_columns_and_json():
    import io as _io

    from gq_pipeline.shards import _tar_sample

    buf = _io.BytesIO()
    np.save(buf, np.array([[[65535, 0]]], dtype=np.uint16))
    meta = {"source": "s3://in/a.parquet", "member": "row=3", "width": 9, "height": 8, "token_shape": [1, 1, 2],
            "columns": {"caption": "a cat", "source": "clash"}, "json": {"a": 1}}
    s = _tar_sample("k", {"tokens.npy": buf.getvalue(), "json": json.dumps(meta).encode()}, "x.tar", False, 65536)
    assert s["tokens"].tolist() == [[[65535, 0]]] and s["caption"] == "a cat" and s["input_source"] == "clash"
    assert s["json"] == '{"a": 1}' and s["member"] == "row=3"


def test_resume_skips_delivered_blocks_without_reading(out, monkeypatch):
    from gq_pipeline import shards as shards_mod

    root, _ = out
    ds = TokenDataset(root, shuffle=False)
    want = keys(ds)[12:]
    state = ds.state_dict(consumed=12)
    assert state["position"] == 12
    reads = []
    real = shards_mod.BlockReader.take

    def counting(self, shard, group, rows):
        reads.append((shard.name, group, tuple(rows)))
        return real(self, shard, group, rows)

    monkeypatch.setattr(shards_mod.BlockReader, "take", counting)
    ds.load_state_dict(state)
    rest = keys(ds)
    assert rest == want
    starts = np.cumsum([0] + [g for s in ds.shards.shards for g in s.row_groups])
    assert len(reads) == sum(1 for a, b in zip(starts[:-1], starts[1:]) if b > 12)  # only blocks past position 12
    assert len(reads) < len(starts) - 1


def test_shuffle_quality_on_class_sorted_output(tmp_path):
    """Each shard holds one class (as for class-sorted folders). Batches must mix many classes: a global
    permutation gives ~14 of 16 per batch of 32; a buffer over row groups gave 1-2."""
    from gq_pipeline.dataset import shuffle_quality

    root = str(tmp_path)
    write_token_output(root, (128,) * 16, row_group_size=64, formats=("parquet",))
    natural = {k: i for i, k in enumerate(sorted(list_keys(root)))}  # shard-name then row order

    def measure(workers=0, **kw):
        batches = [b["key"] for b in TokenLoader(TokenDataset(root, batch_size=32, **kw), num_workers=workers)]
        units = [[k.rsplit("-", 1)[0] for k in b] for b in batches]
        return shuffle_quality(units, np.array([natural[k] for b in batches for k in b]))

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(16), 128)
    ideal = np.mean([np.mean([len(set(p[i:i + 32])) for i in range(0, 2048, 32)])
                     for p in (rng.permutation(labels) for _ in range(50))])
    assert 13.5 < ideal < 14.5
    q = measure(workers=2, shuffle_window=1024, block_rows=16)
    assert q["distinct_per_batch"] >= 0.8 * ideal and abs(q["spearman"]) < 0.15, q
    plain = measure(shuffle=False)
    assert plain["distinct_per_batch"] == 1.0 and plain["spearman"] > 0.99
    whole_groups = measure(shuffle_window=128)  # 2 row groups per window: at most 2 classes per batch
    assert whole_groups["distinct_per_batch"] <= 2.0 < q["distinct_per_batch"]


def list_keys(root):
    return [s["key"] for s in TokenDataset(root, shuffle=False)]


@pytest.fixture(scope="module")
def mixed_shapes(tmp_path_factory):
    """A --crop none style output: token grids of three shapes, shards mixing them."""
    root = str(tmp_path_factory.mktemp("shapes"))
    expected = {}
    for u, shape in enumerate([(1, 4, 4), (1, 4, 6), (1, 6, 4)]):
        expected.update(write_token_output(root, (7, 5), token_shape=shape, unit_offset=10 * u, row_group_size=3,
                                           latents=True, seed=u))
    return root, expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_shape_buckets_give_single_shape_batches_exactly_once_and_resume(mixed_shapes, fmt):
    root, expected = mixed_shapes
    make = lambda **kw: TokenDataset(root, format=fmt, batch_size=4, bucket_by_shape=True, seed=2,  # noqa: E731
                                     shuffle_window=12, **kw)
    batches = list(TokenLoader(make(), num_workers=2))
    for b in batches:
        assert b["tokens"].shape[1:] == expected[b["key"][0]]["tokens"].shape  # one shape per batch
        for k, t in zip(b["key"], b["tokens"]):
            assert np.array_equal(t.numpy(), expected[k]["tokens"])
    assert sorted(keys(batches)) == sorted(expected)
    assert len({tuple(b["tokens"].shape[1:]) for b in batches[:4]}) > 1  # shapes interleave
    ds = make()
    loader = TokenLoader(ds, num_workers=2)
    part = []
    for b in loader:
        part.append(b["key"])
        if len(part) == 3:
            break
    state = loader.state_dict()
    assert state["position"] == 3  # counts batches when bucketing
    rest = []
    for rank in range(2):  # elastic: continue on two ranks
        other = make(rank=rank, world_size=2)
        other.load_state_dict(state)
        rest += [b["key"] for b in TokenLoader(other, num_workers=0)]
    assert sorted(k for b in part + rest for k in b) == sorted(expected)


def test_pad_collate_masks_and_float16_latents(mixed_shapes):
    from gq_pipeline.dataset import pad_collate

    root, expected = mixed_shapes
    ds = TokenDataset(root, batch_size=6, collate_fn=pad_collate, latents=True, latent_dtype=torch.float16)
    for b in ds:
        assert b["tokens"].shape[0] == b["mask"].shape[0] == len(b["key"]) and b["latent"].dtype == torch.float16
        for i, k in enumerate(b["key"]):
            g, h, w = expected[k]["tokens"].shape
            assert b["token_shape"][i].tolist() == [g, h, w]
            assert b["mask"][i].sum() == h * w and b["mask"][i, :h, :w].all()
            assert np.array_equal(b["tokens"][i, :, :h, :w].numpy(), expected[k]["tokens"])
            assert (b["tokens"][i][:, ~b["mask"][i]] == 0).all()
            assert np.array_equal(b["latent"][i, :, :h, :w].numpy(), expected[k]["latent"])  # stored float16


def test_bucket_by_shape_needs_batch_size(mixed_shapes):
    with pytest.raises(ValueError, match="needs batch_size"):
        TokenDataset(mixed_shapes[0], bucket_by_shape=True)


# ---------------------------------------------------------------------------------------------- remote shards
def test_column_projection_keeps_tokens_and_asked_fields(out):
    root, expected = out
    for fmt in FORMATS:
        s = next(iter(TokenDataset(root, format=fmt, shuffle=False, columns=["txt"])))
        assert set(s) == {"key", "tokens", "txt"}
        assert s["txt"] == expected[s["key"]]["txt"] and np.array_equal(s["tokens"].numpy(),
                                                                        expected[s["key"]]["tokens"])


def test_local_cache_is_used_and_bounded(moto_s3, s3, tmp_path):
    make_bucket(moto_s3, "cached")
    expected = write_token_output("s3://cached/run", SIZES, row_group_size=3, storage_options=moto_s3,
                                  formats=("parquet",))
    sizes = [s3.size(p) for p in s3.ls("cached/run/parquet")]
    cache = str(tmp_path / "cache")
    ds = TokenDataset("s3://cached/run", storage_options=moto_s3, cache_dir=cache, batch_size=4)
    assert sorted(keys(TokenLoader(ds, num_workers=2))) == sorted(expected)
    assert len(os.listdir(cache)) == len(sizes)  # every shard copied once, no temporaries left
    s3.rm("cached/run/parquet", recursive=True)  # the next epoch reads from the cache alone
    ds.set_epoch(1)
    assert sorted(keys(TokenLoader(ds, num_workers=2))) == sorted(expected)
    bound = str(tmp_path / "bounded")
    write_token_output("s3://cached/run2", SIZES, row_group_size=3, storage_options=moto_s3, formats=("parquet",))
    small = TokenDataset("s3://cached/run2", storage_options=moto_s3, cache_dir=bound, cache_bytes=2 * max(sizes),
                         batch_size=4)
    assert sorted(keys(small)) == sorted(expected)
    held = sum(os.path.getsize(os.path.join(bound, f)) for f in os.listdir(bound))
    assert 0 < held <= 2 * max(sizes) and len(os.listdir(bound)) < len(sizes)


class _FlakyRangeHandler:
    """A static file server with HTTP Range support whose next ``fail`` GETs answer 503 (a throttled store)."""

    fail = 0
    gets = 0

    @classmethod
    def make(cls, directory):
        import http.server

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=directory, **kw)

            def log_message(self, *args):
                pass

            def do_GET(self):
                cls.gets += 1
                if cls.fail > 0:
                    cls.fail -= 1
                    self.send_error(503, "slow down")
                    return
                path = self.translate_path(self.path)
                if not os.path.isfile(path):
                    self.send_error(404)
                    return
                data = open(path, "rb").read()
                rng = self.headers.get("Range")
                if rng:
                    a, _, b = rng.split("=", 1)[1].partition("-")
                    a, b = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
                    data = data[a:b + 1]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                self.wfile.write(data)

        return Handler


def test_transient_errors_are_retried(tmp_path):
    import http.server
    import threading

    root = str(tmp_path)
    expected = write_token_output(root, SIZES, row_group_size=3, formats=("parquet",))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyRangeHandler.make(root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        urls = [f"{base}/parquet/{os.path.basename(p)}" for p in sorted(glob.glob(f"{root}/parquet/*.parquet"))]
        ds = TokenDataset(urls, batch_size=4, seed=3)
        want = keys(TokenDataset(root, batch_size=4, seed=3))
        _FlakyRangeHandler.fail = 2
        with pytest.warns(UserWarning, match="transient read failure"):
            got = keys(ds)
        assert got == want and _FlakyRangeHandler.fail == 0
        assert sorted(got) == sorted(expected)
        down = TokenDataset(urls, batch_size=4, retries=1)
        _FlakyRangeHandler.fail = 10**6  # a store that stays down: the error names the shard after the retries
        with pytest.raises(ShardError, match=r"\.parquet"):
            with pytest.warns(UserWarning, match="retry 1 of 1"):
                list(down)
    finally:
        _FlakyRangeHandler.fail = 0
        server.shutdown()
