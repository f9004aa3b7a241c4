"""``GQTokenizer``: gq as one stage of a pipeline the user already has (Ray Data, HF ``datasets``, WebDataset).

``gq tokenize`` owns its whole job (listing, units, commits). Many users instead have a pipeline that reads, joins
captions, filters and dedups, and want tokens as one more column. ``GQTokenizer`` is that column: a callable that
takes a batch (dict of numpy arrays or lists, ``pyarrow.Table`` or ``pandas.DataFrame``), finds the images in
``image_column`` and returns the same type with the columns of docs/plugin.md added. It uses the same preprocessing
(``gq_pipeline.preprocess``) and the same model call as ``gq tokenize``, so encoded images give the same tokens bit
for bit; a bad sample becomes an error value on its own row.

Device choice is deferred to the first call: HF ``Dataset.map(num_proc=N)`` pickles the tokenizer into forked
workers, and CUDA initialised in the parent before the fork breaks every child. Construction therefore only loads
the model on CPU; the process that first tokenizes picks CUDA when it is available (Ray's ``num_gpus=1`` actors see
their GPU) and moves the model there.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from gq_pipeline.preprocess import (CROP_MODES, DEFAULT_MAX_PIXELS, preprocess_array_uint8, preprocess_pil_uint8,
                                    preprocess_settings, preprocess_uint8, check_policy)
from gq_pipeline.records import FORMAT_VERSION, IMAGE_EXTENSIONS, SampleError, clean_message, tokens_fit_uint16
from gq_pipeline.worker import ModelRunner  # the one model call and batching policy, shared with gq tokenize

__all__ = ["GQTokenizer", "OUTPUT_COLUMNS", "PREPROCESS_MODES", "parse_error"]

# Columns GQTokenizer adds (docs/plugin.md, "Column contract"); latent/latent_shape only with latents=True.
OUTPUT_COLUMNS = ("tokens", "token_shape", "gq_error", "gq_model", "gq_width", "gq_height")
LATENT_COLUMNS = ("latent", "latent_shape")
PREPROCESS_MODES = ("gq", "reference", "none")
PRECISIONS = ("fp32", "bf16")


def parse_error(value: str) -> tuple[str, str]:
    """``"kind: message"`` (the ``gq_error`` column) -> (kind, message)."""
    kind, _, message = value.partition(": ")
    return kind, message


_FORKED = False  # set in a child forked from this process (HF num_proc workers)


def _mark_forked() -> None:
    global _FORKED
    _FORKED = True


os.register_at_fork(after_in_child=_mark_forked)

_NO_IMAGE = object()  # a WebDataset sample without an image member


@dataclass
class _Row:
    """One sample's result: tokens and latents (shaped) or an error, and the image size before preprocessing."""

    tokens: np.ndarray | None = None
    latent: np.ndarray | None = None
    error: str | None = None
    width: int = -1
    height: int = -1


def _error_text(e: SampleError) -> str:
    return f"{e.kind}: {clean_message(e.message)}"


class GQTokenizer:
    """Batch stage: images in ``image_column`` -> ``tokens``, ``token_shape``, ``gq_error`` (+ docs/plugin.md).

    ``model``: a ``GQModel``, a bundle path/URL, a built-in name (``"demo"``), or a reference ``.ckpt`` with
    ``preset=`` / ``config=`` (resolved by ``gq_model.loading.load_model``). ``device``: ``None`` picks CUDA
    when the calling process has it, at the first call. ``precision="bf16"`` runs the encoder in bf16 on CUDA (about
    2 % of tokens change; fp32 on CPU). ``preprocess="gq"`` applies gq's decode/colour/resize/crop policy to encoded
    bytes, HF image structs, PIL images and HWC uint8 arrays; ``"reference"`` the GQ reference pipeline's instead
    (``gq_pipeline.preprocess`` module doc); ``"none"`` takes uint8 ``[3,H,W]`` arrays that are already model input.
    ``batch_size`` bounds one model call (a larger incoming batch is split).
    """

    def __init__(self, model: Any, image_size: int = 256, crop: str = "center", image_column: str = "image",
                 precision: str = "fp32", device: Any = None, latents: bool = False, preprocess: str = "gq", *,
                 batch_size: int = 64, max_pixels: int = DEFAULT_MAX_PIXELS, config: str | None = None,
                 preset: str | None = None, trust_checkpoint: bool = False, storage_options: dict | None = None):
        from gq_model.loading import load_model

        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
        if batch_size < 1 or max_pixels < 1:
            raise ValueError("batch_size and max_pixels must be positive")
        policy = "reference" if preprocess == "reference" else "gq"
        check_policy(policy, crop)
        gq = load_model(model, config=config, preset=preset, trust_checkpoint=trust_checkpoint,
                        storage_options=storage_options)
        factor = gq.downsample_factor
        if image_size <= 0 or image_size % factor:
            raise ValueError(f"image_size {image_size} is not a positive multiple of the model's downsampling factor "
                             f"{factor}")
        if gq.config.arch == "vit":
            fixed = int(gq.config.encoder["image_size"])
            if image_size != fixed or crop != "center":
                raise ValueError(f"this ViT model takes {fixed}x{fixed} images only: use image_size={fixed}, "
                                 f"crop='center'")
        self.model = gq.eval()
        self.image_size, self.crop, self.image_column = int(image_size), crop, image_column
        self.precision, self.latents, self.preprocess = precision, bool(latents), preprocess
        self.batch_size, self.max_pixels = int(batch_size), int(max_pixels)
        self.storage_options = storage_options
        self.requested_device = None if device is None else str(device)
        self.token_dtype = np.uint16 if tokens_fit_uint16(gq.config.codebook_size) else np.int32
        self.model_fingerprint = gq.model_fingerprint
        self.codebook_fingerprint = gq.fingerprint
        self.preprocess_record = preprocess_settings(gq, image_size, crop, precision, max_pixels, policy)
        self.policy = policy
        self._device = None  # resolved by the first call, in the process that runs the model
        self._model_runner: ModelRunner | None = None  # made with the device

    # ------------------------------------------------------------------ identity
    @property
    def metadata(self) -> dict[str, str]:
        """The ``gq.*`` fingerprints and settings (as in a token shard's schema metadata, without ``gq.unit_id``)."""
        import json

        c = self.model.config
        return {"gq.format_version": str(FORMAT_VERSION), "gq.model_fingerprint": self.model_fingerprint,
                "gq.codebook_fingerprint": self.codebook_fingerprint, "gq.codebook_size": str(c.codebook_size),
                "gq.group": str(c.group), "gq.seed": str(c.seed), "gq.beta": repr(float(c.beta)), "gq.arch": c.arch,
                "gq.preprocess": json.dumps(self.preprocess_record, sort_keys=True)}

    @property
    def device(self):
        """The torch device the model runs on (``None`` until the first call picks one)."""
        return self._device

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (HF ``num_proc`` workers, Ray actors) with the weights on CPU and the device unresolved, so an
        unpickling process never touches a GPU it was not meant to."""
        state = dict(self.__dict__)
        if self._device is not None and self._device.type != "cpu":
            state["model"] = copy.deepcopy(self.model).cpu()
        state["_device"] = None
        state["_model_runner"] = None
        return state

    def _ready(self):
        if self._device is None:
            import torch

            if _FORKED:
                # A forked copy (HF num_proc): the parent's OpenMP pool does not survive fork, and a parallel
                # region entered with several threads here can hang forever. One thread per worker process.
                torch.set_num_threads(1)

            if self.requested_device is not None:
                device = torch.device(self.requested_device)
            else:
                device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.model = self.model.to(device).eval()
            self._device = device
        return self._device

    def _runner(self) -> ModelRunner:
        """The model on its device with gq tokenize's batching policy, made at the first batch (the device is
        chosen in the process that runs the batches). Its batch size, once halved for memory, stays halved."""
        if self._model_runner is None:
            self._ready()
            self._model_runner = ModelRunner(self.model, batch_size=self.batch_size, precision=self.precision,
                                             latents=self.latents)
        return self._model_runner

    # ------------------------------------------------------------------ per sample
    def _image_uint8(self, value: Any) -> tuple[np.ndarray, tuple[int, int]]:
        """One cell of the image column -> (uint8 [3,H,W], (width, height)); raises SampleError."""
        from PIL import Image

        kw = {"max_pixels": self.max_pixels, "multiple_of": self.model.downsample_factor, "policy": self.policy}
        if value is None:
            raise SampleError("empty", "null image")
        if value is _NO_IMAGE:
            raise SampleError("unsupported", "sample has no image member")
        if type(value).__module__.startswith("torch"):
            value = value.numpy() if hasattr(value, "numpy") else value
        if self.preprocess == "none":
            return self._model_ready(value)
        if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
            return preprocess_uint8(bytes(value), self.image_size, self.crop, **kw)
        if isinstance(value, dict):  # HF Image(decode=False): {"bytes": ..., "path": ...}
            data = value.get("bytes")
            if data is None and value.get("path"):
                data = self._read_path(value["path"])
            if data is None:
                raise SampleError("empty", "image struct with neither bytes nor path")
            return preprocess_uint8(bytes(data), self.image_size, self.crop, **kw)
        if isinstance(value, Image.Image):
            return preprocess_pil_uint8(value, self.image_size, self.crop, **kw)
        if isinstance(value, np.ndarray):
            if value.ndim == 1 and value.dtype == np.uint8:  # encoded bytes as an array (torchvision read_file)
                return preprocess_uint8(value.tobytes(), self.image_size, self.crop, **kw)
            return preprocess_array_uint8(value, self.image_size, self.crop, **kw)
        raise SampleError("unsupported", f"image value of type {type(value).__name__} (expected encoded bytes, an "
                                         f"image struct, a PIL image or a uint8 array)")

    def _model_ready(self, value: Any) -> tuple[np.ndarray, tuple[int, int]]:
        a = np.asarray(value)
        f = self.model.downsample_factor
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[0] != 3 or a.shape[1] % f or a.shape[2] % f:
            raise SampleError("unsupported", f"preprocess='none' takes uint8 [3,H,W] arrays with H, W multiples of "
                                             f"{f}; got {a.dtype} {a.shape}")
        return np.ascontiguousarray(a), (int(a.shape[2]), int(a.shape[1]))

    def _read_path(self, path: str) -> bytes:
        from gq_pipeline.sources import get_fs

        try:
            fs, p = get_fs(path, self.storage_options)
            return fs.cat_file(p)
        except Exception as e:
            raise SampleError("read", f"cannot read {path}: {type(e).__name__}: {e}") from None

    def tokenize_values(self, values: Iterable[Any]) -> list[_Row]:
        """Image cells -> one result per cell (never raises for a bad cell; raises if the model fails on all)."""
        rows: list[_Row] = []
        arrays: dict[int, np.ndarray] = {}
        for i, v in enumerate(values):
            row = _Row()
            try:
                arr, (w, h) = self._image_uint8(v)
                arrays[i] = arr
                row.width, row.height = int(w), int(h)
            except SampleError as e:
                row.error, row.width, row.height = _error_text(e), e.width, e.height
            except Exception as e:  # one odd cell never stops the batch
                row.error = f"decode: {clean_message(f'{type(e).__name__}: {e}')}"
            rows.append(row)
        if not arrays:
            return rows
        # gq tokenize's batching policy: by shape (crop="none" gives several), halved on out-of-memory, a batch
        # that fails otherwise retried image by image; a model that fails on every image raises (not a sample's fault)
        idx = list(arrays)
        for i, got in zip(idx, self._runner().encode_each([arrays[i] for i in idx])):
            if isinstance(got, str):
                rows[i].error = f"model: {got}"
            else:
                rows[i].tokens, rows[i].latent = got
        return rows

    # ------------------------------------------------------------------ batches
    def __call__(self, batch: Any) -> Any:
        """Tokenize a batch; returns the same type with the docs/plugin.md columns added."""
        import pyarrow as pa

        if isinstance(batch, pa.Table):
            return self._call_arrow(batch)
        if type(batch).__module__.startswith("pandas") and hasattr(batch, "columns"):
            return self._call_pandas(batch)
        if isinstance(batch, dict) or hasattr(batch, "keys"):  # dict, HF LazyBatch
            return self._call_dict(batch)
        raise TypeError(f"GQTokenizer takes a dict of columns, a pyarrow.Table or a pandas.DataFrame; got "
                        f"{type(batch).__name__}")

    def _added_names(self) -> tuple[str, ...]:
        return OUTPUT_COLUMNS + (LATENT_COLUMNS if self.latents else ())

    def _check_columns(self, names) -> None:
        names = list(names)
        if self.image_column not in names:
            raise KeyError(f"GQTokenizer: no image column {self.image_column!r} in the batch (columns: {names}); "
                           f"pass image_column=...")
        clash = [c for c in self._added_names() if c in names]
        if clash:
            raise ValueError(f"GQTokenizer: the batch already has column(s) {clash}, which it would overwrite "
                             f"(already tokenized? rename or drop them first)")

    def _call_dict(self, batch) -> Any:
        if type(batch).__module__.startswith("datasets.") and hasattr(batch, "pa_table"):
            # HF ``map(batched=True)`` hands over a LazyBatch over an Arrow table. HF fixes each column's type from
            # the first batch it writes, so Python values would make ``gq_error`` a null column (first batch all
            # good) that cannot take a later error. Returning the Arrow table with typed columns avoids that, and
            # leaves the input columns' Arrow data (e.g. an Image column's bytes) exactly as they were. The images
            # are the values HF shows (decoded PIL images for an ``Image()`` column, with its ``mode``).
            table = batch.pa_table
            self._check_columns(table.column_names)
            return self._append_arrow(table, self.tokenize_values(list(batch[self.image_column])))
        names = list(batch.keys())
        self._check_columns(names)
        col = batch[self.image_column]
        as_numpy = isinstance(col, np.ndarray)
        rows = self.tokenize_values(list(col))
        out = {k: batch[k] for k in names}
        if as_numpy:
            out.update(self._columns_numpy(rows))
        else:
            out.update(self._columns_lists(rows))
        return out

    def _call_pandas(self, df):
        self._check_columns(df.columns)
        rows = self.tokenize_values(list(df[self.image_column]))
        out = df.copy(deep=False)
        for name, values in self._columns_lists(rows).items():
            out[name] = values if name not in ("gq_width", "gq_height") else np.asarray(values, np.int32)
        out.attrs = {**df.attrs, "gq": self.metadata}
        return out

    def _call_arrow(self, table):
        self._check_columns(table.column_names)
        return self._append_arrow(table, self.tokenize_values(_arrow_cells(table.column(self.image_column))))

    def _append_arrow(self, table, rows: list[_Row]):
        import pyarrow as pa

        meta = self.metadata
        out = table
        for name, array in self._columns_arrow(rows).items():
            field = pa.field(name, array.type, metadata=meta if name == "tokens" else None)
            out = out.append_column(field, array)
        return out.replace_schema_metadata({**(table.schema.metadata or {}), **{k.encode(): v.encode()
                                                                               for k, v in meta.items()}})

    # ------------------------------------------------------------------ output columns per batch type
    def _columns_lists(self, rows: list[_Row]) -> dict[str, list]:
        """Python lists (HF batched dicts, pandas): None where a row has no tokens."""
        out: dict[str, list] = {
            "tokens": [r.tokens.reshape(-1) if r.tokens is not None else None for r in rows],
            "token_shape": [np.asarray(r.tokens.shape, np.int32) if r.tokens is not None else None for r in rows],
            "gq_error": [r.error for r in rows],
            "gq_model": [self.model_fingerprint] * len(rows),
            "gq_width": [r.width for r in rows], "gq_height": [r.height for r in rows]}
        if self.latents:
            out["latent"] = [r.latent.reshape(-1) if r.latent is not None else None for r in rows]
            out["latent_shape"] = [np.asarray(r.latent.shape, np.int32) if r.latent is not None else None
                                   for r in rows]
        return out

    def _columns_numpy(self, rows: list[_Row]) -> dict[str, np.ndarray]:
        """numpy arrays (Ray's default batch format). A numpy batch cannot hold nulls without Ray pickling the
        column, so a row without tokens has an empty ``tokens`` array and ``token_shape`` [0, 0, 0]; ``gq_error``
        (an object column of str/None, which Ray stores as a nullable string) says why."""
        n = len(rows)

        def ragged(values: list[np.ndarray | None], dtype) -> np.ndarray:
            arr = np.empty(n, dtype=object)
            for i, v in enumerate(values):
                arr[i] = v.reshape(-1) if v is not None else np.zeros(0, dtype)
            return arr

        def shapes(values: list[np.ndarray | None]) -> np.ndarray:
            return np.array([v.shape if v is not None else (0, 0, 0) for v in values], np.int32).reshape(n, 3)

        errors = np.empty(n, dtype=object)
        errors[:] = [r.error for r in rows]
        out = {"tokens": ragged([r.tokens for r in rows], self.token_dtype),
               "token_shape": shapes([r.tokens for r in rows]), "gq_error": errors,
               "gq_model": np.array([self.model_fingerprint] * n, dtype=object),
               "gq_width": np.array([r.width for r in rows], np.int32),
               "gq_height": np.array([r.height for r in rows], np.int32)}
        if self.latents:
            out["latent"] = ragged([r.latent for r in rows], np.float16)
            out["latent_shape"] = shapes([r.latent for r in rows])
        return out

    def _columns_arrow(self, rows: list[_Row]) -> dict[str, Any]:
        """Arrow arrays: ``list<uint16|int32>`` tokens, null where a row has no tokens."""
        import pyarrow as pa

        tok_type = pa.uint16() if self.token_dtype == np.uint16 else pa.int32()

        def lists(values: list[np.ndarray | None], value_type, dtype) -> pa.Array:
            lengths = np.array([v.size if v is not None else 0 for v in values], np.int64)
            offsets = np.zeros(len(values) + 1, np.int32)
            np.cumsum(lengths, out=offsets[1:])
            flat = (np.concatenate([v.reshape(-1) for v in values if v is not None]) if lengths.sum()
                    else np.zeros(0, dtype))
            mask = pa.array([v is None for v in values], pa.bool_())
            return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat.astype(dtype), value_type),
                                            mask=mask)

        def shapes(values: list[np.ndarray | None]) -> list:
            return [np.asarray(v.shape, np.int32) if v is not None else None for v in values]

        toks = [r.tokens for r in rows]
        out = {"tokens": lists(toks, tok_type, self.token_dtype),
               "token_shape": lists(shapes(toks), pa.int32(), np.int32),
               "gq_error": pa.array([r.error for r in rows], pa.string()),
               "gq_model": pa.array([self.model_fingerprint] * len(rows), pa.string()),
               "gq_width": pa.array([r.width for r in rows], pa.int32()),
               "gq_height": pa.array([r.height for r in rows], pa.int32())}
        if self.latents:
            lats = [r.latent for r in rows]
            out["latent"] = lists(lats, pa.float16(), np.float16)
            out["latent_shape"] = lists(shapes(lats), pa.int32(), np.int32)
        return out

    # ------------------------------------------------------------------ WebDataset
    def tokenize_sample(self, sample: dict[str, Any]) -> dict[str, Any]:
        """One WebDataset sample (``.map(tok.tokenize_sample)``): the sample with the output columns added.

        One model call per sample; :meth:`wds_stage` batches and is much faster on real models."""
        return next(iter(self.wds_stage(1)([sample])))

    def wds_stage(self, batch_size: int | None = None) -> Callable[[Iterable[dict]], Iterator[dict]]:
        """A WebDataset pipeline stage (``wds.WebDataset(url).compose(tok.wds_stage(32))``, or a stage of
        ``wds.DataPipeline``): tokenizes samples ``batch_size`` at a time, yields each sample, in order, with the
        output columns added. The image is the sample's ``image_column`` entry, else its first image extension
        (``jpg``, ``png``, ...); samples may be raw bytes or decoded (``.decode("pil")``, ``.decode("rgb8")``)."""
        n = int(batch_size or self.batch_size)

        def image_of(sample: dict[str, Any]) -> Any:
            if self.image_column in sample:
                return sample[self.image_column]
            for ext in IMAGE_EXTENSIONS:
                if ext in sample:
                    return sample[ext]
            return _NO_IMAGE

        def flush(buf: list[dict]) -> Iterator[dict]:
            rows = self.tokenize_values([image_of(s) for s in buf])
            cols = self._columns_lists(rows)
            for i, s in enumerate(buf):
                out = dict(s)
                for name, values in cols.items():
                    out[name] = values[i]
                yield out

        def stage(samples: Iterable[dict]) -> Iterator[dict]:
            buf: list[dict] = []
            for s in samples:
                buf.append(s)
                if len(buf) >= n:
                    yield from flush(buf)
                    buf = []
            if buf:
                yield from flush(buf)

        return stage


def _arrow_cells(col) -> list[Any]:
    """An Arrow image column -> Python cells: bytes, {bytes, path} dicts, or numpy arrays for Ray tensor columns."""
    import pyarrow as pa

    if isinstance(col.type, pa.ExtensionType):  # Ray's tensor extension types (read_images, batch_format="pyarrow")
        cells: list[Any] = []
        for chunk in col.chunks:
            arr = chunk.to_numpy(zero_copy_only=False)
            cells.extend(list(arr))
        return cells
    return col.to_pylist()
