"""One unit, end to end, on the machine that runs the model: read, decode, tokenize, write shards, commit.

This is the data plane. A unit's images are read (:mod:`gq_pipeline.sources`) and decoded
(:func:`gq_pipeline.preprocess.decode_sample`) on the worker's own node by a local pool of decode threads (PIL
releases the GIL while decoding and resizing), its tokens are computed in mini-batches by the worker's
:class:`ModelRunner`, and its files and commit record are built (:mod:`gq_pipeline.writers`) and committed
(:mod:`gq_pipeline.commit`) from there. The worker calls each of those rooms in turn, and none of them calls another.

What leaves the worker is one small dict per unit (status, commit record, timings): decoded pixels and token rows
never cross the object store or the driver, so the driver's work is O(units), not O(rows) (docs/architecture.md,
"Pipeline"). The model lives here too (:class:`ModelRunner`), since only the worker runs it.

The same :class:`UnitProcessor` serves both placements: inside a Ray actor (:class:`UnitWorkerActor`, one per GPU or
per CPU node) and in the driver process itself on a single CPU-only machine.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from gq_pipeline.commit import commit_staged, stage_files
from gq_pipeline.manifest import OutputStore
from gq_pipeline.preprocess import decode_sample, to_model_input
from gq_pipeline.records import ROW_ERROR, ROW_OK, clean_message, tokens_fit_uint16
from gq_pipeline.sources import Unit, UnitInfo, UnitReadError, iter_samples
from gq_pipeline.writers import CompleteUnit, ShardContext, rows_to_table, unit_files

__all__ = ["WorkSpec", "UnitProcessor", "UnitWorkerActor", "UnitOutcome", "ModelRunner", "encode_uint8",
           "model_payload", "is_out_of_memory", "lower_thread_priority"]

COMMITTED, FAILED, ALREADY = "committed", "failed", "already_committed"


class UnitCancelled(Exception):
    """The run is stopping; this unit is left uncommitted."""


@dataclass(frozen=True)
class WorkSpec:
    """Everything a worker needs besides the model; the same for every unit of a run."""

    output: str
    storage_options: dict | None
    ctx: ShardContext
    formats: tuple[str, ...]
    image_size: int
    crop: str
    max_pixels: int
    multiple_of: int
    image_column: str | None
    batch_size: int
    decode_threads: int = 2
    niceness: int = 0  # CPU-only: decode threads yield to the model's threads
    allow_external_refs: tuple[str, ...] = ()  # Parquet path references beyond the file's tree ("*": any)
    extensions: tuple[str, ...] = ()  # image extensions besides the default ones

    @property
    def decode_cfg(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "crop": self.crop, "max_pixels": self.max_pixels,
                "multiple_of": self.multiple_of, "policy": self.ctx.preprocess.get("policy", "gq")}


UnitOutcome = dict  # {"unit_id", "status", "record", "error", "inputs", "read_s", "model_s", "write_s", "node"}


def lower_thread_priority(niceness: int) -> None:
    """Lower the OS priority of the *calling thread* (Linux nice values are per thread).

    Decode threads run in the same process as the model; on CPU-only nodes the model's OpenMP threads use every core,
    and a decode thread preempting one of them stalls the whole parallel region at its next barrier. Niced, decoding
    still runs whenever a core is idle.
    """
    if niceness:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(niceness))
        except (OSError, AttributeError):
            pass


# ---------------------------------------------------------------------------------------------------- the model
def model_payload(model) -> dict[str, Any]:
    """What the driver ``ray.put``s once for all actors: config + CPU weights (actors never re-read the model files,
    so a DeepSpeed or reference checkpoint is converted once, and every actor provably runs the same weights)."""
    return {"config": model.config.to_dict(), "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "model_fingerprint": model.model_fingerprint}


# What torch's CPU allocator says when it fails. It raises a plain RuntimeError (a c10::Error) with no type of its
# own, so this one case is recognised by its text: "DefaultCPUAllocator: can't allocate memory: you tried to ...".
_CPU_ALLOCATOR_FAILURE = "DefaultCPUAllocator: can't allocate memory"


def is_out_of_memory(e: BaseException) -> bool:
    """A device or host out-of-memory error: worth retrying with a smaller batch.

    By type: ``torch.OutOfMemoryError`` (CUDA and other device allocators) and Python's ``MemoryError``. The CPU
    allocator's failure has no type of its own (see ``_CPU_ALLOCATOR_FAILURE``)."""
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return type(e) is RuntimeError and _CPU_ALLOCATOR_FAILURE in str(e)


def encode_uint8(model, images: np.ndarray, device, *, autocast: bool, latents: bool, token_dtype
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 ``[B,3,H,W]`` -> (tokens ``[B,G,h,w]`` as ``token_dtype``, μ ``[B,C,h,w]`` float16 or None).

    The one model call of gq: ``gq tokenize``'s workers (``ModelRunner``) and the plugin (``GQTokenizer``) both use
    it, so their tokens are the same bits. Float conversion with ``to_model_input``, encoder (bf16 autocast on CUDA
    when asked), float32 moments, the quantizer; outputs in the grid layout (:meth:`GQModel.to_grid`).
    """
    import torch

    x = to_model_input(images).to(device, non_blocking=True)
    with torch.no_grad():  # not inference_mode: a multi-threaded search kernel may update tensors in place
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            mu, logvar = model.encode_moments(x)
        mu, logvar = mu.float(), logvar.float()
        idx, _ = model.quantizer.quantize(mu, logvar)
    idx, mu = model.to_grid(idx, images.shape[2:]), model.to_grid(mu, images.shape[2:])  # shards store [B,*,h,w]
    tokens = idx.cpu().numpy().astype(token_dtype)
    lat = mu.to(torch.float16).cpu().numpy() if latents else None
    return tokens, lat


class ModelRunner:
    """The encoder and codebook search on one device, applied to decoded rows in batches of ``batch_size``.

    Images are grouped by shape (``--crop none`` gives several). A batch that runs out of memory is halved and
    retried, down to one image, and the smaller size is kept for the rest of the run (a CUDA OOM is a property of the
    device and the shape, not of one image). A batch that raises anything else is retried one image at a time, so a
    bad sample becomes a ``model`` error record for itself alone. When *every* image of the batch fails alone too,
    the failure is systematic (a broken model): it raises, so the unit is failed rather than committed as thousands
    of ``model`` errors.
    """

    def __init__(self, model, *, batch_size: int, precision: str = "fp32", latents: bool = False,
                 warmup_size: int | None = None):
        self.model = model
        self.device = next(model.parameters()).device
        self.batch_size = max(1, int(batch_size))
        self.autocast = precision == "bf16" and self.device.type == "cuda"
        self.latents = latents
        self.token_dtype = np.uint16 if tokens_fit_uint16(model.config.codebook_size) else np.int32
        self.oom_halvings = 0
        if warmup_size:  # first calls pay one-off costs (kernel set-up, lazy imports): keep them out of the stats
            self._run(np.zeros((1, 3, warmup_size, warmup_size), np.uint8))

    @classmethod
    def from_payload(cls, payload: dict[str, Any], *, use_gpu: bool, cpu_threads: int, **kwargs) -> "ModelRunner":
        """Rebuild the driver's model from :func:`model_payload` on this process's device, checking its fingerprint."""
        import torch

        from gq_model import GQConfig, GQModel

        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if use_gpu and device.type != "cuda":
            raise RuntimeError("this worker was placed for a GPU but torch sees no CUDA device")
        if device.type == "cpu":
            torch.set_num_threads(max(1, int(cpu_threads)))
        model = GQModel(GQConfig.from_dict(payload["config"]))
        model.load_state_dict(payload["state"], strict=True)
        if model.model_fingerprint != payload["model_fingerprint"]:
            raise RuntimeError("model weights changed in transit: fingerprint mismatch")
        return cls(model.to(device).eval(), **kwargs)

    def _run(self, images: np.ndarray):
        return encode_uint8(self.model, images, self.device, autocast=self.autocast, latents=self.latents,
                            token_dtype=self.token_dtype)

    def _run_fitting(self, images: np.ndarray):
        """``_run`` in pieces no larger than the batch size that fits; halves it on out-of-memory."""
        out_t, out_l = [], []
        i = 0
        while i < len(images):
            n = min(self.batch_size, len(images) - i)
            try:
                t, lat = self._run(images[i:i + n])
            except Exception as e:
                if not is_out_of_memory(e) or n == 1:
                    raise
                self._free_cached_memory()
                self.batch_size = max(1, n // 2)
                self.oom_halvings += 1
                continue
            out_t.append(t)
            out_l.append(lat)
            i += n
        return np.concatenate(out_t), (np.concatenate(out_l) if self.latents else None)

    def _free_cached_memory(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def encode_each(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray | None] | str]:
        """For each uint8 ``[3,H,W]`` image: ``(tokens [G,h,w], latent [C,h,w] or None)``, or the error text of an
        image the model cannot take. The one batching policy of gq, shared by ``gq tokenize``'s workers
        (:meth:`tokenize`) and the plugin (``GQTokenizer``): images grouped by shape, batches of ``batch_size``
        halved on out-of-memory, a batch that fails otherwise retried image by image. Raises ``RuntimeError``
        when every image of a batch fails alone too (a broken model, not bad images)."""
        out: list[tuple[np.ndarray, np.ndarray | None] | str] = [""] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(img.shape, []).append(i)
        for members in groups.values():
            for c0 in range(0, len(members), self.batch_size):
                chunk = members[c0:c0 + self.batch_size]
                arrs = np.stack([images[i] for i in chunk])
                try:
                    results = [(chunk, self._run_fitting(arrs))]
                except Exception as chunk_error:
                    results, failures = [], []
                    for j, i in enumerate(chunk):
                        try:
                            results.append(([i], self._run_fitting(arrs[j:j + 1])))
                        except Exception as e:
                            failures.append((i, clean_message(f"{type(e).__name__}: {e}")))
                    if not results:
                        raise RuntimeError(f"the model fails on every image of a batch of {len(chunk)}: "
                                           f"{type(chunk_error).__name__}: {chunk_error}") from chunk_error
                    for i, msg in failures:
                        out[i] = msg
                for idx, (tok, lat) in results:
                    for j, i in enumerate(idx):
                        out[i] = (tok[j], lat[j] if lat is not None else None)
        return out

    def tokenize(self, rows: list[dict[str, Any]]) -> float:
        """Fill ``tokens`` (and ``latent``) of the ``ok`` rows in place, turning rows the model cannot take into
        ``model`` errors; drops the pixels. Returns the model seconds spent."""
        t_start = time.perf_counter()
        todo = [r for r in rows if r["kind"] == ROW_OK and r.get("img") is not None]
        for r, got in zip(todo, self.encode_each([r["img"] for r in todo])):
            if isinstance(got, str):
                r.update(kind=ROW_ERROR, error="model", message=got)
                continue
            tok, lat = got
            r["tokens"] = tok.tobytes()
            r["tg"], r["th"], r["tw"] = tok.shape
            if lat is not None:
                r["latent"] = lat.tobytes()
                r["lc"], r["lh"], r["lw"] = lat.shape
        for r in rows:
            r.pop("img", None)
        return time.perf_counter() - t_start


# ------------------------------------------------------------------------------------------------ units


class UnitProcessor:
    """Turns unit descriptions into committed units. Thread-safe: several units may be in progress at once (their
    decoding overlaps), while the model runs one batch at a time under a lock."""

    def __init__(self, spec: WorkSpec, runner: ModelRunner):
        self.spec = spec
        self.runner = runner
        self.store = OutputStore(spec.output, spec.storage_options)
        self._model_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, spec.decode_threads), thread_name_prefix="gq-decode",
                                        initializer=lower_thread_priority, initargs=(spec.niceness,))
        self.hist = np.zeros(spec.ctx.codebook_size, dtype=np.int64)
        self.units_done = 0
        self._live: dict[str, list] = {}  # unit id -> its rows so far, for live_counts (progress between commits)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Make units in progress stop at their next sample or batch (uncommitted; a rerun redoes them)."""
        self._cancelled.set()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------------ one unit
    def process(self, unit_dict: dict[str, Any]) -> UnitOutcome:
        """Read, tokenize and commit one unit. A read that fails for a transient reason, or a model that fails on
        every image of a batch, gives a ``failed`` outcome (the driver decides whether to retry elsewhere); one bad
        sample only ever becomes that sample's error record."""
        unit = Unit.from_dict(unit_dict)
        out: UnitOutcome = {"unit_id": unit.unit_id, "source": unit.source, "status": FAILED, "record": None,
                            "error": None, "inputs": 0, "read_s": 0.0, "model_s": 0.0, "write_s": 0.0}
        try:
            return self._process(unit, out, unit_dict.get("formats"))
        finally:
            with self._stats_lock:
                self._live.pop(unit.unit_id, None)

    def live_counts(self) -> tuple[int, int]:
        """(samples finished, of which errors) in units still in progress: a progress line's count between commits.
        A sample is finished once it is an error row or has its tokens."""
        with self._stats_lock:
            units = [list(rows) for rows in self._live.values()]
        done = errors = 0
        for rows in units:
            for r in rows:
                if r["kind"] != ROW_OK:
                    done, errors = done + 1, errors + 1
                elif "tokens" in r:
                    done += 1
        return done, errors

    def _process(self, unit: Unit, out: UnitOutcome, formats: Any = None) -> UnitOutcome:
        try:
            done = self.tokenize_unit(unit)
        except (UnitReadError, UnitCancelled) as e:
            out["error"] = str(e)
            return out
        except RuntimeError as e:  # the model fails on every image of a batch: systematic, not one sample's fault
            out["error"] = f"{type(e).__name__}: {e}"[:3000]
            return out
        except Exception as e:  # a bug or an unexpected library error: fail the unit, keep the job alive
            out["error"] = f"unexpected {type(e).__name__} while reading/tokenizing: {e}"[:3000]
            return out
        out.update(read_s=done.info["read_s"], model_s=done.model_s, inputs=done.rows.num_rows)
        t1 = time.perf_counter()
        # A unit committed before in other formats is redone with all of them (its record keeps every format it has)
        formats = tuple(formats or self.spec.formats)
        staged = stage_files(self.store, unit_files(self.spec.ctx, formats, done))
        created = commit_staged(self.store, staged)
        out["write_s"] = time.perf_counter() - t1
        if not created:  # another run committed this unit first: its record stands, ours is discarded
            out.update(status=ALREADY, record=self.store.read_record(unit.unit_id))
            return out
        out.update(status=COMMITTED, record=staged.record)
        with self._stats_lock:
            if staged.hist is not None:
                self.hist += staged.hist
            self.units_done += 1
        return out

    def tokenize_unit(self, unit: Unit) -> CompleteUnit:
        """Read and tokenize every sample of ``unit`` (decoding on the pool, the model in mini-batches): the rows
        ``writers.unit_files`` takes, in sample order. Raises ``UnitReadError`` (transient), ``UnitCancelled``, or
        ``RuntimeError`` when the model fails on a whole batch."""
        t0 = time.perf_counter()
        info = UnitInfo()
        rows: list[dict[str, Any]] = []
        with self._stats_lock:
            self._live[unit.unit_id] = rows
        waiting: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        inflight: deque = deque()
        prefetch = 2 * self.spec.batch_size
        model_s = 0.0
        cfg = self.spec.decode_cfg
        try:
            for s in iter_samples(unit, info, self.spec.storage_options, self.spec.image_column,
                                  allow_external_refs=self.spec.allow_external_refs, extensions=self.spec.extensions):
                if self._cancelled.is_set():
                    raise UnitCancelled("the run was interrupted")
                inflight.append(self._pool.submit(decode_sample, unit.unit_id, s, cfg))
                if len(inflight) >= prefetch:
                    model_s += self._take(inflight.popleft().result(), rows, waiting)
            while inflight:
                model_s += self._take(inflight.popleft().result(), rows, waiting)
            for group in list(waiting.values()):
                model_s += self._tokenize(group)
        finally:
            for f in inflight:
                f.cancel()
        read_s = time.perf_counter() - t0 - model_s
        return CompleteUnit(unit, rows_to_table(rows), {"read_s": read_s, "passthrough_schema": info.passthrough_schema,
                                                        "image_column": info.image_column}, model_s)

    def _take(self, row: dict[str, Any], rows: list, waiting: dict) -> float:
        """Keep ``row`` (rows stay in sample order); run the model once a shape group holds a full batch."""
        rows.append(row)
        if row["kind"] != ROW_OK or row.get("img") is None:
            return 0.0
        group = waiting.setdefault(row["img"].shape, [])
        group.append(row)
        if len(group) < self.runner.batch_size:
            return 0.0
        del waiting[row["img"].shape]
        return self._tokenize(group)

    def _tokenize(self, group: list[dict[str, Any]]) -> float:
        if self._cancelled.is_set():
            raise UnitCancelled("the run was interrupted")
        with self._model_lock:
            return self.runner.tokenize(group)

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            return {"hist": self.hist.copy(), "units": self.units_done, "batch_size": self.runner.batch_size,
                    "oom_halvings": self.runner.oom_halvings}


class UnitWorkerActor:
    """A Ray actor holding one model (on its GPU, or on its node's CPUs) and a decode pool.

    Created with ``max_restarts=0``: a constructor that fails (a bad node, a driver mismatch) kills only this actor;
    the driver sees it on the actor's first call and starts a replacement elsewhere, within a budget. ``max_concurrency``
    lets the next unit decode while the current one is on the model.
    """

    def __init__(self, payload_ref: list, spec: WorkSpec, *, use_gpu: bool, cpu_threads: int, precision: str,
                 latents: bool, warmup: bool = True):
        import ray

        payload = ray.get(payload_ref[0])
        runner = ModelRunner.from_payload(payload, use_gpu=use_gpu, cpu_threads=cpu_threads,
                                          batch_size=spec.batch_size, precision=precision, latents=latents,
                                          warmup_size=spec.image_size if warmup else None)
        self.proc = UnitProcessor(spec, runner)
        self.node = ray.get_runtime_context().get_node_id()

    def ready(self) -> str:
        return self.node

    def process(self, unit_dict: dict[str, Any]) -> UnitOutcome:
        out = self.proc.process(unit_dict)
        out["node"] = self.node
        return out

    def stats(self) -> dict[str, Any]:
        return self.proc.stats()
