"""TokenMixture: several token datasets mixed by weight, with the guarantees of TokenDataset (exactly once, elastic
exact resume).

Why it is built this way: a mixture is just another global order, so ranks, workers, batching and the resume state
``(epoch, position)`` come unchanged from :class:`~gq_pipeline.dataset.OrderedStream`. Mixture epoch ``e`` has ``M``
positions, cut into chunks of ``CHUNK``. Each chunk gets an exact number of slots per source (cumulative targets
``round(w_i * position)``, allocated chunk by chunk so every prefix of the epoch is within a couple of samples of the
weights), and the slots are permuted inside the chunk by ``(seed, e, chunk)``. Source ``i``'s ``c``-th slot in the
whole run takes the ``c``-th sample of that source's own endless sequence of epochs (its global order for epoch
``c // N_i``), so every sample of a source appears exactly once per pass over that source, and a small source
weighted up simply starts its next pass (a new permutation). ``M`` defaults to one pass over the source that runs out
first (``min N_i / w_i``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from gq_pipeline.dataset import OrderedStream, TokenDataset, _key, _permutation, collate
from gq_pipeline.shards import FingerprintMismatchError

__all__ = ["TokenMixture"]

CHUNK = 4096


class TokenMixture(OrderedStream):
    """Mix :class:`TokenDataset` s by ``weights``: ``TokenMixture([ds_a, ds_b], weights=[0.7, 0.3], seed=0,
    batch_size=64)``. The sources give the shards and their own order settings (shuffle, window, seed, flatten,
    latents); their rank, world size and batching are not used: the mixture splits and batches. Each sample gets a
    ``dataset`` field (the source's index). A batch has the union of the sources' fields, ``None`` for a sample whose
    source lacks one.

    Sources must share one codebook (the same token id must mean the same codeword); ``allow_mixed_codebooks=True``
    lifts that for a model that learns several vocabularies and tells them apart with ``dataset``.
    """

    state_format = "gq.TokenMixture"

    def __init__(self, datasets: Sequence[TokenDataset], weights: Sequence[float], seed: int = 0,
                 num_samples: int | None = None, rank: int | None = None, world_size: int | None = None, *,
                 batch_size: int | None = None, drop_last: bool = False, pad: bool = False,
                 allow_mixed_codebooks: bool = False, collate_fn=None):
        super().__init__()
        self.sources = list(datasets)
        if not self.sources or len(self.sources) != len(weights):
            raise ValueError(f"give one weight per dataset: {len(self.sources)} dataset(s), {len(weights)} weight(s)")
        if not all(isinstance(d, TokenDataset) for d in self.sources):
            raise TypeError("TokenMixture mixes TokenDataset instances")
        if any(d.bucket_by_shape for d in self.sources):
            raise ValueError("TokenMixture does not bucket by shape: build the sources without bucket_by_shape "
                             "(use collate_fn=pad_collate on the mixture's batches instead)")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"weights must be positive, got {list(weights)}")
        self.weights = (w / w.sum()).tolist()
        self.seed, self.collate_fn = int(seed), collate_fn
        if not allow_mixed_codebooks:
            _check_one_codebook(self.sources)
        sizes = [d.shards.num_samples for d in self.sources]
        if num_samples is None:
            num_samples = min(int(n / wi) for n, wi in zip(sizes, self.weights))
        if num_samples < 1:
            raise ValueError("the mixture epoch would be empty (a source has no samples)")
        self.epoch_samples = int(num_samples)
        self.codebook_size = max((d.codebook_size or 0 for d in self.sources), default=0) or None
        self._fields = self.fields
        self._init_stream(rank, world_size, batch_size, drop_last, pad)
        self._targets = _chunk_targets(self.epoch_samples, self.weights, CHUNK)

    @property
    def per_epoch(self) -> list[int]:
        """Samples each source gives per mixture epoch."""
        return self._targets[-1].tolist()

    # -- the order
    def _epoch_length(self, epoch: int) -> int:
        return self.epoch_samples

    def _locate(self, epoch, p):
        p = p % self.epoch_samples
        src = np.empty(len(p), dtype=np.int64)
        count = np.empty(len(p), dtype=np.int64)
        chunks = p // CHUNK
        for k in np.unique(chunks):
            sel = chunks == k
            labels, occurrence = self._chunk(epoch, int(k))
            o = p[sel] - int(k) * CHUNK
            src[sel] = labels[o]
            count[sel] = self._targets[k][labels[o]] + occurrence[o]
        per_epoch = self._targets[-1]
        sizes = np.array([d.shards.num_samples for d in self.sources], dtype=np.int64)
        g = epoch * per_epoch[src] + count  # index in the source's endless stream of passes
        sep, q = g // sizes[src], g % sizes[src]
        win = np.empty(len(p), dtype=np.int64)
        for i in np.unique(src):
            for e in np.unique(sep[src == i]):
                sel = (src == i) & (sep == e)
                win[sel] = self.sources[int(i)].order(int(e)).windows_of(q[sel])
        return src, sep, q, win

    def _chunk(self, epoch: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Source label of each slot of chunk ``k`` and how many earlier slots of the chunk have the same label."""
        alloc = self._targets[k + 1] - self._targets[k]
        labels = np.repeat(np.arange(len(alloc)), alloc)[_permutation(int(alloc.sum()), _key("mix", self.seed,
                                                                                               epoch, k))]
        order = np.argsort(labels, kind="stable")
        first = np.concatenate([[0], np.cumsum(alloc)[:-1]])
        occurrence = np.empty(len(labels), dtype=np.int64)
        occurrence[order] = np.arange(len(labels)) - first[labels[order]]
        return labels, occurrence

    def _read(self, source: int, epoch: int, window: int, q: np.ndarray, readers: dict) -> list[dict[str, Any]]:
        return self.sources[source]._read(source, epoch, window, q, readers)

    @property
    def fields(self) -> tuple[str, ...]:
        """The pass-through fields the sources declare (see ``TokenDataset.fields``), which every sample carries."""
        return tuple(dict.fromkeys(f for d in self.sources for f in d.fields or ()))

    def _finish(self, sample: dict[str, Any], source: int) -> dict[str, Any]:
        sample = self.sources[source]._finish(sample, 0)
        for f in self._fields:
            sample.setdefault(f, None)
        sample["dataset"] = source
        return sample

    def _collate(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        return (self.collate_fn or collate)(batch)  # the union of the samples' fields, None where one lacks it

    def _settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "weights": self.weights, "num_samples": self.epoch_samples,
                "sources": [d._settings() for d in self.sources]}


def _chunk_targets(total: int, weights: list[float], chunk: int) -> np.ndarray:
    """Cumulative slots per source at each chunk boundary (``[chunks + 1, sources]``): each chunk's slots go to the
    sources furthest behind ``w_i * boundary`` (largest remainder), so counts never decrease and every prefix stays
    within a couple of samples of the weights."""
    w = np.asarray(weights)
    rows = [np.zeros(len(w), dtype=np.int64)]
    for k in range(math.ceil(total / chunk)):
        end = min(total, (k + 1) * chunk)
        have = rows[-1]
        need = np.maximum(w * end - have, 0)
        take = np.floor(need).astype(np.int64)
        seats = (end - int(have.sum())) - int(take.sum())
        if seats > 0:
            take[np.argsort(-(need - take), kind="stable")[:seats]] += 1
        elif seats < 0:  # floors overshoot only through the clipping above: take back from the largest
            for i in np.argsort(-take, kind="stable")[:-seats]:
                take[i] -= 1
        rows.append(have + take)
    return np.stack(rows)


def _check_one_codebook(sources: list[TokenDataset]) -> None:
    fps = {d.fingerprint for d in sources}
    if len(fps) > 1:
        desc = ", ".join(f"dataset {i}: {d.fingerprint or 'unrecorded'}" for i, d in enumerate(sources))
        raise FingerprintMismatchError(
            f"these datasets were made with different codebooks ({desc}); the same token id means a different "
            "codeword in each. Pass allow_mixed_codebooks=True only if the model tells them apart")
    if fps == {None}:
        models = set().union(*(d.model_fingerprints for d in sources))
        if len(models) > 1:
            raise FingerprintMismatchError(
                f"cannot verify that these datasets share one codebook: they record no codebook fingerprint and come "
                f"from {len(models)} models ({', '.join(sorted(map(str, models)))}); pass allow_mixed_codebooks=True "
                "to mix them anyway")
