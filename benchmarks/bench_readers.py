"""Benchmark (not a test): samples/s of TokenLoader against plain pyarrow.dataset iteration and against wids, on the
same shards.

    .venv/bin/python benchmarks/bench_readers.py                  # 20 000 samples of [1, 32, 32] uint16 tokens
    .venv/bin/python benchmarks/bench_readers.py --samples 50000 --json out.json

Each reader turns the shards into int64 token batches of ``--batch`` samples, as a training loop would get them:

* ``pyarrow.dataset``: ``to_batches`` over the Parquet folder, tokens flattened to numpy and reshaped (no shuffle,
  no rank split, no resume: the floor a reader with those features is compared with);
* ``TokenDataset`` / ``TokenLoader``: unshuffled, and shuffled (the default global window), 0 and 2 workers;
* ``wids.ShardListDataset`` over the tar shards' index, one sample at a time, batched by hand.

The shards come from ``benchmarks/synthetic.py`` (random tokens in the job's output format), 1 000 samples per
shard.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.report import print_table, write_json  # noqa: E402


def _timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def bench_pyarrow(root: str, batch: int) -> int:
    import pyarrow.dataset as pads

    n = 0
    for b in pads.dataset(os.path.join(root, "parquet"), format="parquet").to_batches(columns=["tokens"],
                                                                                      batch_size=batch):
        col = b.column(0)
        flat = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
        flat.reshape(len(col), -1)
        n += len(col)
    return n


def bench_token_loader(root: str, batch: int, shuffle: bool, workers: int, fmt: str = "parquet") -> int:
    from gq_pipeline.dataset import TokenDataset, TokenLoader

    ds = TokenDataset(root, format=fmt, shuffle=shuffle, batch_size=batch, seed=0)
    n = 0
    for b in TokenLoader(ds, num_workers=workers):
        n += int(b["tokens"].shape[0])
    return n


def bench_wids(root: str, batch: int, cache: str) -> int:
    import wids

    ds = wids.ShardListDataset(os.path.join(root, ".gq", "webdataset-index.json"), cache_dir=cache, keep=True)
    n, buf = 0, []
    for i in range(len(ds)):
        buf.append(np.asarray(ds[i][".tokens.npy"], dtype=np.int64))
        if len(buf) == batch:
            np.stack(buf)
            n += len(buf)
            buf = []
    return n + len(buf)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from benchmarks.synthetic import write_token_output

    work = tempfile.mkdtemp(prefix="gq-bench-readers-")
    root = os.path.join(work, "out")
    shards = tuple([1000] * (args.samples // 1000))
    write_token_output(root, shards, token_shape=(1, 32, 32), codebook_size=65536, row_group_size=1000)
    n_total = sum(shards)
    runs = {
        "pyarrow.dataset to_batches (floor: no shuffle/split/resume)": lambda: bench_pyarrow(root, args.batch),
        "TokenLoader, Parquet, no shuffle, 0 workers": lambda: bench_token_loader(root, args.batch, False, 0),
        "TokenLoader, Parquet, shuffled, 0 workers": lambda: bench_token_loader(root, args.batch, True, 0),
        "TokenLoader, Parquet, shuffled, 2 workers": lambda: bench_token_loader(root, args.batch, True, 2),
        "TokenLoader, WebDataset, shuffled, 0 workers": lambda: bench_token_loader(root, args.batch, True, 0,
                                                                                   "webdataset"),
        "wids ShardListDataset (tars, sequential)": lambda: bench_wids(root, args.batch, os.path.join(work, "wids")),
    }
    results = {"date": datetime.date.today().isoformat(),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
               "samples": n_total, "batch": args.batch, "loadavg_1min": round(os.getloadavg()[0], 1), "runs": {}}
    for name, fn in runs.items():  # best of --repeats: the first pass also pays imports and the page cache
        best = float("inf")
        for _ in range(args.repeats):
            dt, n = _timed(fn)
            assert n == n_total, (name, n, n_total)
            best = min(best, dt)
        results["runs"][name] = {"seconds": round(best, 3), "samples_per_s": round(n_total / best)}
    floor = results["runs"][next(iter(runs))]["samples_per_s"]
    print(f"## Reading tokens ({n_total} samples of [1, 32, 32] uint16, batch {args.batch}, {results['machine']}, "
          f"{results['date']}, load average {results['loadavg_1min']})\n")
    print_table(["reader", "samples/s", "vs pyarrow.dataset"],
                [[k, f"{v['samples_per_s']:,}", f"{v['samples_per_s'] / floor:.2f}"]
                 for k, v in results["runs"].items()])
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
