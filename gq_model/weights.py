"""The pretrained weight files gq's perceptual loss and metrics need: one home that finds, downloads and verifies them.

Used by LPIPS-VGG (the training loss, :mod:`gq_model.losses.lpips`), LPIPS-AlexNet (``gq eval``,
:mod:`gq_model.metrics.lpips_alex`) and the FID InceptionV3 (``gq eval``'s rFID, :mod:`gq_model.metrics.inception`).
Every file resolves like the libraries users know (first hit wins):

1. **an explicit path or URL** (a config key or CLI flag; local or any fsspec URL). Used as given: a missing file is an
   error, never a fall-back. Its SHA-256 is compared with the published one when it is read; a different file still
   loads (custom or test weights), with a warning, since its numbers are not comparable with published ones;
2. **the cache**, ``$GQ_CACHE/weights/<name>`` (``GQ_CACHE`` defaults to ``~/.cache/gq``). A cached file is verified
   before use; one that fails is deleted (with a warning) and fetched again;
3. for the LPIPS v0.1 linear heads only: **the installed ``lpips`` distribution** (its ``weights/v0.1`` folder), found
   with :func:`importlib.util.find_spec` / :mod:`importlib.metadata` *without importing lpips* (which needs
   torchvision) and verified against that distribution's own ``RECORD`` hashes;
4. **a download** from the canonical URL, or from ``$GQ_WEIGHTS_BASE_URL/<name>`` (a mirror, or a test server), into
   a temporary name in the cache, verified, then renamed into place: a corrupt or truncated download is deleted and
   refused, never cached. ``GQ_OFFLINE=1`` (or ``download=False``) skips this step.

What "verified" means per file, and why: torch.hub names its files ``<name>-<first 8+ hex digits of the SHA-256>.pth``
(torchvision's VGG16 and AlexNet, the FID Inception), and that prefix is all that is published about them; their full
digests are not known offline, so only the prefix is checked (plus the strict state-dict load the networks do). The two
LPIPS v0.1 heads are checked against their full SHA-256, read from the ``RECORD`` of the ``lpips`` 0.1.4 wheel; the
VGG heads' MD5 there also equals the one taming-transformers publishes for its ``vgg.pth``.

When a file cannot be found or fetched, :class:`WeightsUnavailable` names every missing file with its URL, expected
hash and cache path, what was tried, and the ways out (``gq weights fetch ...``, or switching the term off on purpose).
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import importlib.metadata
import importlib.util
import logging
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["WeightFile", "Resolved", "WeightsUnavailable", "FILES", "GROUPS", "cache_dir", "weights_dir",
           "download_url", "downloads_allowed", "resolve", "resolve_group", "fetch", "cache_status", "sha256_file",
           "lpips_package_file", "check_explicit_digest"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightFile:
    """One published weight file: where it comes from and how it is checked.

    ``sha256`` is the full published digest when known; ``sha256_prefix`` the torch.hub file-name prefix otherwise
    (the full digest of those files is not known offline, so only the prefix is checked). ``lpips_file`` is the path
    of the file inside an installed ``lpips`` package, for files that wheel ships.
    """

    key: str
    name: str
    url: str
    what: str
    sha256: str | None = None
    sha256_prefix: str | None = None
    size: int | None = None
    lpips_file: str | None = None

    def matches(self, digest: str) -> bool:
        if self.sha256:
            return digest == self.sha256
        if self.sha256_prefix:
            return digest.startswith(self.sha256_prefix)
        return False

    @property
    def expected(self) -> str:
        if self.sha256:
            return f"sha256 {self.sha256}"
        return (f"sha256 starting {self.sha256_prefix} "
                "(the torch.hub file-name prefix; the full digest is not published)")


FILES: dict[str, WeightFile] = {f.key: f for f in (
    WeightFile("vgg16", "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth",
               "torchvision VGG16 ImageNet weights (LPIPS-VGG backbone, features.* used)", sha256_prefix="397923af"),
    WeightFile("lpips-vgg-heads", "lpips-v0.1-vgg.pth",
               "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/vgg.pth",
               "LPIPS v0.1 linear heads for VGG (vgg.pth)",
               sha256="a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868", size=7289,
               lpips_file="weights/v0.1/vgg.pth"),
    WeightFile("alexnet", "alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
               "torchvision AlexNet ImageNet weights (LPIPS-AlexNet backbone, features.* used)",
               sha256_prefix="7be5be79"),
    WeightFile("lpips-alex-heads", "lpips-v0.1-alex.pth",
               "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/alex.pth",
               "LPIPS v0.1 linear heads for AlexNet (alex.pth)",
               sha256="df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0", size=6009,
               lpips_file="weights/v0.1/alex.pth"),
    WeightFile("fid-inception", "pt_inception-2015-12-05-6726825d.pth",
               "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth",
               "FID InceptionV3 (the TF 2015-12-05 graph, as pytorch-fid publishes it)", sha256_prefix="6726825d"),
)}

# What `gq weights fetch` takes, and what each network needs.
GROUPS: dict[str, tuple[str, ...]] = {
    "lpips-vgg": ("vgg16", "lpips-vgg-heads"),
    "lpips-alex": ("alexnet", "lpips-alex-heads"),
    "fid-inception": ("fid-inception",),
}
GROUP_TITLES = {"lpips-vgg": "LPIPS-VGG", "lpips-alex": "LPIPS-AlexNet", "fid-inception": "the FID InceptionV3"}


@dataclass(frozen=True)
class Resolved:
    """Where a weight file was found. ``source``: explicit | cache | lpips-package | download. ``verified``: True
    when its digest was checked and matched, None for an explicit file (checked when it is read)."""

    key: str
    path: str
    source: str
    sha256: str | None = None
    verified: bool | None = None


class WeightsUnavailable(FileNotFoundError):
    """Weight files that are neither given, cached, installed nor downloadable. The message says what to do."""


# ---------------------------------------------------------------------------------------------------------- places
def cache_dir() -> str:
    """``$GQ_CACHE`` or ``~/.cache/gq``: the root of gq's cache (weight files live in its ``weights/`` folder)."""
    return os.path.abspath(os.path.expanduser(os.environ.get("GQ_CACHE") or os.path.join("~", ".cache", "gq")))


def weights_dir(cache: str | None = None) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(cache)) if cache else cache_dir(), "weights")


def download_url(spec: WeightFile, base_url: str | None = None) -> str:
    """The canonical URL, or ``<base_url or $GQ_WEIGHTS_BASE_URL>/<name>`` for a mirror."""
    base = base_url if base_url is not None else os.environ.get("GQ_WEIGHTS_BASE_URL")
    return f"{base.rstrip('/')}/{spec.name}" if base else spec.url


def downloads_allowed(download: bool | None = None) -> bool:
    """``download`` when given, else False only when ``GQ_OFFLINE`` is set to 1/true/yes."""
    if download is not None:
        return bool(download)
    return os.environ.get("GQ_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------------------- hashing
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def check_explicit_digest(spec: WeightFile, label: str, digest: str) -> bool:
    """Whether an explicitly given file is the published one; warns when it is not (it is still used)."""
    if spec.matches(digest):
        return True
    warnings.warn(f"{label}: sha256 {digest[:16]}... is not the published {spec.name} ({spec.expected}); it is "
                  f"used as given, but numbers computed with it are not comparable with published ones",
                  RuntimeWarning, stacklevel=3)
    return False


# ---------------------------------------------------------------------------------------------------------- lpips wheel
def lpips_package_file(relative: str) -> tuple[str, str | None] | None:
    """(path, sha256 hex from the distribution's RECORD or None) of ``relative`` inside an installed ``lpips``.

    Found through ``importlib.util.find_spec("lpips")``, which locates a top-level package without running its
    ``__init__`` (importing lpips would need torchvision); the RECORD entry is matched by location, so a second lpips
    on another sys.path entry cannot vouch for this one.
    """
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, *relative.split("/"))
        if os.path.isfile(path):
            return path, _record_sha256(path)
    return None


def _record_sha256(path: str) -> str | None:
    real = os.path.realpath(path)
    for dist in importlib.metadata.distributions(name="lpips"):
        for f in dist.files or ():
            if f.hash is None or f.hash.mode != "sha256":
                continue
            if os.path.realpath(str(dist.locate_file(f))) == real:
                raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
                return raw.hex()
    return None


# ---------------------------------------------------------------------------------------------------------- download
def _download(spec: WeightFile, url: str, folder: str, timeout: float) -> tuple[str, str]:
    """Stream ``url`` into a temporary file in ``folder``, verify, rename to ``folder/<name>``: (path, sha256).

    The temporary name is unique per process, so concurrent ranks fetching the same file never see each other's
    partial data, and a verified file replaces the name atomically.
    """
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.name}.", suffix=".part", dir=folder)
    h, n = hashlib.sha256(), 0
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "gq-weights"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=timeout) as r:
            expected_len = r.headers.get("Content-Length")
            log.warning("downloading %s (%s) from %s", spec.name,
                        f"{int(expected_len) / 1e6:.1f} MB" if expected_len else "size unknown", url)
            for chunk in iter(lambda: r.read(_CHUNK), b""):
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)
        digest = h.hexdigest()
        if expected_len is not None and n != int(expected_len):
            raise ValueError(f"truncated download: {n} of {expected_len} bytes")
        if not spec.matches(digest):
            raise ValueError(f"corrupt download refused: sha256 {digest} does not match the expected {spec.expected}")
        final = os.path.join(folder, spec.name)
        os.replace(tmp, final)
        return final, digest
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---------------------------------------------------------------------------------------------------------- resolution
def _exists(url: str, storage_options: Mapping[str, Any] | None) -> bool:
    from gq_model.storage import url_to_fs

    fs, p = url_to_fs(url, storage_options)
    return bool(fs.isfile(p))


def resolve(key: str, explicit: str | None = None, *, storage_options: Mapping[str, Any] | None = None,
            download: bool | None = None, base_url: str | None = None, cache: str | None = None,
            timeout: float = 60.0, files: Mapping[str, WeightFile] | None = None,
            _tried: list[str] | None = None) -> Resolved | None:
    """Find one weight file (explicit -> cache -> lpips package -> download); None when it cannot be had.

    ``_tried`` collects one line per place that was tried and failed (used for the error message). An explicit path
    that does not exist raises FileNotFoundError at once: the user asked for that file.
    """
    spec = (files or FILES)[key]
    tried = _tried if _tried is not None else []
    if explicit:
        try:
            found = _exists(os.fspath(explicit), storage_options)
        except Exception as e:  # a broken URL is a missing file here
            raise FileNotFoundError(f"{spec.name}: {explicit!r} cannot be opened ({e})") from e
        if not found:
            raise FileNotFoundError(f"{spec.name}: {explicit!r} does not exist")
        return Resolved(key, os.fspath(explicit), "explicit")

    folder = weights_dir(cache)
    cached = os.path.join(folder, spec.name)
    if os.path.isfile(cached):
        digest = sha256_file(cached)
        if spec.matches(digest):
            return Resolved(key, cached, "cache", digest, True)
        msg = f"cached {cached} is corrupt (sha256 {digest[:16]}..., expected {spec.expected}): deleted"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
        tried.append(msg)
        os.unlink(cached)

    if spec.lpips_file:
        found = lpips_package_file(spec.lpips_file)
        if found is not None:
            path, record = found
            digest = sha256_file(path)
            if spec.matches(digest):
                return Resolved(key, path, "lpips-package", digest, True)
            if record is not None and digest == record:
                warnings.warn(f"{path}: verified by the installed lpips distribution's RECORD, but it is not lpips "
                              f"0.1.4's {os.path.basename(spec.lpips_file)} ({spec.expected})", RuntimeWarning,
                              stacklevel=2)
                return Resolved(key, path, "lpips-package", digest, True)
            tried.append(f"installed lpips: {path} does not match "
                         f"{'its RECORD' if record else 'the published digest (and has no RECORD hash)'}: not used")

    if not downloads_allowed(download):
        tried.append("download skipped (GQ_OFFLINE is set)" if download is None else "download not allowed")
        return None
    url = download_url(spec, base_url)
    try:
        path, digest = _download(spec, url, folder, timeout)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        tried.append(f"download from {url} failed: {reason}")
        return None
    return Resolved(key, path, "download", digest, True)


def _describe(spec: WeightFile, url: str, cache: str | None) -> list[str]:
    lines = [f"  - {spec.name}: {spec.what}", f"      url:    {spec.url}"]
    if url != spec.url:
        lines.append(f"      mirror: {url} (GQ_WEIGHTS_BASE_URL)")
    return lines + [f"      expect: {spec.expected}", f"      cache:  {os.path.join(weights_dir(cache), spec.name)}"]


def resolve_group(group: str, explicit: Mapping[str, str | None] | None = None, *, purpose: str | None = None,
                  ways_out: Sequence[str] = (), storage_options: Mapping[str, Any] | None = None,
                  download: bool | None = None, base_url: str | None = None, cache: str | None = None,
                  timeout: float = 60.0, files: Mapping[str, WeightFile] | None = None) -> dict[str, Resolved]:
    """Every file of ``group`` (see :data:`GROUPS`) resolved, keyed by file key; :class:`WeightsUnavailable` naming
    all the missing ones (URL, hash, cache path, what was tried) and the ways out otherwise."""
    table = files or FILES
    explicit = explicit or {}
    out, missing = {}, []
    for key in GROUPS[group]:
        tried: list[str] = []
        r = resolve(key, explicit.get(key), storage_options=storage_options, download=download, base_url=base_url,
                    cache=cache, timeout=timeout, files=table, _tried=tried)
        if r is None:
            missing.append((table[key], tried))
        else:
            out[key] = r
    if missing:
        title = GROUP_TITLES.get(group, group)
        lines = [f"{title}{f' ({purpose})' if purpose else ''} needs {len(missing)} weight file(s) that are not set, "
                 f"not cached and could not be downloaded:"]
        for spec, tried in missing:
            lines += _describe(spec, download_url(spec, base_url), cache)
            lines += [f"      tried:  {t}" for t in tried]
        lines.append("Ways out:")
        lines.append(f"  * fetch them once, where there is network: `gq weights fetch {group}` (into "
                     f"{weights_dir(cache)}; set GQ_CACHE to move it), or copy the files there by hand;")
        lines += [f"  * {w}" for w in ways_out]
        raise WeightsUnavailable("\n".join(lines))
    return out


def fetch(names: Iterable[str], *, download: bool | None = None, base_url: str | None = None,
          cache: str | None = None, timeout: float = 60.0) -> dict[str, Resolved]:
    """Make every file of the named groups (or ``all``) available locally; WeightsUnavailable for what is not."""
    groups = list(GROUPS) if "all" in names else list(dict.fromkeys(names))
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise ValueError(f"unknown weight group(s) {bad}; choose from {', '.join([*GROUPS, 'all'])}")
    out, errors = {}, []
    for g in groups:
        try:
            out.update(resolve_group(g, download=download, base_url=base_url, cache=cache, timeout=timeout))
        except WeightsUnavailable as e:
            errors.append(str(e))
    if errors:
        raise WeightsUnavailable("\n\n".join(errors))
    return out


def cache_status(cache: str | None = None, verify: bool = True) -> list[dict[str, Any]]:
    """One row per known file: key, name, path, cached, size, verified (None when not cached or not checked), and
    where else it is available (the installed lpips package)."""
    rows = []
    folder = weights_dir(cache)
    for spec in FILES.values():
        path = os.path.join(folder, spec.name)
        row: dict[str, Any] = {"key": spec.key, "name": spec.name, "path": path, "cached": os.path.isfile(path),
                               "size": None, "verified": None, "url": spec.url, "expected": spec.expected,
                               "lpips_package": None}
        if row["cached"]:
            row["size"] = os.path.getsize(path)
            if verify:
                row["verified"] = spec.matches(sha256_file(path))
        if spec.lpips_file:
            found = lpips_package_file(spec.lpips_file)
            row["lpips_package"] = found[0] if found else None
        rows.append(row)
    return rows
