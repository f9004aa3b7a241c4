"""What a worker does to one sample and one batch: ``decode_sample`` (bytes -> preprocessed uint8 pixels, or an error
row) and ``ModelRunner`` (pixels -> tokens, with the out-of-memory and bad-image fallbacks).

Rows are plain dicts with the fields of ``TOKEN_SCHEMA``; a unit's rows become one Arrow table only when the worker
hands them to ``gq_pipeline.commit.commit_unit``. Arrow, never numpy string arrays, carries image bytes (numpy would
strip trailing NUL bytes).
"""
from __future__ import annotations

import os
import pickle
import re
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa

from gq_pipeline.preprocess import preprocess_uint8, to_model_input
from gq_pipeline.records import INT32_MAX, ROW_ERROR, ROW_OK, SampleError, is_utf8, printable, tokens_fit_uint16
from gq_pipeline.sources import RawSample

__all__ = ["TOKEN_SCHEMA", "decode_sample", "rows_to_table", "ModelRunner", "model_payload", "lower_thread_priority",
           "is_out_of_memory", "encode_uint8"]

_COMMON = [("unit", pa.string()), ("idx", pa.int64()), ("kind", pa.string()), ("key", pa.string()),
           ("source", pa.string()), ("member", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
           ("extra", pa.binary()), ("error", pa.string()), ("message", pa.string()), ("n", pa.int64()),
           ("info", pa.binary())]
TOKEN_SCHEMA = pa.schema(_COMMON + [("tokens", pa.binary()), ("tg", pa.int32()), ("th", pa.int32()),
                                    ("tw", pa.int32()), ("latent", pa.binary()), ("lc", pa.int32()),
                                    ("lh", pa.int32()), ("lw", pa.int32()), ("model_s", pa.float64())])
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def clean_message(message: str) -> str:
    """Error text without object addresses (``<_io.BytesIO object at 0x7f..>``), so error files are reproducible."""
    return _ADDRESS.sub("", message)[:2000]


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """A unit's sample rows (``decode_sample`` rows after ``ModelRunner.tokenize``) as one ``TOKEN_SCHEMA`` table."""
    return pa.Table.from_pydict({f.name: [r.get(f.name, _DEFAULTS[f.name]) for r in rows] for f in TOKEN_SCHEMA},
                                schema=TOKEN_SCHEMA)


_DEFAULTS = {"unit": "", "idx": -1, "kind": ROW_OK, "key": "", "source": "", "member": "", "width": -1, "height": -1,
             "extra": b"", "error": "", "message": "", "n": 0, "info": b"", "tokens": b"", "tg": 0, "th": 0, "tw": 0,
             "latent": b"", "lc": 0, "lh": 0, "lw": 0, "model_s": 0.0}


def decode_sample(unit_id: str, s: RawSample, cfg: dict[str, Any]) -> dict[str, Any]:
    """One sample's row: its identity, and either preprocessed pixels (``img``: uint8 ``[3, img_h, img_w]``, kept
    only until the model has run) or the error that stopped it. Never raises for one sample's fault: a row that
    cannot be built, or whose values the unit's table could not hold (a header width beyond int32, text that is
    not UTF-8), becomes that sample's ``unsupported`` error row instead of failing the unit."""
    try:
        row = _decode_row(unit_id, s, cfg)
        problem = _unstorable(row)
    except Exception as e:
        problem = f"{type(e).__name__}: {e}"
    if problem is None:
        return row
    return {"unit": unit_id, "idx": int(s.idx), "kind": ROW_ERROR, "key": printable(str(s.key)),
            "source": printable(str(s.source)), "member": printable(str(s.member or "")), "width": -1, "height": -1,
            "extra": b"", "error": "unsupported", "message": clean_message(printable(f"row not stored: {problem}")),
            "img": None}


def _unstorable(row: dict[str, Any]) -> str | None:
    """Why ``row`` would not fit ``TOKEN_SCHEMA`` (checked per row, so one bad value cannot fail the unit's table)."""
    for name in ("width", "height"):
        if not -INT32_MAX - 1 <= int(row[name]) <= INT32_MAX:
            return f"{name} {row[name]} does not fit int32"
    for name in ("unit", "key", "source", "member", "error", "message"):
        if not isinstance(row[name], str) or not is_utf8(row[name]):
            return f"{name} {printable(str(row[name]))!r} is not UTF-8 text"
    return None


def _decode_row(unit_id: str, s: RawSample, cfg: dict[str, Any]) -> dict[str, Any]:
    row = {"unit": unit_id, "idx": s.idx, "kind": ROW_OK, "key": s.key, "source": s.source, "member": s.member or "",
           "width": -1, "height": -1, "extra": pickle.dumps(s.extra, protocol=5) if s.extra else b"",
           "error": "", "message": "", "img": None}
    err = s.error
    if err is None:
        try:
            arr, (w, h) = preprocess_uint8(s.data, cfg["image_size"], cfg["crop"], max_pixels=cfg["max_pixels"],
                                           multiple_of=cfg["multiple_of"], policy=cfg.get("policy", "gq"))
            row.update(width=w, height=h, img=arr)
        except SampleError as e:
            err = e
        except Exception as e:  # never let one sample kill the unit
            err = SampleError("decode", f"{type(e).__name__}: {e}")
    if err is not None:
        row.update(kind=ROW_ERROR, error=err.kind, message=clean_message(err.message), width=err.width,
                   height=err.height)
    return row


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


def model_payload(model) -> dict[str, Any]:
    """What the driver ``ray.put``s once for all actors: config + CPU weights (actors never re-read the model files,
    so a DeepSpeed or reference checkpoint is converted once, and every actor provably runs the same weights)."""
    return {"config": model.config.to_dict(), "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "model_fingerprint": model.model_fingerprint}


def is_out_of_memory(e: BaseException) -> bool:
    """A device (or host allocator) out-of-memory error: worth retrying with a smaller batch."""
    # torch.cuda.OutOfMemoryError is a RuntimeError whose message says "out of memory", as are the host allocator's
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


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

    def tokenize(self, rows: list[dict[str, Any]]) -> float:
        """Fill ``tokens`` (and ``latent``) of the ``ok`` rows in place, turning rows the model cannot take into
        ``model`` errors; drops the pixels. Returns the model seconds spent."""
        t_start = time.perf_counter()
        groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        for r in rows:
            if r["kind"] == ROW_OK and r.get("img") is not None:
                groups.setdefault(r["img"].shape, []).append(r)
        for members in groups.values():
            for c0 in range(0, len(members), self.batch_size):
                chunk = members[c0:c0 + self.batch_size]
                arrs = np.stack([r["img"] for r in chunk])
                try:
                    results = [(chunk, self._run_fitting(arrs))]
                except Exception as chunk_error:
                    results, failures = [], []
                    for j, r in enumerate(chunk):
                        try:
                            results.append(([r], self._run_fitting(arrs[j:j + 1])))
                        except Exception as e:
                            failures.append((r, clean_message(f"{type(e).__name__}: {e}")))
                    if not results:
                        raise RuntimeError(f"the model fails on every image of a batch of {len(chunk)}: "
                                           f"{type(chunk_error).__name__}: {chunk_error}") from chunk_error
                    for r, msg in failures:
                        r.update(kind=ROW_ERROR, error="model", message=msg)
                for members_, (tok, lat) in results:
                    for j, r in enumerate(members_):
                        r["tokens"] = tok[j].tobytes()
                        r["tg"], r["th"], r["tw"] = tok[j].shape
                        if lat is not None:
                            r["latent"] = lat[j].tobytes()
                            r["lc"], r["lh"], r["lw"] = lat[j].shape
        for r in rows:
            r.pop("img", None)
        return time.perf_counter() - t_start
