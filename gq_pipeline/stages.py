"""The two Ray Data stages: ``read_units`` (CPU tasks: read + decode + preprocess) and ``TokenizerActor`` (model).

Rows travel as Arrow tables with the fixed schemas below (never numpy string arrays, which would strip trailing
NUL bytes from image data). Every row names its unit; besides one row per input sample (``ok`` with the uint8 image,
or ``error``), each unit ends with one ``end`` row carrying the unit's sample count, so the driver can tell when it
holds all of a unit's rows however the actor pool reorders them. A unit that cannot be read (network, permissions)
ends with an ``end`` row whose ``error`` is set: the driver then drops the unit without committing it.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import time
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from gq_pipeline.preprocess import preprocess_uint8, to_model_input
from gq_pipeline.records import ROW_END, ROW_ERROR, ROW_OK, SampleError, tokens_fit_uint16
from gq_pipeline.sources import RawSample, Unit, UnitInfo, UnitReadError, iter_samples

__all__ = ["READ_SCHEMA", "TOKEN_SCHEMA", "read_units", "TokenizerActor", "model_payload"]

_COMMON = [("unit", pa.string()), ("idx", pa.int64()), ("kind", pa.string()), ("key", pa.string()),
           ("source", pa.string()), ("member", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
           ("extra", pa.binary()), ("error", pa.string()), ("message", pa.string()), ("n", pa.int64()),
           ("info", pa.binary())]
READ_SCHEMA = pa.schema(_COMMON + [("img", pa.binary()), ("img_h", pa.int32()), ("img_w", pa.int32())])
TOKEN_SCHEMA = pa.schema(_COMMON + [("tokens", pa.binary()), ("tg", pa.int32()), ("th", pa.int32()),
                                    ("tw", pa.int32()), ("latent", pa.binary()), ("lc", pa.int32()),
                                    ("lh", pa.int32()), ("lw", pa.int32()), ("model_s", pa.float64())])
_COMMON_NAMES = [n for n, _ in _COMMON]
_CHUNK_BYTES = 32 << 20
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def clean_message(message: str) -> str:
    """Error text without object addresses (``<_io.BytesIO object at 0x7f..>``), so error files are reproducible."""
    return _ADDRESS.sub("", message)[:2000]


def _rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pydict({f.name: [r[f.name] for r in rows] for f in schema}, schema=schema)


def _sample_row(unit_id: str, s: RawSample, cfg: dict[str, Any]) -> dict[str, Any]:
    row = {"unit": unit_id, "idx": s.idx, "kind": ROW_OK, "key": s.key, "source": s.source, "member": s.member or "",
           "width": -1, "height": -1, "extra": pickle.dumps(s.extra, protocol=5) if s.extra else b"",
           "error": "", "message": "", "n": 0, "info": b"", "img": b"", "img_h": 0, "img_w": 0}
    err = s.error
    if err is None:
        try:
            arr, (w, h) = preprocess_uint8(s.data, cfg["image_size"], cfg["crop"], max_pixels=cfg["max_pixels"],
                                           multiple_of=cfg["multiple_of"])
            row.update(width=w, height=h, img=arr.tobytes(), img_h=arr.shape[1], img_w=arr.shape[2])
        except SampleError as e:
            err = e
        except Exception as e:  # never let one sample kill the unit
            err = SampleError("decode", f"{type(e).__name__}: {e}")
    if err is not None:
        row.update(kind=ROW_ERROR, error=err.kind, message=clean_message(err.message), width=err.width,
                   height=err.height)
    return row


def lower_priority(niceness: int) -> None:
    """Run this worker process at a lower OS priority (once per process).

    On CPU-only nodes the model actor's OpenMP threads use every core; decode and commit work preempting one of them
    stalls the whole parallel region at its next barrier. Niced, that work still runs whenever a core is idle.
    """
    global _NICED
    if niceness and not _NICED:
        try:
            os.nice(niceness)
        except OSError:
            pass
        _NICED = True


_NICED = False


def read_units(batch: pa.Table, *, cfg: dict[str, Any]) -> Iterator[pa.Table]:
    """Ray Data ``map_batches`` generator (``batch_size=1``): every sample of each unit, then its ``end`` row."""
    lower_priority(cfg.get("niceness", 0))
    for unit_json in batch.column("unit").to_pylist():
        unit = Unit.from_dict(json.loads(unit_json))
        t0 = time.perf_counter()
        info, rows, nbytes, count, failure = UnitInfo(), [], 0, 0, ""
        try:
            for s in iter_samples(unit, info, cfg.get("storage_options"), cfg.get("image_column")):
                row = _sample_row(unit.unit_id, s, cfg)
                rows.append(row)
                count += 1
                nbytes += len(row["img"])
                if len(rows) >= cfg["chunk_rows"] or nbytes >= _CHUNK_BYTES:
                    yield _rows_to_table(rows, READ_SCHEMA)
                    rows, nbytes = [], 0
        except UnitReadError as e:
            failure = str(e)
        except Exception as e:  # a bug or an unexpected library error: fail the unit, keep the job alive
            failure = f"unexpected {type(e).__name__} while reading: {e}"
        end_info = {"read_s": time.perf_counter() - t0, "passthrough_schema": info.passthrough_schema,
                    "image_column": info.image_column}
        rows.append({"unit": unit.unit_id, "idx": -1, "kind": ROW_END, "key": "", "source": "", "member": "",
                     "width": -1,
                     "height": -1, "extra": b"", "error": failure, "message": "", "n": count,
                     "info": pickle.dumps(end_info, protocol=5), "img": b"", "img_h": 0, "img_w": 0})
        yield _rows_to_table(rows, READ_SCHEMA)


def model_payload(model) -> dict[str, Any]:
    """What the driver ``ray.put``s once for all actors: config + CPU weights (actors never re-read the model files,
    so a DeepSpeed or reference checkpoint is converted once, and every actor provably runs the same weights)."""
    return {"config": model.config.to_dict(), "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "model_fingerprint": model.model_fingerprint}


class TokenizerActor:
    """Loads the model once per actor; turns ``ok`` rows into tokens (and μ), passes other rows through.

    Also runs in the driver itself (:meth:`in_process`, the ``driver`` model placement), on the model the driver has
    already loaded.

    Images are grouped by shape (``--crop none`` gives several) and run in chunks of ``batch_size``. A chunk that
    raises is retried one image at a time, so a bad sample becomes a ``model`` error record for itself alone. When
    *every* image of the chunk fails alone too, the failure is systematic (a broken model, out of memory): the batch
    raises, the job stops with that error and nothing wrong is committed. Set-up errors are raised from the first
    batch rather than from ``__init__``, which Ray Data would retry forever.
    """

    def __init__(self, payload_ref: list, *, batch_size: int, precision: str = "fp32", latents: bool = False,
                 use_gpu: bool = False, cpu_threads: int = 1, warmup_size: int | None = None):
        self._init_error: str | None = None
        try:
            self._setup(payload_ref, batch_size, precision, latents, use_gpu, cpu_threads, warmup_size)
        except Exception as e:
            import traceback

            self._init_error = f"model actor set-up failed: {type(e).__name__}: {e}\n{traceback.format_exc()}"

    @classmethod
    def in_process(cls, model, *, batch_size: int, latents: bool = False) -> "TokenizerActor":
        """An instance for this process, on ``model`` as it is (CPU, fp32, the process's torch threads)."""
        self = cls.__new__(cls)
        self._init_error = None
        self._use_model(model.eval(), batch_size, "fp32", latents, None)
        return self

    def _setup(self, payload_ref, batch_size, precision, latents, use_gpu, cpu_threads, warmup_size) -> None:
        import ray
        import torch

        from gq_model import GQConfig, GQModel

        payload = ray.get(payload_ref[0]) if isinstance(payload_ref, list) else payload_ref
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(max(1, int(cpu_threads)))
        model = GQModel(GQConfig.from_dict(payload["config"]))
        model.load_state_dict(payload["state"], strict=True)
        if model.model_fingerprint != payload["model_fingerprint"]:
            raise RuntimeError("model weights changed in transit: fingerprint mismatch")
        self._use_model(model.to(device).eval(), batch_size, precision, latents, warmup_size)

    def _use_model(self, model, batch_size, precision, latents, warmup_size) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.batch_size = int(batch_size)
        self.autocast = precision == "bf16" and self.device.type == "cuda"
        self.latents = latents
        self.vit = model.config.arch == "vit"
        self.token_dtype = np.uint16 if tokens_fit_uint16(model.config.codebook_size) else np.int32
        if warmup_size:  # first calls pay one-off costs (kernel set-up, lazy imports): keep them out of the stats
            self._run(np.zeros((1, 3, warmup_size, warmup_size), np.uint8))

    def _run(self, images: np.ndarray):
        import torch

        x = to_model_input(images).to(self.device, non_blocking=True)
        # no_grad, not inference_mode: inference tensors cannot be updated in place from other threads, which a
        # multi-threaded search kernel may do.
        with torch.no_grad():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                mu, logvar = self.model.encode_moments(x)
            mu, logvar = mu.float(), logvar.float()
            idx, _ = self.model.quantizer.quantize(mu, logvar)
        if self.vit:  # [B, L, G] -> [B, G, h, w]; [B, L, C] -> [B, C, h, w]
            b, length, g = idx.shape
            f = self.model.downsample_factor
            h, w = images.shape[2] // f, images.shape[3] // f
            idx = idx.permute(0, 2, 1).reshape(b, g, h, w)
            mu = mu.permute(0, 2, 1).reshape(b, mu.shape[2], h, w)
        tokens = idx.cpu().numpy().astype(self.token_dtype)
        lat = mu.to(torch.float16).cpu().numpy() if self.latents else None
        return tokens, lat

    def __call__(self, table: pa.Table) -> pa.Table:
        if self._init_error:
            raise RuntimeError(self._init_error)
        n = table.num_rows
        out = {name: table.column(name) for name in _COMMON_NAMES}
        tokens, latent = [b""] * n, [b""] * n
        shapes = [[0] * n for _ in range(3)]
        lshapes = [[0] * n for _ in range(3)]
        model_s = [0.0] * n
        kinds = table.column("kind").to_pylist()
        errors = table.column("error").to_pylist()
        messages = table.column("message").to_pylist()
        ok = [i for i, k in enumerate(kinds) if k == ROW_OK]
        if ok:
            imgs = table.column("img").to_pylist()
            hs, ws = table.column("img_h").to_pylist(), table.column("img_w").to_pylist()
            groups: dict[tuple[int, int], list[int]] = {}
            for i in ok:
                groups.setdefault((hs[i], ws[i]), []).append(i)
            for (h, w), members in groups.items():
                for c0 in range(0, len(members), self.batch_size):
                    chunk = members[c0:c0 + self.batch_size]
                    arrs = np.stack([np.frombuffer(imgs[i], np.uint8).reshape(3, h, w) for i in chunk])
                    t0 = time.perf_counter()
                    try:
                        results = [(chunk, self._run(arrs))]
                    except Exception as chunk_error:
                        results, failures = [], {}
                        for j, i in enumerate(chunk):
                            try:
                                results.append(([i], self._run(arrs[j:j + 1])))
                            except Exception as e:
                                failures[i] = clean_message(f"{type(e).__name__}: {e}")
                        if not results:
                            raise RuntimeError(f"the model fails on every image of a batch of {len(chunk)}: "
                                               f"{type(chunk_error).__name__}: {chunk_error}") from chunk_error
                        for i, msg in failures.items():
                            kinds[i], errors[i], messages[i] = ROW_ERROR, "model", msg
                    dt = (time.perf_counter() - t0) / len(chunk)
                    for rows, (tok, lat) in results:
                        for j, i in enumerate(rows):
                            tokens[i] = tok[j].tobytes()
                            shapes[0][i], shapes[1][i], shapes[2][i] = tok[j].shape
                            if lat is not None:
                                latent[i] = lat[j].tobytes()
                                lshapes[0][i], lshapes[1][i], lshapes[2][i] = lat[j].shape
                            model_s[i] = dt
        out["kind"], out["error"], out["message"] = kinds, errors, messages
        out.update(tokens=tokens, tg=shapes[0], th=shapes[1], tw=shapes[2], latent=latent, lc=lshapes[0],
                   lh=lshapes[1], lw=lshapes[2], model_s=model_s)
        return pa.Table.from_pydict(out, schema=TOKEN_SCHEMA)
