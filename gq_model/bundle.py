"""Model bundles: a directory (local or any fsspec URL) with ``config.json`` and ``model.safetensors``.

The bundle stores the encoder/decoder weights *and* the codebook tensor with its fingerprint. The codebook is always
regenerated from (K, m, seed) on load and compared with the stored one, so a bundle made with a different codebook
(seed, size, or a torch whose Sobol differs) is refused with a message saying what differs instead of silently
producing other tokens. ``config.json`` records the sha256 of the weights file, and a bundle without it is refused
(:func:`read_bundle` says how to re-save it), so a swapped or damaged weights file never loads silently. No pickle is
involved anywhere.
"""
from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from gq_model.codebook import codebook_fingerprint
from gq_model.config import GQConfig
from gq_model.storage import put_atomic, url_to_fs

__all__ = ["save_bundle", "read_bundle", "BundleParts", "read_bundle_config", "verify_codebook", "resolve_model_url",
           "BUNDLE_FORMAT", "CONFIG_NAME", "WEIGHTS_NAME"]

BUNDLE_FORMAT = "gq-bundle"
BUNDLE_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CODEBOOK_KEY = "quantizer.codebook"


def _builtin_dir(name: str) -> str | None:
    root = resources.files("gq_model") / "builtin" / name
    return str(root) if root.is_dir() and (root / CONFIG_NAME).is_file() else None


def resolve_model_url(url: str) -> str:
    """Map a built-in model name (e.g. ``"demo"``) to its packaged directory; other URLs pass through."""
    url = os.fspath(url)
    if "/" not in url and "://" not in url and not os.path.exists(url):
        path = _builtin_dir(url)
        if path is None:
            raise FileNotFoundError(f"{url!r} is neither an existing path nor a built-in model name")
        return path
    return url


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def save_bundle(model, url: str, storage_options: dict[str, Any] | None = None, **extra: Any) -> None:
    """Save ``model`` (a GQModel) as a bundle under ``url`` (``storage_options`` go to fsspec, e.g. an S3 endpoint)."""
    fs, path = url_to_fs(url, storage_options)
    fs.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tensors[CODEBOOK_KEY] = model.quantizer.codebook.detach().to("cpu").contiguous()
    fingerprint = codebook_fingerprint(tensors[CODEBOOK_KEY])
    payload = save_safetensors_bytes(tensors, metadata={"format": BUNDLE_FORMAT, "codebook_fingerprint": fingerprint})
    config = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "config": model.config.to_dict(),
        "codebook_fingerprint": fingerprint,
        "model_fingerprint": model.model_fingerprint,
        "weights_sha256": hashlib.sha256(payload).hexdigest(),
        "extra": extra,
    }
    put_atomic(fs, _join(path, WEIGHTS_NAME), payload)
    put_atomic(fs, _join(path, CONFIG_NAME), json.dumps(config, indent=2, sort_keys=True).encode())


def read_bundle_config(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parsed ``config.json`` of a bundle, validated."""
    url = resolve_model_url(url)
    fs, path = url_to_fs(url, storage_options)
    cfg_path = _join(path, CONFIG_NAME)
    if not fs.exists(cfg_path):
        raise FileNotFoundError(f"{url} is not a GQ bundle: {CONFIG_NAME} not found")
    try:
        with fs.open(cfg_path, "rb") as f:
            meta = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); the bundle is corrupt") from e
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{cfg_path} is not a GQ bundle config (format={meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > BUNDLE_VERSION:
        raise ValueError(f"{url} has bundle format version {meta['format_version']}; this gq reads up to "
                         f"{BUNDLE_VERSION}: upgrade gq")
    return meta


class BundleParts(NamedTuple):
    """What a bundle holds: the architecture and weights a ``GQModel`` is assembled from, plus what checks them."""

    config: GQConfig
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]  # the parsed config.json
    codebook: torch.Tensor | None  # the stored codebook, compared with the regenerated one
    weights_path: str  # named in errors


def read_bundle(url: str, storage_options: dict[str, Any] | None = None, *, trust_unhashed: bool = False
                ) -> BundleParts:
    """The parts of a bundle (:class:`BundleParts`), its weights verified against their sha256.

    ``config.json`` must record the sha256 of ``model.safetensors``; a bundle without it (saved before gq wrote the
    hash) is read only with ``trust_unhashed=True``, meant for re-saving it once with the hash. The model is
    assembled by :func:`gq_model.loading.load_bundle`, which also checks the stored codebook
    (:func:`verify_codebook`).
    """
    url = resolve_model_url(url)
    meta = read_bundle_config(url, storage_options)
    fs, path = url_to_fs(url, storage_options)
    weights_path = _join(path, WEIGHTS_NAME)
    if not fs.exists(weights_path):
        raise FileNotFoundError(f"{url}: {WEIGHTS_NAME} not found")
    with fs.open(weights_path, "rb") as f:
        payload = f.read()
    expected_sha = meta.get("weights_sha256")
    if not expected_sha and not trust_unhashed:
        raise ValueError(
            f"{url}: {CONFIG_NAME} records no weights_sha256 (the bundle was saved by a gq from before bundles carried "
            f"the hash), so its weights cannot be checked against tampering or corruption. If you trust it, re-save it "
            f"once: python -c \"from gq_model import GQModel; GQModel.from_pretrained({url!r}, "
            f"trust_unhashed=True).save_pretrained('NEW_DIR')\" and use NEW_DIR")
    if expected_sha and hashlib.sha256(payload).hexdigest() != expected_sha:
        raise ValueError(f"{weights_path} does not match the sha256 recorded in {CONFIG_NAME}: the file is truncated "
                         f"or corrupt ({len(payload)} bytes read)")
    try:
        tensors = load_safetensors_bytes(payload)
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from e
    codebook = tensors.pop(CODEBOOK_KEY, None)
    return BundleParts(GQConfig.from_dict(meta["config"]), tensors, meta, codebook, weights_path)


def verify_codebook(url: str, meta: dict[str, Any], stored: torch.Tensor | None, config: GQConfig,
                    regenerated: str) -> None:
    """Refuse a bundle whose stored codebook is missing, modified, or not the one ``config`` regenerates here."""
    cfg = config
    recorded = meta.get("codebook_fingerprint")
    where = f"(K={cfg.codebook_size}, m={cfg.group}, seed={cfg.seed})"
    if stored is None:
        raise ValueError(f"{url}: the bundle has no stored codebook ({CODEBOOK_KEY})")
    stored_fp = codebook_fingerprint(stored)
    if tuple(stored.shape) != (cfg.codebook_size, cfg.group):
        raise ValueError(f"{url}: stored codebook has shape {tuple(stored.shape)} but the config says {where}")
    if stored_fp != recorded:
        raise ValueError(f"{url}: stored codebook fingerprint {stored_fp} differs from the one recorded in "
                         f"{CONFIG_NAME} ({recorded}); the bundle was modified")
    if stored_fp != regenerated:
        raise ValueError(f"{url}: the bundle's codebook (fingerprint {stored_fp}) differs from the codebook this "
                         f"installation regenerates for {where} (fingerprint {regenerated}); its tokens would not "
                         f"match. Was the bundle made with another seed or another torch Sobol implementation?")


def __getattr__(name: str):
    """``load_bundle`` moved to :mod:`gq_model.loading` (it assembles a model); the old import path still works."""
    if name == "load_bundle":
        from gq_model.loading import load_bundle

        return load_bundle
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
