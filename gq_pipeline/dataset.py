"""TokenDataset: read ``gq tokenize`` shards in a training loop, exactly once per epoch across ranks and workers.

How samples are assigned (why it is exactly-once with unequal shards): each epoch has one deterministic *block order*
(shards permuted by ``(seed, epoch)``, then each shard's row groups permuted; a tar is one block). Concatenated, the
blocks give every sample a global position ``0..N-1``. Rank ``r`` of ``R`` takes the contiguous position range
``[r*T//R, (r+1)*T//R)`` and DataLoader worker ``w`` of ``W`` takes the same even split of its rank's range, so the
ranges tile ``[0, T)`` with no overlap and no gap whatever the shard sizes (a range may start or end inside a row
group or tar: only the rows in range are kept). ``T = N`` by default (rank counts differ by at most one sample);
``drop_last`` makes ``T = R*floor(N/R)`` and ``pad`` makes ``T = R*ceil(N/R)`` (positions past ``N`` wrap to the start,
like DistributedSampler), so every rank yields the same number of samples and batches and DDP cannot hang on a
missing collective. Each worker reads only the blocks its range touches: no read amplification beyond two partial
blocks per worker.

Shuffling is a per-worker shuffle buffer driven by a counter-based hash RNG keyed by ``(seed, epoch, rank, worker)``:
the emitted order is a pure function of those numbers, computed on positions before any data is read.

Resume: the state is ``(epoch, samples consumed by this rank)`` plus the settings that shape the stream. A
``DataLoader`` with ``W`` workers and ``in_order=True`` returns items round-robin over workers (skipping exhausted
ones), so the rank-level count determines how many samples each worker had delivered; each worker replays its
shuffle on positions only, skips blocks whose samples were all delivered without reading them, and continues with
the exact remaining sequence. The main process learns the count either by iterating the dataset itself
(``num_workers=0``) or through :class:`TokenLoader`, a DataLoader that counts what it hands out.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import warnings
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gq_pipeline.shards import BlockReader, ShardError, ShardSet, list_shards

__all__ = ["TokenDataset", "TokenLoader", "collate", "ShuffleOrder"]

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
STATE_FORMAT = "gq.TokenDataset"
STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------- randomness
def _key(*parts: Any) -> int:
    """A 64-bit stream key from any printable parts: stable across Python/numpy/torch versions (unlike their RNGs),
    so a resumed run reproduces the order even after an upgrade."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _rand(key: int, step: int) -> int:
    """splitmix64 output ``step`` of stream ``key``: counter-based, so a stream is resumable from its step count."""
    z = (key + (step + 1) * _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _permutation(n: int, key: int) -> list[int]:
    out = list(range(n))
    for i in range(n - 1, 0, -1):
        j = _rand(key, i) % (i + 1)
        out[i], out[j] = out[j], out[i]
    return out


class ShuffleOrder:
    """The emission order of a shuffle buffer of ``size`` over positions ``0..n-1``, without the data.

    The buffer is filled in read order; each step emits a random slot and refills it with the next position (then
    drains randomly). ``size=1`` is the identity. :meth:`skip` replays ``m`` steps and freezes what had been delivered
    (every position below ``resume_point`` except ``resume_buffer``), which tells the reader which blocks to skip.
    """

    def __init__(self, n: int, size: int, key: int):
        self.n, self.size, self.key = int(n), max(1, int(size)), key
        self.buf: list[int] = []
        self.next = 0
        self.step = 0
        self.resume_point, self.resume_buffer = 0, frozenset()

    def __iter__(self) -> "ShuffleOrder":
        return self

    def __next__(self) -> int:
        buf = self.buf
        while len(buf) < self.size and self.next < self.n:
            buf.append(self.next)
            self.next += 1
        if not buf:
            raise StopIteration
        if len(buf) == 1:
            j = 0
        else:
            j = _rand(self.key, self.step) % len(buf)
            self.step += 1
        p = buf[j]
        if self.next < self.n:
            buf[j] = self.next
            self.next += 1
        else:
            buf[j] = buf[-1]
            buf.pop()
        return p

    def skip(self, m: int) -> None:
        for _ in range(m):
            next(self)
        self.resume_point, self.resume_buffer = self.next, frozenset(self.buf)

    def first_needed(self, a: int, b: int) -> int | None:
        """Smallest position in ``[a, b)`` not delivered before the resume point, or None (skip the block)."""
        best = max(a, self.resume_point) if self.resume_point < b else None
        for p in self.resume_buffer:
            if a <= p < b and (best is None or p < best):
                best = p
        return best

    def needed(self, p: int) -> bool:
        return p >= self.resume_point or p in self.resume_buffer


# ---------------------------------------------------------------------------------------------- splitting
def _split(n: int, parts: int, i: int) -> tuple[int, int]:
    return i * n // parts, (i + 1) * n // parts


def consumed_per_worker(consumed: int, lengths: list[int], item_size: int) -> list[int]:
    """Samples each worker had delivered when a DataLoader (``in_order=True``) had handed out ``consumed`` samples:
    items of ``item_size`` samples (a worker's last one may be short) arrive round-robin over the workers that still
    have items."""
    taken = [0] * len(lengths)
    rem = consumed
    while rem > 0:
        active = [w for w, n in enumerate(lengths) if taken[w] < n]
        if not active:
            raise ValueError(f"the state says {consumed} samples were consumed, but this rank has only {sum(lengths)}")
        full = min((lengths[w] - taken[w]) // item_size for w in active)
        rounds = min(full, rem // (item_size * len(active)))
        if rounds:
            for w in active:
                taken[w] += rounds * item_size
            rem -= rounds * item_size * len(active)
            continue
        for w in active:
            if rem == 0:
                break
            size = min(item_size, lengths[w] - taken[w])
            if size > rem:
                raise ValueError(f"the consumed count {consumed} does not fall on an item boundary "
                                 f"(items of {item_size} samples)")
            taken[w] += size
            rem -= size
    return taken


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, turn numbers into tensors, keep everything else as lists (strings, bytes, None)."""
    out: dict[str, Any] = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        v0 = vals[0]
        if isinstance(v0, torch.Tensor):
            try:
                out[k] = torch.stack(vals)
            except RuntimeError as e:
                raise ValueError(f"cannot batch field {k!r}: shapes differ ({e}); use batch_size=None and your own "
                                 "collate function") from e
        elif isinstance(v0, (bool, int, float)) and all(type(v) is type(v0) for v in vals):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


# ---------------------------------------------------------------------------------------------- dataset
class TokenDataset(IterableDataset):
    """An ``IterableDataset`` over the Parquet or WebDataset output of ``gq tokenize`` (local or any fsspec URL).

    Yields dicts with ``tokens`` (int64 ``[G, h, w]``, or ``[G*h*w]`` with ``flatten=True``), ``key``, the pass-through
    fields (``source``, ``member``, ``width``, ``height``, ``txt``/``json``/``cls`` ...) and, with ``latents=True``,
    ``latent`` (float32 ``[C, h, w]``). With ``batch_size`` it yields collated batches instead (use it with
    ``DataLoader(batch_size=None)`` or :class:`TokenLoader`; required for exact resume with several workers).

    ``rank``/``world_size`` default to torch.distributed's when it is initialized (else 0/1). Call :meth:`set_epoch`
    before each epoch. See the module docstring for the exactly-once split and how resume works.
    """

    def __init__(self, url: str | list[str], format: str = "auto", shuffle: bool = True, seed: int = 0,
                 buffer_size: int = 1000, rank: int | None = None, world_size: int | None = None, *,
                 batch_size: int | None = None, flatten: bool = False, latents: bool = False, drop_last: bool = False,
                 pad: bool = False, storage_options: dict | None = None):
        super().__init__()
        if drop_last and pad:
            raise ValueError("drop_last and pad are exclusive: drop_last trims to equal rank counts, pad repeats")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.shards: ShardSet = list_shards(url, format, storage_options)
        self.fingerprint = self.shards.check_fingerprints()
        self.codebook_size = self.shards.codebook_size
        self.format = self.shards.format
        if rank is None or world_size is None:
            dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = (torch.distributed.get_rank() if dist_on else 0) if rank is None else rank
            world_size = (torch.distributed.get_world_size() if dist_on else 1) if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.seed, self.buffer_size = bool(shuffle), int(seed), int(buffer_size)
        self.batch_size, self.flatten, self.latents = batch_size, flatten, latents
        self.drop_last, self.pad = drop_last, pad
        if latents and self.format == "parquet" and any("latent" not in s.columns for s in self.shards.shards):
            bad = next(s for s in self.shards.shards if "latent" not in s.columns)
            raise ShardError(f"{self.shards.url(bad)}: no 'latent' column (tokenize with --latents to store latents)")
        self.epoch = 0
        self._resume = 0          # samples of this epoch to skip in the next iterator (set by load_state_dict)
        self._resume_workers = 0  # num_workers of the run that consumed them (the interleave depends on it)
        self._consumed = 0        # samples handed out by the current iterator of this epoch (counted in-process)
        self._count_workers = 0
        self._loader_workers = 0  # hint from TokenLoader for __len__
        n, r = self.shards.num_samples, self.world_size
        if r > 1 and n % r and not (drop_last or pad):
            warnings.warn(f"{n} samples do not split evenly over {r} ranks (counts differ by one); under DDP pass "
                          "drop_last=True or pad=True so every rank runs the same number of steps", stacklevel=2)

    # ------------------------------------------------------------------ plan
    @property
    def num_samples(self) -> int:
        """Samples in one epoch across all ranks (after drop_last/pad)."""
        n, r = self.shards.num_samples, self.world_size
        return r * (n // r) if self.drop_last else r * math.ceil(n / r) if self.pad else n

    def rank_range(self) -> tuple[int, int]:
        return _split(self.num_samples, self.world_size, self.rank)

    def _worker_lengths(self, num_workers: int) -> list[int]:
        a, b = self.rank_range()
        return [_split(b - a, num_workers, w)[1] - _split(b - a, num_workers, w)[0] for w in range(num_workers)]

    def num_batches(self, num_workers: int = 0) -> int:
        """Items this rank yields per epoch with ``num_workers`` DataLoader workers (each batches its own share)."""
        size = self.batch_size or 1
        return sum(math.ceil(n / size) for n in self._worker_lengths(max(1, num_workers)))

    def __len__(self) -> int:
        return self.num_batches(self._loader_workers)

    def epoch_blocks(self, epoch: int) -> list[tuple[int, int, int]]:
        """(shard index, row group, rows) in this epoch's order: shards permuted, then each shard's row groups."""
        shards = self.shards.shards
        order = _permutation(len(shards), _key("shards", self.seed, epoch)) if self.shuffle else range(len(shards))
        blocks = []
        for i in order:
            groups = shards[i].row_groups
            g_order = (_permutation(len(groups), _key("groups", self.seed, epoch, shards[i].name))
                       if self.shuffle else range(len(groups)))
            blocks += [(i, g, groups[g]) for g in g_order if groups[g]]
        return blocks

    def _segments(self, epoch: int, a: int, b: int) -> list[tuple[int, int, int, int]]:
        """(shard, group, lo, hi) row ranges covering global positions ``[a, b)`` (wrapping past N when padding)."""
        blocks = self.epoch_blocks(epoch)
        starts = [0]
        for blk in blocks:
            starts.append(starts[-1] + blk[2])
        n = starts[-1]
        out, g = [], a
        while g < b:
            q = g % n
            i = bisect.bisect_right(starts, q) - 1
            take = min(starts[i + 1] - q, b - g)
            out.append((blocks[i][0], blocks[i][1], q - starts[i], q - starts[i] + take))
            g += take
        return out

    # ------------------------------------------------------------------ iteration
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its block order and shuffle). Setting the epoch a restored state is in keeps the resume."""
        if int(epoch) != self.epoch:
            self.epoch, self._resume, self._consumed = int(epoch), 0, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        in_main = info is None
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        skip_total = self._resume
        if in_main:
            self._resume, self._consumed, self._count_workers = 0, skip_total, 0
        if skip_total and max(1, self._resume_workers) != workers:
            raise ValueError(f"the restored state was saved with {self._resume_workers} DataLoader worker(s); "
                             f"resume with the same num_workers (got {workers}) or the sample order changes")
        lengths = self._worker_lengths(workers)
        skip = consumed_per_worker(skip_total, lengths, self.batch_size or 1)[worker] if skip_total else 0
        a, b = self.rank_range()
        wa, wb = _split(b - a, workers, worker)
        segments = self._segments(self.epoch, a + wa, a + wb)
        order = ShuffleOrder(wb - wa, self.buffer_size if self.shuffle else 1,
                             _key("buffer", self.seed, self.epoch, self.rank, self.world_size, worker, workers))
        order.skip(skip)
        items = self._samples(segments, order)
        if self.batch_size:
            items = self._batches(items)
        for item in items:
            if in_main:
                self._consumed += len(item["key"]) if self.batch_size else 1
            yield item

    def _samples(self, segments: list[tuple[int, int, int, int]], order: ShuffleOrder) -> Iterator[dict[str, Any]]:
        reader = BlockReader(self.shards, self.latents)
        shards = self.shards.shards

        def produce():
            p0 = 0
            for s, g, lo, hi in segments:
                first = order.first_needed(p0, p0 + hi - lo)
                if first is not None:  # else every sample of this block was delivered before the resume point
                    for i, sample in enumerate(reader.rows(shards[s], g, lo + first - p0, hi)):
                        if order.needed(first + i):
                            yield first + i, sample
                p0 += hi - lo

        source, pending = produce(), {}
        try:
            for p in order:
                while p not in pending:
                    q, sample = next(source)
                    pending[q] = sample
                sample = pending.pop(p)
                if self.flatten:
                    sample["tokens"] = sample["tokens"].reshape(-1)
                yield sample
        finally:
            reader.close()

    def _batches(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        batch = []
        for s in samples:
            batch.append(s)
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)

    # ------------------------------------------------------------------ resume
    def _settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "shuffle": self.shuffle, "buffer_size": self.buffer_size, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size, "drop_last": self.drop_last,
                "pad": self.pad, "num_samples": self.shards.num_samples, "shards": self.shards.digest()}

    def state_dict(self, consumed: int | None = None, num_workers: int | None = None) -> dict[str, Any]:
        """Epoch and samples this rank has consumed in it (counted by in-process iteration or :class:`TokenLoader`;
        pass ``consumed``/``num_workers`` yourself when a plain multi-worker DataLoader did the iterating)."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": self.epoch,
                "consumed": self._consumed if consumed is None else int(consumed),
                "num_workers": self._count_workers if num_workers is None else int(num_workers), **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken: the next iterator skips the consumed samples of its epoch."""
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a TokenDataset state (version {STATE_VERSION}): {state.get('format')!r}")
        mine = self._settings()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError("cannot resume: the state was taken with other settings or shards: "
                             + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        self.epoch, consumed = int(state["epoch"]), int(state["consumed"])
        per_rank = self.rank_range()[1] - self.rank_range()[0]
        if consumed >= per_rank:  # the epoch was finished: continue with the next one
            self.epoch, consumed = self.epoch + 1, 0
        self._resume = self._consumed = consumed
        self._resume_workers = self._count_workers = int(state.get("num_workers", 0))


class TokenLoader(DataLoader):
    """A DataLoader over a :class:`TokenDataset` that counts what it hands out, so ``state_dict()`` works with
    worker processes. Batching is the dataset's (``TokenDataset(batch_size=...)``); workers are never persistent,
    because a persistent worker would keep the epoch and resume point of its first iterator."""

    def __init__(self, dataset: TokenDataset, num_workers: int = 0, **kwargs: Any):
        if not isinstance(dataset, TokenDataset):
            raise TypeError("TokenLoader takes a TokenDataset")
        for bad in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
            if bad in kwargs:
                raise TypeError(f"TokenLoader: {bad} belongs to TokenDataset (batching and order are the dataset's)")
        if kwargs.get("persistent_workers"):
            raise ValueError("TokenLoader: persistent_workers would keep the first epoch's order and resume point")
        if kwargs.get("in_order") is False:
            raise ValueError("TokenLoader: in_order=False makes the consumed samples unknowable; resume needs it")
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)
        dataset._loader_workers = num_workers

    def __iter__(self):
        ds: TokenDataset = self.dataset
        if self.num_workers == 0:  # the dataset runs (and counts) in this process
            yield from super().__iter__()
            return
        iterator = super().__iter__()  # workers start here with the dataset's current epoch and resume point
        ds._consumed, ds._resume, ds._count_workers = ds._resume, 0, self.num_workers
        for item in iterator:
            ds._consumed += len(item["key"]) if ds.batch_size else 1
            yield item

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
