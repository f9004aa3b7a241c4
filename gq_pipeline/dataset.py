"""TokenDataset: read ``gq tokenize`` shards in a training loop, exactly once per epoch, with an elastic exact resume.

One global order per epoch, independent of ranks, workers and batch size (MosaicML Streaming's "elastic
determinism"). It is built in two stages so that it shuffles well while memory stays bounded:

1. *blocks* (a Parquet row group, or ``block_rows`` rows of one; a tar) are permuted over the whole shard set by
   ``(seed, epoch)``, so consecutive blocks come from different shards;
2. consecutive blocks are grouped into *windows* of at least ``shuffle_window`` samples, and the samples inside each
   window are permuted. A batch therefore mixes samples of every block of its window: with class-sorted shards it holds
   many classes, not the one or two a shuffle buffer over row groups gives.

Position ``p`` of the epoch is the ``p``-th sample of that order. The epoch is dealt out in *rounds* of ``R*B``
positions (``R`` ranks, batch size ``B``, 1 without batching): in each round rank ``r`` takes the contiguous run
``[r*B, (r+1)*B)``. After ``k`` synchronous steps the ranks together have consumed exactly the positions
``[0, k*R*B)``, so the resume state is just ``(epoch, position)``: the same on every rank, and loadable with any
number of ranks, workers or another batch size (the rest of the epoch is dealt out again from that position). The
tail that does not fill a round is split evenly over the ranks (per-rank counts differ by at most one sample);
``drop_last`` drops fewer than ``R`` samples and ``pad`` repeats the first few positions, so every rank yields the
same number of batches and DDP cannot hang on a collective one rank never reaches.

DataLoader workers: worker ``w`` of ``W`` produces the rank's items ``w, w+W, w+2W, ...``. A DataLoader with
``in_order=True`` (the default) returns worker items round-robin, so the loader yields exactly the rank's item
sequence, whatever ``W`` is, and a resumed loader (which starts again at worker 0) continues with exactly the next
item. Each worker reads a window's blocks once (reads inside a window go in shard order) and keeps only the samples
its own items need, so a worker holds at most about one window's share of decoded samples.

Randomness comes from a counter-based splitmix64 keyed by blake2b of printable parts, vectorized with numpy: stable
across Python/numpy/torch versions (unlike their RNGs), so a resumed run reproduces the order even after an upgrade.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gq_pipeline.footer_cache import resolve_footer_cache
from gq_pipeline.shards import (TOKEN_COLUMNS, BlockReader, ShardCache, ShardError, ShardSet, list_shards,
                                row_token_shapes)

__all__ = ["TokenDataset", "TokenLoader", "collate", "pad_collate", "EpochOrder", "shuffle_quality"]

_GOLDEN = 0x9E3779B97F4A7C15
STATE_FORMAT = "gq.TokenDataset"
STATE_VERSION = 2
DEFAULT_WINDOW = 8192      # samples per shuffle window: bounds what a worker holds decoded (its share of one)
DEFAULT_BLOCK_ROWS = 256   # rows per shuffle block: a 1024-row group becomes 4 blocks, so a window spans ~32 units


# ---------------------------------------------------------------------------------------------- randomness
def _key(*parts: Any) -> int:
    """A 64-bit stream key from any printable parts (stable across library versions)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _hashes(key: int, idx: np.ndarray) -> np.ndarray:
    """splitmix64 output ``idx`` of stream ``key``, for a whole array at once (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (idx.astype(np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _permutation(n: int, key: int) -> np.ndarray:
    """A uniform permutation of ``0..n-1``: the order of ``n`` keyed 64-bit hashes (a stable sort, so ties, which
    have probability ~n²/2⁶⁵, still resolve the same way everywhere)."""
    return np.argsort(_hashes(key, np.arange(n, dtype=np.uint64)), kind="stable")


# ---------------------------------------------------------------------------------------------- the global order
class EpochOrder:
    """The global sample order of one epoch of a shard set: permuted blocks, then a permutation inside each window.

    ``blocks`` rows are ``(shard index, row group, first row, rows)``; ``block_starts[b]`` is the position of block
    ``b``'s first sample in block order; ``window_starts`` cut that order into windows of whole blocks.
    """

    def __init__(self, shards: ShardSet, seed: int, epoch: int, shuffle: bool, window: int,
                 block_rows: int | None = None):
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        blocks = []
        for si, shard in enumerate(shards.shards):
            for g, n in enumerate(shard.row_groups):
                step = block_rows if block_rows and shard.format == "parquet" else n
                for lo in range(0, n, max(1, step)):
                    blocks.append((si, g, lo, min(step, n - lo)))
        blocks = np.array(blocks, dtype=np.int64).reshape(-1, 4)
        if shuffle and len(blocks):
            blocks = blocks[_permutation(len(blocks), _key("blocks", seed, epoch))]
        self.blocks = blocks
        self.block_starts = np.concatenate([[0], np.cumsum(blocks[:, 3])]).astype(np.int64)
        self.n = int(self.block_starts[-1])
        bounds = [0]  # windows also without shuffling: they bound what a worker reads ahead and holds
        for s in self.block_starts[1:-1]:
            if s - bounds[-1] >= window:
                bounds.append(int(s))
        bounds.append(self.n)
        self.window_starts = np.array(bounds, dtype=np.int64)
        self._perm_cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def windows_of(self, q: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.window_starts, q, side="right") - 1

    def _window_perm(self, k: int) -> np.ndarray:
        if k not in self._perm_cache:
            a, b = int(self.window_starts[k]), int(self.window_starts[k + 1])
            self._perm_cache[k] = a + (_permutation(b - a, _key("window", self.seed, self.epoch, k))
                                       if self.shuffle else np.arange(b - a))
            while len(self._perm_cache) > 2:
                self._perm_cache.popitem(last=False)
        return self._perm_cache[k]

    def locate(self, q: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(block index, row inside the block) of positions ``q``, all in window ``window``."""
        src = self._window_perm(window)[q - self.window_starts[window]]
        b = np.searchsorted(self.block_starts, src, side="right") - 1
        return b, src - self.block_starts[b]

    def source_index(self, q: np.ndarray) -> np.ndarray:
        """Each position's index in shard-name-then-row order (to measure how well the order is shuffled)."""
        w = self.windows_of(q)
        out = np.empty(len(q), dtype=np.int64)
        for k in np.unique(w):
            sel = w == k
            b, row = self.locate(q[sel], int(k))
            out[sel] = _unshuffled_start(self, b) + row
        return out


def _unshuffled_start(order: EpochOrder, b: np.ndarray) -> np.ndarray:
    """Index of block ``b``'s first sample in name-then-row order."""
    if not hasattr(order, "_natural"):
        keys = order.blocks[:, 0] * (1 << 40) + order.blocks[:, 1] * (1 << 20) + order.blocks[:, 2]
        rank = np.argsort(keys, kind="stable")
        starts = np.empty(len(keys), dtype=np.int64)
        starts[rank] = np.concatenate([[0], np.cumsum(order.blocks[rank, 3])[:-1]])
        order._natural = starts
    return order._natural[b]


def shuffle_quality(unit_of_batch: list[list[Any]], source_index: np.ndarray | None = None,
                    positions: np.ndarray | None = None) -> dict[str, float]:
    """Shuffle measures: mean distinct units (shards, classes) per batch and, given each emitted sample's index in
    source order, the Spearman rank correlation of emission position against it (0 for a perfect shuffle)."""
    out = {"distinct_per_batch": float(np.mean([len(set(b)) for b in unit_of_batch]))}
    if source_index is not None:
        x = np.argsort(np.argsort(np.asarray(positions if positions is not None else np.arange(len(source_index)))))
        y = np.argsort(np.argsort(np.asarray(source_index)))
        out["spearman"] = float(np.corrcoef(x, y)[0, 1]) if len(x) > 1 else 0.0
    return out


def _split(n: int, parts: int, i: int) -> tuple[int, int]:
    return i * n // parts, (i + 1) * n // parts


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, turn numbers into tensors, keep everything else as lists (strings, bytes, None).

    The batch has the union of its samples' fields (in first-seen order): an output whose shards carry different
    pass-through columns (a folder's none, a tar's ``txt``/``json``/``cls``, a Parquet input's own) batches with
    ``None`` for the samples that lack a field; such a field stays a list, since a tensor cannot hold the gaps."""
    out: dict[str, Any] = {}
    for k in dict.fromkeys(k for s in samples for k in s):
        vals = [s.get(k) for s in samples]
        v0 = vals[0]
        if any(v is None for v in vals):
            out[k] = vals
        elif isinstance(v0, torch.Tensor):
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


def pad_collate(samples: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Batch samples of different token shapes (``--crop none``): ``tokens`` padded with ``pad_id`` to the largest
    ``h``/``w`` (or length, when flattened) of the batch, ``mask`` (bool, True on real tokens: ``[B, H, W]``, or
    ``[B, L]``), ``token_shape`` (int64 ``[B, 3]``, the real shapes); a ``latent`` is padded with zeros the same way."""
    shapes = [tuple(s["tokens"].shape) for s in samples]
    dims = max(len(sh) for sh in shapes)
    full = tuple(max(sh[d] for sh in shapes) for d in range(dims))
    tokens = torch.full((len(samples), *full), pad_id, dtype=samples[0]["tokens"].dtype)
    mask = torch.zeros((len(samples), *full[-2:]) if dims == 3 else (len(samples), *full), dtype=torch.bool)
    for i, (s, sh) in enumerate(zip(samples, shapes)):
        tokens[(i, *[slice(0, n) for n in sh])] = s["tokens"]
        mask[(i, *[slice(0, n) for n in sh[-2:]])] = True
    latent = None
    if all("latent" in s for s in samples):
        lshape = tuple(max(s["latent"].shape[d] for s in samples) for d in range(samples[0]["latent"].dim()))
        latent = torch.zeros((len(samples), *lshape), dtype=samples[0]["latent"].dtype)
        for i, s in enumerate(samples):
            latent[(i, *[slice(0, n) for n in s["latent"].shape])] = s["latent"]
    rest = collate([{k: v for k, v in s.items() if k not in ("tokens", "latent")} for s in samples])
    rest.update(tokens=tokens, mask=mask, token_shape=torch.tensor([list(sh) for sh in shapes], dtype=torch.int64))
    if latent is not None:
        rest["latent"] = latent
    return rest


# ---------------------------------------------------------------------------------------------- rank/worker/resume
class OrderedStream(IterableDataset):
    """What :class:`TokenDataset` and ``TokenMixture`` share: a global order per epoch (``_epoch_length``,
    ``_locate``, ``_read``), dealt to ranks in rounds of ``world_size * batch_size`` positions and to DataLoader
    workers item by item, with an elastic state ``(epoch, position)``."""

    state_format = STATE_FORMAT

    def _init_stream(self, rank: int | None, world_size: int | None, batch_size: int | None, drop_last: bool,
                     pad: bool) -> None:
        if drop_last and pad:
            raise ValueError("drop_last and pad are exclusive: drop_last trims to equal rank counts, pad repeats")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if rank is None or world_size is None:
            dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = (torch.distributed.get_rank() if dist_on else 0) if rank is None else rank
            world_size = (torch.distributed.get_world_size() if dist_on else 1) if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = int(rank), int(world_size)
        self.batch_size, self.drop_last, self.pad = batch_size, drop_last, pad
        self.epoch = 0
        self._start = 0  # position the next iterator starts from (set by load_state_dict)
        self._base = 0   # position the current iterator started from
        self._done = 0   # items the current iterator has handed out (counted in this process or by TokenLoader)

    # -- to implement
    def _epoch_length(self, epoch: int) -> int:
        raise NotImplementedError

    def _locate(self, epoch: int, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(source, source epoch, source position, window) per position: samples with equal triples
        ``(source, source epoch, window)`` are read together."""
        raise NotImplementedError

    def _read(self, source: int, epoch: int, window: int, q: np.ndarray, readers: dict) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def _finish(self, sample: dict[str, Any], source: int) -> dict[str, Any]:
        return sample

    def _collate(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        return (getattr(self, "collate_fn", None) or collate)(batch)

    # -- plan
    @property
    def num_samples(self) -> int:
        """Samples in one epoch across all ranks (after drop_last/pad), from the start of the epoch."""
        return self._end(self.epoch, 0)

    def _end(self, epoch: int, start: int) -> int:
        n, r = self._epoch_length(epoch), self.world_size
        left = max(0, n - start)
        return start + (left - left % r if self.drop_last else math.ceil(left / r) * r if self.pad else left)

    def _item_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Variable items (shape buckets): (starts, stops) of every item of the epoch in position space. The state's
        position then counts items, not samples. None: items are runs of ``batch_size`` positions."""
        return None

    def _rank_items(self, epoch: int, start: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(item starts, item stops, full rounds) of this rank for the epoch's positions from ``start``."""
        plan = self._item_plan(epoch)
        if plan is not None:
            return self._rank_plan_items(plan, start)
        b, r, rank = self.batch_size or 1, self.world_size, self.rank
        end = self._end(epoch, start)
        full = (end - start) // (r * b)
        starts = start + np.arange(full, dtype=np.int64) * r * b + rank * b
        stops = starts + b
        rem = end - start - full * r * b
        lo, hi = _split(rem, r, rank)
        if hi > lo:
            t = start + full * r * b
            starts, stops = np.append(starts, t + lo), np.append(stops, t + hi)
        return starts, stops, full

    def _rank_plan_items(self, plan: tuple[np.ndarray, np.ndarray], start: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Whole items dealt round-robin to ranks from item ``start``; drop_last/pad act on items."""
        m, r = len(plan[0]), self.world_size
        left = max(0, m - start)
        total = left - left % r if self.drop_last else math.ceil(left / r) * r if self.pad else left
        full = total // r
        idx = start + np.arange(full, dtype=np.int64) * r + self.rank
        if self.rank < total - full * r:
            idx = np.append(idx, start + full * r + self.rank)
        idx = idx % max(1, m)  # pad: wrap to the first items of the epoch
        return plan[0][idx], plan[1][idx], full

    def rank_samples(self) -> int:
        """Samples this rank yields in the current epoch (from its resume point)."""
        starts, stops, _ = self._rank_items(self.epoch, self._start)
        return int((stops - starts).sum())

    def num_batches(self, num_workers: int = 0) -> int:
        """Items this rank yields in the current epoch (from its resume point); the same for any ``num_workers``."""
        return len(self._rank_items(self.epoch, self._start)[0])

    def __len__(self) -> int:
        return self.num_batches()

    # -- iteration
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its order). Setting the epoch a restored state is in keeps the resume point."""
        if int(epoch) != self.epoch:
            self.epoch, self._start, self._base, self._done = int(epoch), 0, 0, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        in_main = info is None
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        start = self._start
        if in_main:
            self._start, self._base, self._done = 0, start, 0
        starts, stops, _ = self._rank_items(self.epoch, start)
        for item in self._items(self.epoch, starts[worker::workers], stops[worker::workers]):
            if in_main:
                self._done += 1
            yield item

    def _items(self, epoch: int, starts: np.ndarray, stops: np.ndarray) -> Iterator[dict[str, Any]]:
        """This worker's items: each window's samples are read once, when the first item needing one comes up."""
        lengths = stops - starts
        if not len(lengths):
            return
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        pos = np.repeat(starts, lengths) + (np.arange(bounds[-1]) - np.repeat(bounds[:-1], lengths))
        src, sep, q, win = self._locate(epoch, pos)
        cache: dict[int, dict[str, Any]] = {}
        readers: dict = {}
        try:
            for i in range(len(lengths)):
                a, b = int(bounds[i]), int(bounds[i + 1])
                for j in range(a, b):
                    if j in cache:
                        continue
                    rest = np.arange(j, len(pos))
                    rest = rest[(src[j:] == src[j]) & (sep[j:] == sep[j]) & (win[j:] == win[j])]
                    rest = rest[[int(x) not in cache for x in rest]] if cache else rest
                    samples = self._read(int(src[j]), int(sep[j]), int(win[j]), q[rest], readers)
                    for x, s in zip(rest.tolist(), samples):
                        cache[x] = s
                batch = [self._finish(cache.pop(j), int(src[j])) for j in range(a, b)]
                yield self._collate(batch) if self.batch_size else batch[0]
        finally:
            for reader in readers.values():
                reader.close()

    # -- resume
    def _position(self) -> tuple[int, int]:
        """(epoch, position) the ranks have consumed up to, assuming every rank handed out as many items as this one
        (true under DDP, where each step is a collective)."""
        starts, _, full = self._rank_items(self.epoch, self._base)
        if self._done >= len(starts):
            return self.epoch + 1, 0
        unit = 1 if self._item_plan(self.epoch) is not None else self.batch_size or 1
        return self.epoch, self._base + min(self._done, full) * self.world_size * unit

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """``{epoch, position}`` in the global order, plus the settings that shape the order. The same on every rank
        that ran the same number of steps; load it with any world size, worker count or batch size. ``consumed``:
        items (batches, or samples without batching) this rank took from the current iterator, when a plain
        DataLoader with workers did the iterating (TokenLoader and in-process iteration count by themselves)."""
        if consumed is not None:
            self._done = int(consumed)
        epoch, position = self._position()
        return {"format": self.state_format, "version": STATE_VERSION, "epoch": epoch, "position": position,
                "rank": self.rank, "world_size": self.world_size, "items": self._done, **self._settings()}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue from ``state`` (one rank's state, or the list of every rank's, which must agree)."""
        states = [state] if isinstance(state, dict) else list(state)
        if not states:
            raise ValueError("no state given")
        mine = self._settings()
        for s in states:
            if s.get("format") != self.state_format or s.get("version") != STATE_VERSION:
                raise ValueError(f"not a {self.state_format} state of version {STATE_VERSION}: format "
                                 f"{s.get('format')!r}, version {s.get('version')!r}"
                                 + (" (version 1 states, from before elastic resume, cannot be continued)"
                                    if s.get("version") == 1 else ""))
            diff = {k: (s.get(k), v) for k, v in mine.items() if s.get(k) != v}
            if diff:
                raise ValueError("cannot resume: the state was taken with other settings or shards: "
                                 + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        where = {(int(s["epoch"]), int(s["position"])) for s in states}
        if len(where) > 1:
            raise ValueError("cannot resume: the ranks' states disagree ("
                             + ", ".join(f"rank {s.get('rank')}: epoch {s['epoch']} position {s['position']}"
                                         for s in states)
                             + "); every rank must have consumed the same number of batches (drop_last or pad)")
        epoch, position = where.pop()
        if position >= self._epoch_length(epoch):
            epoch, position = epoch + 1, 0
        self.epoch, self._start, self._base, self._done = epoch, position, position, 0


# ---------------------------------------------------------------------------------------------- dataset
class TokenDataset(OrderedStream):
    """An ``IterableDataset`` over the Parquet or WebDataset output of ``gq tokenize`` (local or any fsspec URL).

    Yields dicts with ``tokens`` (int64 ``[G, h, w]``, or ``[G*h*w]`` with ``flatten=True``), ``key``, the pass-through
    fields (``source``, ``member``, ``width``, ``height``, ``txt``/``json``/``cls`` ...) and, with ``latents=True``,
    ``latent`` (float32 ``[C, h, w]``). With ``batch_size`` it yields collated batches instead (use it with
    ``DataLoader(batch_size=None)`` or :class:`TokenLoader`; required for exact resume with workers).

    ``shuffle_window`` (samples) bounds the sample-level shuffle and the decoded samples a worker holds; ``block_rows``
    splits Parquet row groups into smaller shuffle blocks (better mixing, each row group read once per piece).
    ``bucket_by_shape`` makes every batch one ``token_shape``; ``collate_fn=pad_collate`` pads mixed shapes instead.
    ``columns`` keeps only those pass-through fields (Parquet reads only those columns); ``retries`` retries transient
    read failures; ``cache_dir``/``cache_bytes`` copy remote shards into a node-local, size-bounded cache.
    ``footer_cache``: shards without commit records are described from their Parquet footers, read once per node
    into a summary under ``$GQ_CACHE/footers`` (see :mod:`gq_pipeline.footer_cache`):
    None caches remote shard sets, True local ones too, False never, a string is the folder.
    ``rank``/``world_size`` default to torch.distributed's when it is initialized (else 0/1). Call :meth:`set_epoch`
    before each epoch. See the module docstring for the order, the split and the elastic resume.
    """

    def __init__(self, url: str | list[str], format: str = "auto", shuffle: bool = True, seed: int = 0,
                 shuffle_window: int = DEFAULT_WINDOW, rank: int | None = None, world_size: int | None = None, *,
                 batch_size: int | None = None, flatten: bool = False, latents: bool = False, drop_last: bool = False,
                 pad: bool = False, block_rows: int | None = DEFAULT_BLOCK_ROWS, storage_options: dict | None = None,
                 bucket_by_shape: bool = False, collate_fn=None, latent_dtype: torch.dtype = torch.float32,
                 columns: list[str] | None = None, retries: int = 3, cache_dir: str | None = None,
                 cache_bytes: int | None = None, buffer_size: int | None = None,
                 footer_cache: str | bool | None = None):
        super().__init__()
        if bucket_by_shape and not batch_size:
            raise ValueError("bucket_by_shape needs batch_size: the buckets are batches of one token_shape")
        if buffer_size is not None:  # the name of the window before the order became global
            shuffle_window = buffer_size
        if shuffle_window < 1 or (block_rows is not None and block_rows < 1):
            raise ValueError(f"shuffle_window and block_rows must be >= 1, got {shuffle_window}, {block_rows}")
        self.footer_cache = resolve_footer_cache(footer_cache)
        self.shards: ShardSet = list_shards(url, format, storage_options, footer_cache=self.footer_cache)
        self.fingerprint = self.shards.check_fingerprints()
        self.codebook_size = self.shards.codebook_size
        self.format = self.shards.format
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.shuffle_window, self.block_rows = int(shuffle_window), block_rows
        self.flatten, self.latents = flatten, latents
        self.bucket_by_shape, self.collate_fn, self.latent_dtype = bool(bucket_by_shape), collate_fn, latent_dtype
        self._shape_ids: list[np.ndarray] | None = None
        self._fields: tuple[str, ...] | None | bool = False  # False: not computed yet
        self.columns, self.retries = (None if columns is None else list(columns)), int(retries)
        self.cache = ShardCache(cache_dir, cache_bytes) if cache_dir else None
        self._buckets: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        if latents and self.format == "parquet" and any("latent" not in s.columns for s in self.shards.shards):
            bad = next(s for s in self.shards.shards if "latent" not in s.columns)
            raise ShardError(f"{self.shards.url(bad)}: no 'latent' column (tokenize with --latents to store latents)")
        self._init_stream(rank, world_size, batch_size, drop_last, pad)
        self._orders: OrderedDict[int, EpochOrder] = OrderedDict()
        if self.bucket_by_shape:  # read once here, so DataLoader workers inherit it
            self._row_shapes()
        n, r = self.shards.num_samples, self.world_size
        if r > 1 and n % r and not (drop_last or pad):
            warnings.warn(f"{n} samples do not split evenly over {r} ranks (counts differ by one); under DDP pass "
                          "drop_last=True or pad=True so every rank runs the same number of steps", stacklevel=2)

    @property
    def model_fingerprints(self) -> set[str | None]:
        return {s.model_fingerprint for s in self.shards.shards}

    def order(self, epoch: int) -> EpochOrder:
        """The global order of ``epoch`` (cached: building it is O(blocks))."""
        if epoch not in self._orders:
            self._orders[epoch] = EpochOrder(self.shards, self.seed, epoch, self.shuffle, self.shuffle_window,
                                             self.block_rows)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    @property
    def num_samples(self) -> int:
        return self.shards.num_samples if self.bucket_by_shape else super().num_samples

    def _epoch_length(self, epoch: int) -> int:
        return len(self._bucketed(epoch)[1]) if self.bucket_by_shape else self.shards.num_samples

    def _row_shapes(self) -> list[np.ndarray]:
        """Per shard, a small shape id per row (ids index ``self.shapes``)."""
        if self._shape_ids is None:
            per_shard = [row_token_shapes(self.shards, s) for s in self.shards.shards]
            allrows = np.concatenate(per_shard) if per_shard else np.zeros((0, 3), np.int64)
            self.shapes, ids = np.unique(allrows, axis=0, return_inverse=True)
            ids = ids.reshape(-1)
            cuts = np.cumsum([len(x) for x in per_shard])[:-1]
            self._shape_ids = np.split(ids, cuts)
        return self._shape_ids

    def _bucketed(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order position of each bucketed position, batch starts, batch stops): inside each window the samples
        are grouped by shape (keeping the window's random order), cut into batches of ``batch_size`` (the last of a
        shape may be short), and the window's batches are permuted so shapes interleave."""
        if epoch in self._buckets:
            return self._buckets[epoch]
        order, b = self.order(epoch), self.batch_size
        ids = np.concatenate(self._row_shapes()) if self.shards.shards else np.zeros(0, np.int64)
        row0 = np.concatenate([[0], np.cumsum([s.num_rows for s in self.shards.shards])])
        group0 = [np.concatenate([[0], np.cumsum(s.row_groups)]) for s in self.shards.shards]
        block0 = np.array([row0[s] + group0[s][g] + lo for s, g, lo, _ in order.blocks.tolist()], dtype=np.int64)
        perm: list[np.ndarray] = []
        for k in range(len(order.window_starts) - 1):
            q = np.arange(order.window_starts[k], order.window_starts[k + 1])
            blk, row = order.locate(q, k)
            shape = ids[block0[blk] + row]
            by_shape = np.argsort(shape, kind="stable")  # keeps the window's random order inside each shape
            q, shape = q[by_shape], shape[by_shape]
            edges = []
            for sid in np.unique(shape):
                lo, hi = int(np.searchsorted(shape, sid)), int(np.searchsorted(shape, sid, side="right"))
                edges += [(a, min(a + b, hi)) for a in range(lo, hi, b)]
            pick = _permutation(len(edges), _key("buckets", self.seed, epoch, k)) if self.shuffle else \
                range(len(edges))
            perm += [q[edges[j][0]:edges[j][1]] for j in pick]
        flat = np.concatenate(perm) if perm else np.zeros(0, np.int64)
        sizes = np.array([len(p) for p in perm], dtype=np.int64)
        stops = np.cumsum(sizes)
        result = (flat, stops - sizes, stops)
        self._buckets[epoch] = result
        while len(self._buckets) > 2:
            self._buckets.popitem(last=False)
        return result

    def _item_plan(self, epoch: int):
        if not self.bucket_by_shape:
            return None
        _, starts, stops = self._bucketed(epoch)
        return starts, stops

    def _locate(self, epoch, p):
        if self.bucket_by_shape:
            p = self._bucketed(epoch)[0][p]
        q = p % max(1, self.shards.num_samples)  # pad: positions past N wrap to the start of the order
        zero = np.zeros(len(p), dtype=np.int64)
        return zero, zero + epoch, q, self.order(epoch).windows_of(q)

    def _read(self, source: int, epoch: int, window: int, q: np.ndarray, readers: dict) -> list[dict[str, Any]]:
        """Samples at positions ``q`` (one window), reading each block once, blocks in shard order."""
        order = self.order(epoch)
        reader = readers.get(source)
        if reader is None:
            reader = readers[source] = BlockReader(self.shards, self.latents, self.columns, self.retries, self.cache)
        blocks, rows = order.locate(q, window)
        shards = self.shards.shards
        out: list[dict[str, Any] | None] = [None] * len(q)
        meta = order.blocks[blocks]
        sort = np.lexsort((rows, meta[:, 2], meta[:, 1], meta[:, 0]))
        i = 0
        while i < len(sort):
            j = i
            s, g = int(meta[sort[i], 0]), int(meta[sort[i], 1])
            while j < len(sort) and meta[sort[j], 0] == s and meta[sort[j], 1] == g:
                j += 1
            idx = sort[i:j]
            rows_in_group = (meta[idx, 2] + rows[idx]).tolist()  # row inside the row group (or tar)
            wanted = sorted(set(rows_in_group))
            got = dict(zip(wanted, reader.take(shards[s], g, wanted)))
            for x, r in zip(idx.tolist(), rows_in_group):
                out[x] = dict(got[r])
            i = j
        return out  # type: ignore[return-value]

    @property
    def fields(self) -> tuple[str, ...] | None:
        """The pass-through fields of the whole output (the union over its shards, after ``columns``), which every
        sample carries, ``None`` where its shard lacks the column; None when unknown before reading (WebDataset
        tars describe their fields only in their members: then a batch has the union of its own samples' fields)."""
        if self._fields is False:
            self._fields = None
            if self.format == "parquet":
                union = dict.fromkeys(c for s in self.shards.shards for c in s.columns if c not in TOKEN_COLUMNS)
                keep = None if self.columns is None else set(self.columns) | {"key"}
                self._fields = tuple(c for c in union if keep is None or c in keep)
        return self._fields

    def _finish(self, sample: dict[str, Any], source: int) -> dict[str, Any]:
        for f in self.fields or ():
            sample.setdefault(f, None)  # one schema for the output, even when its shards' columns differ
        if self.flatten:
            sample["tokens"] = sample["tokens"].reshape(-1)
        if "latent" in sample and self.latent_dtype != sample["latent"].dtype:
            sample["latent"] = sample["latent"].to(self.latent_dtype)  # float16 is the stored precision: exact
        return sample

    def _settings(self) -> dict[str, Any]:
        out = {"seed": self.seed, "shuffle": self.shuffle, "shuffle_window": self.shuffle_window,
               "block_rows": self.block_rows, "num_samples": self.shards.num_samples,
               "shards": self.shards.digest()}
        if self.bucket_by_shape:  # the position then counts batches of this size
            out.update(bucket_by_shape=True, batch_size=self.batch_size)
        return out


class TokenLoader(DataLoader):
    """A DataLoader over a :class:`TokenDataset` (or ``TokenMixture``) that counts what it hands out, so
    ``state_dict()`` works with worker processes. Batching is the dataset's; workers are never persistent, because a
    persistent worker would keep the epoch and resume point of its first iterator."""

    def __init__(self, dataset: OrderedStream, num_workers: int = 0, **kwargs: Any):
        if not isinstance(dataset, OrderedStream):
            raise TypeError("TokenLoader takes a TokenDataset or a TokenMixture")
        for bad in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
            if bad in kwargs:
                raise TypeError(f"TokenLoader: {bad} belongs to TokenDataset (batching and order are the dataset's)")
        if kwargs.get("persistent_workers"):
            raise ValueError("TokenLoader: persistent_workers would keep the first epoch's order and resume point")
        if kwargs.get("in_order") is False:
            raise ValueError("TokenLoader: in_order=False makes the consumed samples unknowable; resume needs it")
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)

    def __iter__(self):
        ds: OrderedStream = self.dataset
        if self.num_workers == 0:  # the dataset runs (and counts) in this process
            yield from super().__iter__()
            return
        iterator = super().__iter__()  # workers start here with the dataset's current epoch and resume point
        ds._base, ds._start, ds._done = ds._start, 0, 0
        for _item in iterator:
            ds._done += 1
            yield _item

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        self.dataset.load_state_dict(state)
