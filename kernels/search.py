"""Dispatching entry points for the GQ codebook search: ``gq_search`` (best index) and ``gq_search_topk``.

Both are registered as torch custom ops (``gq_kernels::search``, ``gq_kernels::search_topk``) with fake (meta)
implementations, so a model that calls them can be ``torch.compile``-d: the compiler sees one opaque op with a known
output shape instead of tracing the tile loops or a Triton launch.

Backends: ``"auto"`` runs the fused Triton kernel on CUDA tensors (the torch path if Triton is missing) and the blocked
torch path (:mod:`kernels.search_cpu`) otherwise; ``"torch"`` and ``"triton"`` force one. ``"triton"`` on CPU tensors
only works under the Triton interpreter (``TRITON_INTERPRET=1`` in the environment before Triton is first used);
otherwise it raises. Our Triton module is imported lazily, only when the Triton backend is chosen.
"""
from __future__ import annotations

import functools
import math
import os
import warnings

import torch

from kernels.search_cpu import row_weights, search_blocked, search_topk_blocked

__all__ = ["gq_search", "gq_search_topk", "prepare_features", "gemm_to_log_ratio", "resolve_backend"]

_BACKENDS = ("auto", "torch", "triton")
_SCORES = ("gemm", "log_ratio")
_LOG_2PI = math.log(2.0 * math.pi)


def prepare_features(codebook: torch.Tensor) -> torch.Tensor:
    """The fixed search table ``[c, c*c]`` (float32 ``[K, 2m]``) for a codebook ``[K, m]``."""
    cb = codebook.to(torch.float32)
    return torch.cat([cb, cb * cb], dim=1).contiguous()


def _triton_module():
    from kernels import search_triton  # noqa: PLC0415  (lazy: importing triton costs ~1 s and needs the package)
    return search_triton


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    """Whether the Triton kernels import (checked once per process: a failed import is not cheap to repeat)."""
    try:
        _triton_module()
    except Exception:  # noqa: BLE001  (ImportError, or a broken triton install)
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``"torch"`` or ``"triton"``) ``backend`` means for tensors on ``device``."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            if _triton_available():
                return "triton"
            warnings.warn("triton is not importable; gq_search falls back to the blocked torch path on CUDA",
                          RuntimeWarning, stacklevel=3)
        return "torch"
    if backend == "triton" and device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(f"backend='triton' needs CUDA tensors (got {device.type}); on CPU it only runs under "
                               "the Triton interpreter: set TRITON_INTERPRET=1 before triton is first imported")
    return backend


def _check_inputs(mu: torch.Tensor, logvar: torch.Tensor, features: torch.Tensor) -> None:
    if not (isinstance(mu, torch.Tensor) and isinstance(logvar, torch.Tensor) and isinstance(features, torch.Tensor)):
        raise TypeError("mu, logvar and features must be torch tensors")
    if mu.dim() != 2 or mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must both be [rows, m]; got {tuple(mu.shape)} and {tuple(logvar.shape)}")
    m = mu.shape[1]
    if m < 1:
        raise ValueError("mu must have at least one column")
    if features.dim() != 2 or features.shape[1] != 2 * m:
        raise ValueError(f"features must be [K, 2*m] = [K, {2 * m}] (see prepare_features); "
                         f"got {tuple(features.shape)}")
    if features.shape[0] < 1:
        raise ValueError("features must hold at least one codeword")
    for name, t in (("mu", mu), ("logvar", logvar), ("features", features)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _weights_and_table(mu, logvar, features, beta):
    weights = row_weights(mu, logvar, beta)
    table = features.to(device=weights.device, dtype=torch.float32).contiguous()
    return weights, table


# ---- custom ops ---------------------------------------------------------------------------------------------------

def _search_eager(mu: torch.Tensor, logvar: torch.Tensor, features: torch.Tensor, beta: float,
                  backend: str) -> torch.Tensor:
    weights, table = _weights_and_table(mu, logvar, features, beta)
    if resolve_backend(backend, weights.device) == "triton":
        return _triton_module().triton_argmax(weights, table)
    return search_blocked(weights, table)


@torch.library.custom_op("gq_kernels::search", mutates_args=())
def _search_op(mu: torch.Tensor, logvar: torch.Tensor, features: torch.Tensor, beta: float,
               backend: str) -> torch.Tensor:
    return _search_eager(mu, logvar, features, beta, backend)


@_search_op.register_fake
def _search_fake(mu, logvar, features, beta, backend):
    return mu.new_empty((mu.shape[0],), dtype=torch.int64)


def _topk_eager(mu: torch.Tensor, logvar: torch.Tensor, features: torch.Tensor, beta: float, k: int,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    weights, table = _weights_and_table(mu, logvar, features, beta)
    if resolve_backend(backend, weights.device) == "triton":
        return _triton_module().triton_topk(weights, table, k)
    return search_topk_blocked(weights, table, k)


@torch.library.custom_op("gq_kernels::search_topk", mutates_args=())
def _topk_op(mu: torch.Tensor, logvar: torch.Tensor, features: torch.Tensor, beta: float, k: int,
             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _topk_eager(mu, logvar, features, beta, k, backend)


@_topk_op.register_fake
def _topk_fake(mu, logvar, features, beta, k, backend):
    rows = mu.shape[0]
    return mu.new_empty((rows, k), dtype=torch.int64), mu.new_empty((rows, k), dtype=torch.float32)


# ---- public API ---------------------------------------------------------------------------------------------------

def gq_search(mu: torch.Tensor, logvar: torch.Tensor, features: torch.Tensor, beta: float = 1.0, *,
              backend: str = "auto") -> torch.Tensor:
    """Best codeword per row: ``argmax_k sum_a log N(c_ka; mu_a, var_a) - beta * log N(c_ka; 0, 1)``.

    Computed as the argmax of the float32 GEMM score ``[2 mu/var, -(1/var - beta)] . [c, c*c]`` (``docs/kernels.md``).

    Args:
        mu, logvar: float ``[rows, m]`` posterior means and log-variances (clamp logvar before calling, as the
            quantizer does: the reference range [-30, 20]).
        features: ``prepare_features(codebook)``, float ``[K, 2m]``.
        beta: weight of the prior term (1.0 in every reference config; 0 gives a Mahalanobis nearest neighbour).
        backend: ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"torch"`` or ``"triton"``.
    Returns: int64 ``[rows]`` on mu's device; ties resolve to the lowest index, like ``torch.argmax``.
    """
    _check_inputs(mu, logvar, features)
    backend = resolve_backend(backend, mu.device)  # once, early, with the caller's stack for its warning
    if not torch.compiler.is_compiling():
        # Eager calls skip the op dispatcher: its first use imports torch._dynamo (seconds per process, e.g. in
        # every Ray actor), and the result is the same function.
        return _search_eager(mu, logvar, features, float(beta), backend)
    return torch.ops.gq_kernels.search(mu, logvar, features, float(beta), backend)


def gemm_to_log_ratio(scores: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float) -> torch.Tensor:
    """Convert GEMM scores ``G`` (``[rows, k]``) to the reference log-ratio score
    ``s = sum_a log N(c_a; mu_a, var_a) - beta log N(c_a; 0, 1) = (G - C_row) / 2`` with
    ``C_row = sum_a (mu_a^2/var_a + logvar_a + (1 - beta) log 2 pi)`` (row constant evaluated in float64)."""
    mu64, lv64 = mu.double(), logvar.double()
    const = (mu64 * mu64 * torch.exp(-lv64) + lv64).sum(dim=1) + mu.shape[1] * (1.0 - float(beta)) * _LOG_2PI
    return ((scores.double() - const[:, None]) * 0.5).to(torch.float32)


def gq_search_topk(mu: torch.Tensor, logvar: torch.Tensor, features: torch.Tensor, beta: float = 1.0,
                   k: int = 1, *, backend: str = "auto", score: str = "gemm") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best codewords per row, for re-ranking or sampling.

    Returns ``(indices int64 [rows, k], scores float32 [rows, k])`` sorted by descending score, ties lowest index
    first (column 0 equals :func:`gq_search`'s answer). ``score="gemm"`` (default) returns the float32 GEMM score the
    search ranks by, ``G = 2 * s + C_row`` where ``s`` is the reference log-ratio score and ``C_row`` a per-row
    constant (:func:`gemm_to_log_ratio`); differences between columns are twice the log-ratio differences, so
    ``softmax(G / 2)`` is the posterior-over-prior importance distribution restricted to the k candidates.
    ``score="log_ratio"`` returns ``s`` itself (computed from ``G``, so with the same absolute float32 error).
    """
    _check_inputs(mu, logvar, features)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= features.shape[0]:
        raise ValueError(f"k must be an int in [1, K={features.shape[0]}], got {k!r}")
    if score not in _SCORES:
        raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
    backend = resolve_backend(backend, mu.device)
    if torch.compiler.is_compiling():
        idx, val = torch.ops.gq_kernels.search_topk(mu, logvar, features, float(beta), int(k), backend)
    else:  # eager: skip the op dispatcher, as gq_search does
        idx, val = _topk_eager(mu, logvar, features, float(beta), int(k), backend)
    if score == "log_ratio":
        val = gemm_to_log_ratio(val, mu, logvar, beta)
    return idx, val
