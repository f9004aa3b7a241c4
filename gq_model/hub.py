"""Models on the Hugging Face Hub: ``hf://owner/repo[@revision]/path/file.ckpt`` and the ``official:NAME`` alias.

``official:sd3unet_gq_0.25`` is the checkpoint the reference README points to, ``sd3unet_gq_0.25.ckpt`` in the Hub
repository ``xutongda/GQModel``. Loading one:

1. downloads the file through ``huggingface_hub.hf_hub_download``, so its cache (``HF_HUB_CACHE`` / ``HF_HOME``), its
   endpoint (``HF_ENDPOINT``) and offline mode (``HF_HUB_OFFLINE``) work as in every other library using the Hub.
   The environment is read at each call (``huggingface_hub`` reads it once, at import);
2. verifies the cached file against the Hub's ETag, which is the file's sha256 for LFS files (the git blob sha1 for
   small ones): ``huggingface_hub`` only checks the size. A corrupt file is removed from the cache and refused;
3. reads it with :func:`gq_model.safe_load.load_torch_file`, always ``weights_only``: a Hub file is never trusted;
4. builds the architecture from the preset named like the file (``sd3unet_gq_0.25.ckpt`` -> preset
   ``sd3unet_gq_0.25``), unless a preset or reference YAML is given;
5. saves it once as a safetensors bundle under ``$GQ_CACHE/bundles`` (default ``~/.cache/gq``), keyed by the
   checkpoint's sha256 and the architecture, so later loads skip the pickle and the hash of the large file. A bundle
   carries its own ``weights_sha256``, checked at each load.

Offline with nothing cached is an error that names the URL to fetch.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["OFFICIAL_REPO", "HubFile", "parse_hub_spec", "is_hub_spec", "infer_preset", "download", "load_hub_model",
           "gq_cache_dir", "HubCheckpoint", "fetch_hub_checkpoint", "verify_cached_file", "save_cached_bundle",
           "discard_cached_bundle"]

log = logging.getLogger(__name__)

OFFICIAL_REPO = "xutongda/GQModel"
OFFICIAL_PREFIX = "official:"
HF_PREFIX = "hf://"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    revision: str = "main"

    @property
    def spec(self) -> str:
        rev = "" if self.revision == "main" else f"@{self.revision}"
        return f"{HF_PREFIX}{self.repo_id}{rev}/{self.filename}"

    def url(self, endpoint: str | None = None) -> str:
        """The ``resolve`` URL the file is fetched from (what a user downloads by hand)."""
        return f"{(endpoint or _endpoint()).rstrip('/')}/{self.repo_id}/resolve/{self.revision}/{self.filename}"


def is_hub_spec(spec: Any) -> bool:
    return isinstance(spec, str) and (spec.startswith(HF_PREFIX) or spec.startswith(OFFICIAL_PREFIX))


def parse_hub_spec(spec: str) -> HubFile:
    """``hf://owner/repo[@revision]/path/to/file`` or ``official:NAME`` (-> ``NAME.ckpt`` in the official repo)."""
    if spec.startswith(OFFICIAL_PREFIX):
        from gq_model.reference_config import list_presets

        name = spec[len(OFFICIAL_PREFIX):]
        if name.endswith(".ckpt"):
            name = name[:-len(".ckpt")]
        if name not in list_presets():
            raise ValueError(f"{spec}: unknown official model {name!r}; the names are the presets "
                             f"{', '.join(list_presets())} (the released checkpoint is official:sd3unet_gq_0.25)")
        return HubFile(OFFICIAL_REPO, f"{name}.ckpt")
    if not spec.startswith(HF_PREFIX):
        raise ValueError(f"{spec!r} is not a Hub model spec (hf://owner/repo/file or official:NAME)")
    parts = spec[len(HF_PREFIX):].split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{spec}: expected hf://owner/repo[@revision]/path/to/file.ckpt")
    repo, revision = parts[1], "main"
    if "@" in repo:
        repo, revision = repo.split("@", 1)
        if not repo or not revision:
            raise ValueError(f"{spec}: an empty repository or revision around '@'")
    if any(p in (".", "..") for p in parts[2:]):
        raise ValueError(f"{spec}: '.' and '..' are not allowed in a Hub file path")
    return HubFile(f"{parts[0]}/{repo}", "/".join(parts[2:]), revision)


def infer_preset(filename: str) -> str | None:
    """The built-in preset a checkpoint's file name names (``sd3unet_gq_0.25.ckpt`` -> ``sd3unet_gq_0.25``)."""
    from gq_model.reference_config import list_presets

    stem = os.path.basename(filename)
    for ext in (".ckpt", ".pt", ".pth", ".bin"):
        if stem.endswith(ext):
            stem = stem[:-len(ext)]
            break
    return stem if stem in list_presets() else None


# ------------------------------------------------------------------------------------------------ environment
def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_cache() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def gq_cache_dir() -> str:
    """gq's own cache (``$GQ_CACHE``, default ``~/.cache/gq``)."""
    return os.path.expanduser(os.environ.get("GQ_CACHE") or os.path.join("~", ".cache", "gq"))


# ------------------------------------------------------------------------------------------------ download
def download(hub_file: HubFile, *, verify: bool = True) -> str:
    """Local path of the file in the Hub cache, downloaded when it is not there yet, and verified unless told not to
    (:func:`gq_model.loading.load_hub_model` verifies only when it reads the file, not when its converted bundle is
    cached)."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError as e:  # pragma: no cover - installed with datasets
        raise ImportError(f"{hub_file.spec}: loading from the Hub needs huggingface_hub (pip install "
                          f"huggingface_hub), or download {hub_file.url()} yourself and pass the file") from e
    offline = _offline()
    try:
        path = hf_hub_download(hub_file.repo_id, hub_file.filename, revision=hub_file.revision,
                               cache_dir=_hub_cache(), endpoint=_endpoint(), local_files_only=offline)
    except LocalEntryNotFoundError as e:
        why = ("HF_HUB_OFFLINE is set" if offline else f"the Hub at {_endpoint()} could not be reached")
        raise FileNotFoundError(
            f"{hub_file.spec}: not in the Hugging Face cache ({_hub_cache()}) and {why}. Download {hub_file.url()} "
            f"when online (or unset HF_HUB_OFFLINE), or fetch it by hand and pass the local .ckpt with --preset") from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"{hub_file.spec}: the Hub has no repository {hub_file.repo_id!r} at revision "
                                f"{hub_file.revision!r} ({hub_file.url()}): {str(e).splitlines()[0]}") from e
    except EntryNotFoundError as e:
        raise FileNotFoundError(f"{hub_file.spec}: the repository {hub_file.repo_id} has no file "
                                f"{hub_file.filename!r} ({hub_file.url()})") from e
    except HfHubHTTPError as e:
        raise OSError(f"{hub_file.spec}: the Hub refused {hub_file.url()}: {str(e).splitlines()[0]}") from e
    if verify:
        verify_cached_file(hub_file, path)
    return path


def _file_digest(path: str, algorithm: str, prefix: bytes = b"") -> str:
    h = hashlib.new(algorithm)
    h.update(prefix)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_cached_file(hub_file: HubFile, path: str) -> None:
    """Check the cached blob against its name, the Hub's ETag: sha256 for LFS files, git blob sha1 otherwise."""
    blob = os.path.realpath(path)
    etag = os.path.basename(blob)
    if _SHA256.match(etag):
        got = _file_digest(blob, "sha256")
    elif _SHA1.match(etag):
        got = _file_digest(blob, "sha1", b"blob %d\0" % os.path.getsize(blob))
    else:
        raise ValueError(f"{hub_file.spec}: the cached file {path} is not named by a content hash, so it cannot be "
                         f"verified (a cache made without symlinks?). Remove it and download {hub_file.url()} again")
    if got != etag:
        for p in {path, blob}:
            try:
                os.remove(p)
            except OSError:
                pass
        raise ValueError(f"{hub_file.spec}: the downloaded file does not match the Hub's checksum (expected {etag}, "
                         f"got {got}); it was removed from the cache. Download it again: {hub_file.url()}")


def _content_sha256(path: str) -> str:
    """The sha256 the Hub names a cached file by (its blob name, for LFS files), else computed from its bytes."""
    etag = os.path.basename(os.path.realpath(path))
    return etag if _SHA256.match(etag) else _file_digest(path, "sha256")


# ------------------------------------------------------------------------------------------------ loading
def _architecture(hub_file: HubFile, config: str | None, preset: str | None) -> tuple[str | None, str | None, str]:
    """(config, preset, cache key part) for a Hub checkpoint: the override, else the preset its name names."""
    if config is not None and preset is not None:
        raise ValueError("give either a reference YAML (config / --config) or a preset (--preset), not both")
    if config is not None:
        from gq_model.reference_config import load_reference_config
        import json

        ref = load_reference_config(config)
        text = json.dumps({k: v for k, v in ref.items() if k != "source"}, sort_keys=True, default=str)
        return config, None, "cfg-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    if preset is None:
        preset = infer_preset(hub_file.filename)
        if preset is None:
            from gq_model.reference_config import list_presets

            raise ValueError(f"{hub_file.spec}: the architecture cannot be inferred from the file name "
                             f"{os.path.basename(hub_file.filename)!r}; pass a preset ({', '.join(list_presets())}) "
                             f"or the reference YAML (--preset / --config)")
    return None, preset, preset


class HubCheckpoint(NamedTuple):
    """A Hub checkpoint on local disk, with the architecture to read it with and its converted bundle's place."""

    hub_file: HubFile
    path: str  # the downloaded file (not yet verified against the Hub's checksum)
    config: str | None  # reference YAML, or None
    preset: str | None  # preset name, or None
    bundle_dir: str  # $GQ_CACHE/bundles/<sha256>-<architecture>


def fetch_hub_checkpoint(spec: str, *, config: str | None = None, preset: str | None = None) -> HubCheckpoint:
    """Download ``hf://...`` / ``official:NAME`` (steps 1 and 4 of the module docstring). The model is assembled by
    :func:`gq_model.loading.load_hub_model`, which verifies the file (:func:`verify_cached_file`) unless its converted
    bundle is already cached."""
    hub_file = parse_hub_spec(spec)
    config, preset, arch_key = _architecture(hub_file, config, preset)
    path = download(hub_file, verify=False)
    bundle_dir = os.path.join(gq_cache_dir(), "bundles", f"{_content_sha256(path)}-{arch_key}")
    return HubCheckpoint(hub_file, path, config, preset, bundle_dir)


def discard_cached_bundle(spec: str, bundle_dir: str, error: Exception) -> None:
    """A damaged cache entry is rebuilt, never used."""
    log.warning("%s: cached bundle %s is unusable (%s); rebuilding it from the checkpoint", spec, bundle_dir, error)
    shutil.rmtree(bundle_dir, ignore_errors=True)


def __getattr__(name: str):
    """``load_hub_model`` moved to :mod:`gq_model.loading` (it assembles a model); the old import path still works."""
    if name == "load_hub_model":
        from gq_model.loading import load_hub_model

        return load_hub_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def save_cached_bundle(model, bundle_dir: str, spec: str, hub_file: HubFile) -> None:
    """Write the bundle beside its final name, then rename: a reader never sees half a cache entry."""
    tmp = f"{bundle_dir}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(bundle_dir), exist_ok=True)
        model.save_pretrained(tmp, converted_from=spec, hub_url=hub_file.url("https://huggingface.co"))
        try:
            os.rename(tmp, bundle_dir)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("%s: could not cache the converted bundle in %s (%s); the next load reads the .ckpt again",
                    spec, bundle_dir, e)
