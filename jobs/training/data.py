"""Training data: images from folders/globs, WebDataset tar shards, Parquet image-bytes columns (local or any fsspec
URL), scikit-image's sample images, or a list of in-memory images.

Design (what makes resume exact and sharding duplicate-free):

* An **index** of sample references is built once (on rank 0, broadcast to the others): one entry per image file,
  per image member of an uncompressed tar shard (byte offset and size, so a member is read with one ranged read),
  per Parquet row. Entries are grouped in *blocks* (a file, a tar shard, a Parquet row group).
* The **epoch order** is a pure function of (seed, epoch): blocks are permuted, and samples within a block (shuffle is
  explicit, unlike the reference's loader). Rank ``r`` of ``W`` takes epoch positions ``r, r+W, r+2W, ...`` (equal
  counts, drop-last), so no two ranks ever see the same position; rank-local batch ``k`` holds its positions
  ``[k*B, (k+1)*B)``.
* The stream is a sequence of **global batch numbers** ``g = 0, 1, 2, ...`` (epoch ``g // batches_per_epoch``).
  DataLoader worker ``w`` of ``n`` produces ``g0 + w, g0 + w + n, ...``; the DataLoader hands them out round-robin,
  i.e. in order. Resuming needs only ``g0`` = batches consumed so far.
* Random crops and flips draw from an RNG seeded by (seed, epoch, position): independent of workers and restarts.
* An unreadable image is **skipped** (the batch is one smaller), reported with the batch and counted by the trainer.
  A batch with no readable image takes the next readable one of the rank's epoch order, so every rank always gets
  a batch and collective calls stay in step.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gq_pipeline.preprocess import (check_policy, decode_image, reference_crop_offsets, reference_resize_crop,
                                    reference_resized_size, reference_rgb, resize_crop, shorter_side_size,
                                    to_model_input, to_rgb)
from gq_pipeline.records import IMAGE_EXTENSIONS

__all__ = ["IMAGE_EXTS", "SampleIndex", "build_index", "ImageTransform", "SampleReader", "BatchStream",
           "make_loader", "load_images", "expand_paths"]

log = logging.getLogger(__name__)

IMAGE_EXTS = tuple("." + e for e in IMAGE_EXTENSIONS)  # the tokenizer's list: train on what it can tokenize
TAR_EXTS = (".tar",)
PARQUET_EXTS = (".parquet", ".pq")
SKIMAGE_DEFAULT = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "colorwheel", "cat",
                   "logo", "camera", "moon")



def _ext(name: str) -> str:
    base = name.rsplit("/", 1)[-1].lower()
    return "." + base.rsplit(".", 1)[-1] if "." in base else ""


# ---------------------------------------------------------------------------------------------------------- index
@dataclass
class SampleIndex:
    """Sample references and their block ids. A reference is one of ``("file", url)``,
    ``("tar", url, offset, size, member)``, ``("parquet", url, row_group, row)``, ``("mem", i)``, ``("skimage", name)``.
    """

    refs: list[tuple] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.refs)

    def add_block(self, refs: Sequence[tuple]) -> None:
        b = (self.blocks[-1] + 1) if self.blocks else 0
        self.refs.extend(refs)
        self.blocks.extend([b] * len(refs))

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for r in self.refs:
            h.update(repr(r).encode())
        return h.hexdigest()[:16]

    @staticmethod
    def key(ref: tuple) -> str:
        """A readable name for logs (path, tar member, parquet row)."""
        kind = ref[0]
        if kind == "file":
            return ref[1]
        if kind == "tar":
            return f"{ref[1]}::{ref[4]}"
        if kind == "parquet":
            return f"{ref[1]}::rg{ref[2]}/row{ref[3]}"
        return f"{kind}:{ref[1]}"


def _fs_for(url: str, storage_options: Mapping[str, Any] | None):
    from gq_model.storage import url_to_fs

    return url_to_fs(url, storage_options)


def _unstrip(fs, path: str, original: str) -> str:
    """Back to a URL carrying the protocol when the input had one (fsspec strips it)."""
    if "://" in original:
        proto = original.split("://", 1)[0]
        return path if "://" in path else f"{proto}://{path}"
    return path


def expand_paths(spec: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """A folder (recursive), a glob, a brace pattern (``shard-{000..009}.tar``) or a file -> sorted file URLs of
    images, tar shards and Parquet files, listed exactly as ``gq tokenize`` lists
    (``gq_pipeline.planning.list_input_files``: the tokenizer's extensions, hidden names and non-regular files
    skipped), so a model trains on what the pipeline tokenizes."""
    from gq_pipeline.planning import list_input_files

    try:
        return list_input_files(spec, dict(storage_options) if storage_options else None)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"training data {spec!r} does not exist (no file, folder or glob match): {e}") \
            from None


def _index_tar(url: str, storage_options) -> list[tuple]:
    """One ref per sample of a plain tar, grouped exactly as ``gq tokenize`` groups it
    (:func:`gq_pipeline.sources.group_tar_members`, the image picked by ``image_member``), kept as the image
    member's data offset and size for random access. Samples the tokenizer would record as errors (no image, a
    link, a name no key can be made from) have no image to train on and are left out."""
    from gq_pipeline.records import is_utf8
    from gq_pipeline.sources import group_tar_members, image_member

    if url.lower().endswith((".tar.gz", ".tgz")):
        raise ValueError(f"{url}: compressed tar shards cannot be indexed for random access; use plain .tar shards")
    fs, path = _fs_for(url, storage_options)
    refs = []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
        for group in group_tar_members(tf, lambda m: m if m.isfile() else None):
            ext = image_member(group.members)
            usable = group.bad_name is None and is_utf8(group.prefix) and None not in group.members.values()
            if usable and ext is not None:
                m = group.members[ext]
                refs.append(("tar", url, int(m.offset_data), int(m.size), m.name))
    return refs


def _index_parquet(url: str, column: str, storage_options) -> list[list[tuple]]:
    import pyarrow.parquet as pq

    fs, path = _fs_for(url, storage_options)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if column not in pf.schema_arrow.names:
            raise ValueError(f"{url}: no column {column!r} (columns: {pf.schema_arrow.names}); set data.image_column")
        return [[("parquet", url, rg, i) for i in range(pf.metadata.row_group(rg).num_rows)]
                for rg in range(pf.metadata.num_row_groups)]


def build_index(spec: Any, image_column: str = "image", storage_options: Mapping[str, Any] | None = None,
                memory: Sequence[Any] | None = None) -> SampleIndex:
    """Index the sources of ``spec`` (a string or list of strings; ``"skimage:"`` or ``"skimage:a,b"``), or of an
    in-memory image list (``memory``: PIL images, HxW[x3|4] uint8 arrays, [3,H,W] tensors in [-1,1], or bytes)."""
    index = SampleIndex()
    if memory is not None:
        for i in range(len(memory)):
            index.add_block([("mem", i)])
        return index
    if spec is None:
        raise ValueError("data.train is not set (a folder, glob, tar/parquet pattern, list of them, or 'skimage:')")
    specs = [spec] if isinstance(spec, str) else list(spec)
    for s in specs:
        s = os.fspath(s)
        if s.startswith("skimage:"):
            names = [n for n in s[len("skimage:"):].split(",") if n] or list(SKIMAGE_DEFAULT)
            for n in names:
                index.add_block([("skimage", n)])
            continue
        for url in expand_paths(s, storage_options):
            ext = _ext(url)
            if ext in IMAGE_EXTS:
                index.add_block([("file", url)])
            elif ext in TAR_EXTS or url.lower().endswith((".tar.gz", ".tgz")):
                index.add_block(_index_tar(url, storage_options))
            elif ext in PARQUET_EXTS:
                for rg in _index_parquet(url, image_column, storage_options):
                    index.add_block(rg)
            else:
                raise ValueError(f"{url}: not an image ({', '.join(IMAGE_EXTS)}), .tar shard or .parquet file")
    if len(index) == 0:
        raise ValueError(f"no images found in {spec!r}")
    return index


# ---------------------------------------------------------------------------------------------------------- reading
class SampleReader:
    """Reads one reference to a PIL image. Keeps a few tar handles and Parquet row groups open per process.

    ``preprocess`` is the decode policy of ``gq_pipeline.preprocess`` (``"gq"`` or ``"reference"``: no EXIF
    transposition, alpha dropped), the same one ``gq tokenize --preprocess`` uses."""

    def __init__(self, image_column: str = "image", storage_options: Mapping[str, Any] | None = None,
                 memory: Sequence[Any] | None = None, cache: int = 4, preprocess: str = "gq"):
        check_policy(preprocess)
        self.preprocess = preprocess
        self.image_column, self.storage_options, self.memory = image_column, dict(storage_options or {}), memory
        self._handles: collections.OrderedDict = collections.OrderedDict()
        self._groups: collections.OrderedDict = collections.OrderedDict()
        self._cache = cache
        self._skimage: dict[str, Image.Image] = {}
        self._pid = os.getpid()

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_handles"], d["_groups"] = collections.OrderedDict(), collections.OrderedDict()
        return d

    def _check_fork(self) -> None:
        if self._pid != os.getpid():  # handles inherited through fork are not ours to use
            self._handles, self._groups, self._pid = collections.OrderedDict(), collections.OrderedDict(), os.getpid()

    def _lru(self, cache: collections.OrderedDict, key, make):
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        value = make()
        cache[key] = value
        while len(cache) > self._cache:
            _, old = cache.popitem(last=False)
            if hasattr(old, "close"):
                old.close()
        return value

    def read_bytes(self, ref: tuple) -> bytes:
        self._check_fork()
        kind = ref[0]
        if kind == "file":
            fs, path = _fs_for(ref[1], self.storage_options)
            with fs.open(path, "rb") as f:
                return f.read()
        if kind == "tar":
            _, url, offset, size, _name = ref
            f = self._lru(self._handles, url, lambda: self._open(url))
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise OSError(f"short read ({len(data)} of {size} bytes)")
            return data
        if kind == "parquet":
            _, url, rg, row = ref
            values = self._lru(self._groups, (url, rg), lambda: self._read_group(url, rg))
            v = values[row]
            if isinstance(v, dict):
                if v.get("bytes") is not None:
                    return v["bytes"]
                if v.get("path"):
                    fs, path = _fs_for(v["path"], self.storage_options)
                    with fs.open(path, "rb") as f:
                        return f.read()
            if isinstance(v, str):  # a path column
                fs, path = _fs_for(v, self.storage_options)
                with fs.open(path, "rb") as f:
                    return f.read()
            if v is None:
                raise ValueError("null image cell")
            return bytes(v)
        raise ValueError(f"cannot read bytes of a {kind!r} reference")

    def _open(self, url: str):
        fs, path = _fs_for(url, self.storage_options)
        return fs.open(path, "rb")

    def _read_group(self, url: str, rg: int) -> list:
        import pyarrow.parquet as pq

        fs, path = _fs_for(url, self.storage_options)
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(rg, columns=[self.image_column])
        return table.column(0).to_pylist()

    def read(self, ref: tuple) -> Image.Image:
        kind = ref[0]
        if kind == "mem":
            return _to_pil(self.memory[ref[1]], self.preprocess)
        if kind == "skimage":  # a handful of small bundled images: keep them decoded
            if ref[1] not in self._skimage:
                import skimage.data

                self._skimage[ref[1]] = _to_pil(getattr(skimage.data, ref[1])())
            return self._skimage[ref[1]]
        return _decode(self.read_bytes(ref), self.preprocess)


def _decode(data: bytes, policy: str = "gq") -> Image.Image:
    """The tokenizer's own decode (EXIF, colour policy, bomb guard): train on the pixels ``gq tokenize`` will see.
    Decodes fully, so truncated files fail here and are counted as corrupt."""
    return decode_image(data, policy=policy)


def _to_pil(item: Any, policy: str = "gq") -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _decode(bytes(item), policy)
    if isinstance(item, torch.Tensor):
        t = item.detach().cpu().float()
        if t.dim() == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)
        item = ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    if isinstance(item, np.ndarray):
        a = item
        if a.dtype == np.bool_:
            a = a.astype(np.uint8) * 255
        elif a.dtype != np.uint8:
            a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[..., 0]
        return Image.fromarray(a)
    raise TypeError(f"unsupported in-memory image type {type(item).__name__}")


# ---------------------------------------------------------------------------------------------------------- transform
@dataclass
class ImageTransform:
    """Resize the shorter side to ``resize`` (0: none; always at least ``size``), crop ``size`` (center or random),
    optional horizontal flip; -> float32 ``[3, size, size]`` in [-1, 1].

    Colour conversion, resize (PIL bicubic, same rounding) and centre crop are ``gq_pipeline.preprocess``'s, so with
    ``resize=None`` and a centre crop this equals ``preprocess_image(data, size)`` exactly: a model is trained on
    the same preprocessing that ``gq tokenize`` applies. ``preprocess="reference"`` uses the reference policy's colour
    step, resize (PIL bilinear, longer side truncated) and centre-crop offsets instead, so that with ``resize=None``
    and a centre crop it equals ``preprocess_image(data, size, policy="reference")`` (pair it with a
    ``SampleReader(preprocess="reference")``).
    """

    size: int
    resize: int | None = None
    crop: str = "center"
    flip: bool = False
    preprocess: str = "gq"

    def __post_init__(self):
        check_policy(self.preprocess)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        if self.preprocess == "reference":
            return self._finish(self._reference(reference_rgb(img), rng), rng)
        img = to_rgb(img)
        w, h = img.size
        target = self.size if self.resize is None else int(self.resize)
        if target <= 0:
            target = min(w, h)
        target = max(target, self.size)
        s = self.size
        if target == s and not (self.crop == "random" and rng is not None):
            img = resize_crop(img, s)  # the tokenizer's own resize + centre crop, very elongated images included
        else:
            if min(w, h) != target:
                w, h = shorter_side_size(w, h, target)
                img = img.resize((w, h), Image.BICUBIC)
            if self.crop == "random" and rng is not None:
                top = int(rng.integers(0, h - s + 1))
                left = int(rng.integers(0, w - s + 1))
            else:
                top, left = (h - s) // 2, (w - s) // 2
            img = img.crop((left, top, left + s, top + s))
        return self._finish(img, rng)

    def _reference(self, img: Image.Image, rng: np.random.Generator | None) -> Image.Image:
        """The reference policy's resize and crop (a random crop of the same resized image when asked)."""
        w, h = img.size
        s = self.size
        target = s if self.resize is None else int(self.resize)
        target = max(min(w, h) if target <= 0 else target, s)
        if target == s and not (self.crop == "random" and rng is not None):
            return reference_resize_crop(img, s)
        if min(w, h) != target:
            w, h = reference_resized_size(w, h, target)
            img = img.resize((w, h), Image.BILINEAR)
        if self.crop == "random" and rng is not None:
            top = int(rng.integers(0, h - s + 1))  # the gq path's draw order
            left = int(rng.integers(0, w - s + 1))
        else:
            left, top = reference_crop_offsets(w, h, s)
        return img.crop((left, top, left + s, top + s))

    def _finish(self, img: Image.Image, rng: np.random.Generator | None) -> torch.Tensor:
        a = np.array(img, dtype=np.uint8)
        if self.flip and rng is not None and rng.random() < 0.5:
            a = a[:, ::-1]
        return to_model_input(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1))


# ---------------------------------------------------------------------------------------------------------- stream
class BatchStream(IterableDataset):
    """Infinite, deterministic, rank- and worker-sharded stream of batches (see module docstring)."""

    def __init__(self, index: SampleIndex, ids: Sequence[int], batch_size: int, transform: ImageTransform,
                 reader: SampleReader, rank: int = 0, world_size: int = 1, seed: int = 23, shuffle: bool = True,
                 repeat: int = 1, start_batch: int = 0):
        super().__init__()
        self.blocks = np.asarray(index.blocks, dtype=np.int64)
        self.refs = index.refs
        self.ids = np.asarray(ids, dtype=np.int64)
        self.batch_size, self.transform, self.reader = int(batch_size), transform, reader
        self.rank, self.world, self.seed, self.shuffle = int(rank), int(world_size), int(seed), bool(shuffle)
        self.repeat, self.start_batch = max(1, int(repeat)), int(start_batch)
        n = len(self.ids) * self.repeat
        self.per_rank = n // self.world
        self.batches_per_epoch = self.per_rank // self.batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"{len(self.ids)} training images x repeat {self.repeat} cannot fill one batch of "
                             f"{self.batch_size} on each of {self.world} ranks; lower data.batch_size or raise "
                             f"data.repeat")
        self._epoch, self._order = None, None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Reference ids in epoch order (all ranks), a pure function of (seed, epoch)."""
        ids = np.tile(self.ids, self.repeat)
        if not self.shuffle:
            return ids
        rng = np.random.default_rng([self.seed, epoch])
        nblocks = int(self.blocks.max()) + 1 if len(self.blocks) else 1
        # every repetition of a block is its own block, so repeats of one image do not end up side by side
        block = self.blocks[ids] + np.repeat(np.arange(self.repeat), len(self.ids)) * nblocks
        block_rank = rng.permutation(nblocks * self.repeat)
        tie = rng.random(len(ids))
        return ids[np.lexsort((tie, block_rank[block]))]

    def _rank_order(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            self._order = self.epoch_order(epoch)[self.rank::self.world][: self.per_rank]
            self._epoch = epoch
        return self._order

    def _load(self, epoch: int, j: int) -> tuple[torch.Tensor | None, str | None, int]:
        rid = int(self._rank_order(epoch)[j])
        ref = self.refs[rid]
        pos = self.rank + j * self.world  # position in the epoch order: unique across ranks
        rng = np.random.default_rng([self.seed, epoch, pos, 7])
        try:
            return self.transform(self.reader.read(ref), rng), None, rid
        except Exception as e:  # unreadable / corrupt / truncated: skip it, never crash the run
            return None, f"{SampleIndex.key(ref)} ({type(e).__name__}: {str(e)[:120]})", rid

    def make_batch(self, g: int) -> dict[str, Any]:
        epoch, k = divmod(int(g), self.batches_per_epoch)
        images, bad, ids = [], [], []
        for j in range(k * self.batch_size, (k + 1) * self.batch_size):
            t, err, rid = self._load(epoch, j)
            if err is None:
                images.append(t)
                ids.append(rid)
            else:
                bad.append(err)
        j = (k + 1) * self.batch_size
        tries = 0
        while not images:  # the whole batch was unreadable: take the next readable image of this rank's order
            if tries >= self.per_rank:
                raise RuntimeError(f"rank {self.rank}: no readable image in the training set (last: {bad[-1:]})")
            t, err, rid = self._load(epoch, j % self.per_rank)
            if err is None:
                images.append(t)
                ids.append(rid)
            else:
                bad.append(err)
            j, tries = j + 1, tries + 1
        return {"image": torch.stack(images), "ids": ids, "batch": int(g), "epoch": epoch, "corrupt": bad}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        g = self.start_batch + wid
        while True:
            yield self.make_batch(g)
            g += workers


def make_loader(stream: BatchStream, num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A DataLoader over the stream. Its own generator keeps the global torch RNG untouched (exact resume)."""
    return DataLoader(stream, batch_size=None, num_workers=int(num_workers),
                      generator=torch.Generator().manual_seed(int(seed)),
                      prefetch_factor=2 if num_workers > 0 else None, persistent_workers=False)


def load_images(index: SampleIndex, ids: Sequence[int], transform: ImageTransform, reader: SampleReader,
                limit: int | None = None) -> tuple[torch.Tensor | None, list[str]]:
    """Decode ``ids`` in order (center crop, no flip): the held-out monitoring batch. Unreadable ones are skipped."""
    images, bad = [], []
    for i in ids:
        if limit is not None and len(images) >= limit:
            break
        ref = index.refs[int(i)]
        try:
            images.append(transform(reader.read(ref), None))
        except Exception as e:
            bad.append(f"{SampleIndex.key(ref)} ({type(e).__name__}: {e})")
    return (torch.stack(images) if images else None), bad
