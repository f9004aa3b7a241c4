"""Weight resolution (gq_model.weights): explicit path -> cache -> installed lpips package -> verified download, the
refusal of corrupt downloads, the offline errors of training and ``gq eval``, and ``gq weights list|fetch``.

Downloads go to a real HTTP server on 127.0.0.1 (``GQ_WEIGHTS_BASE_URL`` / ``base_url``) serving small files whose
hashes the test knows; "no network" is a closed local port. No test reaches the internet. Where a test needs a file
of the canonical table to verify, it swaps that table entry for one describing its own small file (the real
digests belong to files that are not available offline).
"""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import os
import sys
import threading
from pathlib import Path

import pytest
import torch

from gq_model import weights as W
from gq_model.cli import main as gq_main
from tests.helpers import free_port, rgb_bytes

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "train_tiny.yaml"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``directory``; ``/truncated/<name>`` announces the full length of ``<name>`` but sends half of it."""

    requests: list[str]

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.requests.append(self.path)
        if self.path.startswith("/truncated/"):
            data = (Path(self.directory) / self.path.split("/", 2)[2]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture()
def server(tmp_path):
    """(folder served, base URL, list of request paths)."""
    root = tmp_path / "www"
    root.mkdir()
    seen: list[str] = []
    handler = type("H", (_Handler,), {"requests": seen})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: handler(*a, directory=str(root), **k))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield root, f"http://127.0.0.1:{srv.server_address[1]}", seen
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """An empty gq cache, downloads allowed, and the canonical URLs pointing at a closed local port (no network)."""
    root = tmp_path / "gq-cache"
    monkeypatch.setenv("GQ_CACHE", str(root))
    monkeypatch.delenv("GQ_OFFLINE", raising=False)
    monkeypatch.setenv("GQ_WEIGHTS_BASE_URL", f"http://127.0.0.1:{free_port()}/nothing-listens-here")
    return root / "weights"


def _small_file(folder: Path, stem: str, seed: int = 0) -> tuple[bytes, str]:
    data = f"{stem} {seed} ".encode() * 300
    return data, hashlib.sha256(data).hexdigest()


def _spec(key: str, name: str, digest: str, *, prefix: bool = False, lpips_file: str | None = None) -> W.WeightFile:
    return W.WeightFile(key, name, f"https://example.invalid/{name}", f"test file {name}",
                        sha256=None if prefix else digest, sha256_prefix=digest[:8] if prefix else None,
                        lpips_file=lpips_file)


def _no_partial_files(folder: Path) -> bool:
    return not folder.exists() or not [p for p in folder.iterdir() if p.name.endswith(".part")]


# ---------------------------------------------------------------------------------------------------------- table
def test_canonical_table_names_urls_and_hashes():
    for spec in W.FILES.values():
        assert spec.url.startswith("https://") and (spec.sha256 or spec.sha256_prefix)
        if spec.sha256_prefix:  # torch.hub convention: the prefix is the file name's last -<hex> part
            assert spec.name.endswith(f"-{spec.sha256_prefix}.pth") and spec.url.endswith(spec.name)
        else:
            assert len(spec.sha256) == 64 and spec.lpips_file.startswith("weights/v0.1/")
    assert W.FILES["vgg16"].name == "vgg16-397923af.pth" and W.FILES["alexnet"].name == "alexnet-owt-7be5be79.pth"
    assert W.FILES["fid-inception"].name == "pt_inception-2015-12-05-6726825d.pth"
    assert set(W.GROUPS) == {"lpips-vgg", "lpips-alex", "fid-inception"}
    assert all(k in W.FILES for keys in W.GROUPS.values() for k in keys)


def test_cache_dir_and_mirror_url_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("GQ_CACHE", raising=False)
    assert W.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "gq")
    monkeypatch.setenv("GQ_CACHE", str(tmp_path))
    assert W.weights_dir() == str(tmp_path / "weights")
    monkeypatch.delenv("GQ_WEIGHTS_BASE_URL", raising=False)
    assert W.download_url(W.FILES["vgg16"]) == W.FILES["vgg16"].url
    monkeypatch.setenv("GQ_WEIGHTS_BASE_URL", "http://127.0.0.1:9/m/")
    assert W.download_url(W.FILES["vgg16"]) == "http://127.0.0.1:9/m/vgg16-397923af.pth"
    assert W.download_url(W.FILES["vgg16"], "http://h/x") == "http://h/x/vgg16-397923af.pth"
    monkeypatch.setenv("GQ_OFFLINE", "1")
    assert not W.downloads_allowed() and W.downloads_allowed(True)


# ---------------------------------------------------------------------------------------------------------- download
def test_download_verifies_the_full_hash_then_the_cache_serves_it(server, cache):
    root, url, seen = server
    data, digest = _small_file(root, "heads")
    (root / "heads.pth").write_bytes(data)
    table = {"h": _spec("h", "heads.pth", digest)}
    r = W.resolve("h", base_url=url, files=table)
    assert (r.source, r.verified, r.sha256) == ("download", True, digest)
    assert Path(r.path) == cache / "heads.pth" and Path(r.path).read_bytes() == data
    assert seen == ["/heads.pth"] and _no_partial_files(cache)
    again = W.resolve("h", base_url=url, files=table)
    assert (again.source, again.path, again.verified) == ("cache", r.path, True) and seen == ["/heads.pth"]


def test_download_verifies_the_hash_prefix_in_a_torch_hub_name(server, cache, monkeypatch):
    root, url, seen = server
    data, digest = _small_file(root, "backbone")
    name = f"backbone-{digest[:8]}.pth"
    (root / name).write_bytes(data)
    monkeypatch.setenv("GQ_WEIGHTS_BASE_URL", url)  # the documented override
    r = W.resolve("b", files={"b": _spec("b", name, digest, prefix=True)})
    assert r.source == "download" and r.verified and (cache / name).read_bytes() == data


def test_a_corrupt_download_is_refused_and_not_cached(server, cache, monkeypatch):
    root, url, seen = server
    data, digest = _small_file(root, "heads")
    (root / "heads.pth").write_bytes(data[:-1] + b"X")  # one byte flipped on the server
    table = {"h": _spec("h", "heads.pth", digest)}
    tried: list[str] = []
    assert W.resolve("h", base_url=url, files=table, _tried=tried) is None
    assert "corrupt download refused" in tried[0] and digest in tried[0]
    assert not (cache / "heads.pth").exists() and _no_partial_files(cache)
    # the same through the group API: the error names the file, its expected hash and what was tried
    monkeypatch.setitem(W.GROUPS, "g", ("h",))
    with pytest.raises(W.WeightsUnavailable, match=rf"(?s)heads\.pth.*sha256 {digest}.*corrupt download refused"):
        W.resolve_group("g", base_url=url, files=table)
    assert not (cache / "heads.pth").exists()


def test_a_truncated_download_is_refused(server, cache):
    root, url, seen = server
    data, digest = _small_file(root, "big")
    (root / "big.pth").write_bytes(data)
    tried: list[str] = []
    assert W.resolve("b", base_url=f"{url}/truncated", files={"b": _spec("b", "big.pth", digest)},
                     _tried=tried) is None
    assert seen == ["/truncated/big.pth"] and ("truncated" in tried[0] or "corrupt" in tried[0])
    assert not (cache / "big.pth").exists() and _no_partial_files(cache)


def test_a_corrupt_cached_file_is_deleted_and_fetched_again(server, cache):
    root, url, seen = server
    data, digest = _small_file(root, "heads")
    (root / "heads.pth").write_bytes(data)
    cache.mkdir(parents=True)
    (cache / "heads.pth").write_bytes(b"bit rot")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        r = W.resolve("h", base_url=url, files={"h": _spec("h", "heads.pth", digest)})
    assert r.source == "download" and (cache / "heads.pth").read_bytes() == data


def test_offline_means_no_request(server, cache, monkeypatch):
    root, url, seen = server
    data, digest = _small_file(root, "heads")
    (root / "heads.pth").write_bytes(data)
    monkeypatch.setenv("GQ_OFFLINE", "1")
    tried: list[str] = []
    assert W.resolve("h", base_url=url, files={"h": _spec("h", "heads.pth", digest)}, _tried=tried) is None
    assert seen == [] and "GQ_OFFLINE" in tried[0]


def test_explicit_paths_are_used_as_given(tmp_path, cache):
    data, digest = _small_file(tmp_path, "mine")
    (tmp_path / "mine.pth").write_bytes(data)
    table = {"h": _spec("h", "heads.pth", digest)}
    r = W.resolve("h", str(tmp_path / "mine.pth"), files=table)
    assert (r.source, r.path, r.verified) == ("explicit", str(tmp_path / "mine.pth"), None)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # never a silent fall-back to the cache
        W.resolve("h", str(tmp_path / "absent.pth"), files=table)


# ---------------------------------------------------------------------------------------------------------- lpips wheel
def _install_fake_lpips(site: Path, files: dict[str, bytes], record_override: dict[str, bytes] | None = None) -> None:
    """A directory laid out like an installed ``lpips`` wheel: package folder + ``*.dist-info`` with a RECORD.
    Its ``__init__`` raises, so any import of lpips (which would need torchvision) fails the test."""
    import base64
    import csv

    pkg = site / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('gq must not import lpips')\n")
    dist = site / "lpips-0.1.4.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lpips\nVersion: 0.1.4\n")
    rows = [["lpips/__init__.py", "", ""]]
    for rel, data in files.items():
        (pkg / rel).write_bytes(data)
        hashed = (record_override or {}).get(rel, data)
        b64 = base64.urlsafe_b64encode(hashlib.sha256(hashed).digest()).rstrip(b"=").decode()
        rows.append([f"lpips/{rel}", f"sha256={b64}", str(len(data))])
    rows.append(["lpips-0.1.4.dist-info/RECORD", "", ""])
    with open(dist / "RECORD", "w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture()
def fake_site(tmp_path, monkeypatch):
    import importlib

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield site
    sys.modules.pop("lpips", None)
    importlib.invalidate_caches()


def test_lpips_heads_come_from_an_installed_lpips_without_importing_it(fake_site, cache):
    data, digest = _small_file(fake_site, "vgg-heads")
    _install_fake_lpips(fake_site, {"weights/v0.1/vgg.pth": data})
    path, record = W.lpips_package_file("weights/v0.1/vgg.pth")
    assert Path(path) == fake_site / "lpips" / "weights" / "v0.1" / "vgg.pth" and record == digest
    # the published digest (not this file's): accepted because the distribution's own RECORD vouches for it
    with pytest.warns(RuntimeWarning, match="RECORD"):
        r = W.resolve("lpips-vgg-heads")
    assert (r.source, r.path, r.verified) == ("lpips-package", path, True)
    # a table entry with this file's digest accepts it outright
    r = W.resolve("h", files={"h": _spec("h", "x.pth", digest, lpips_file="weights/v0.1/vgg.pth")})
    assert r.source == "lpips-package"
    assert "lpips" not in sys.modules


def test_an_installed_lpips_file_that_fails_its_record_is_not_used(fake_site, cache):
    data, _ = _small_file(fake_site, "alex-heads")
    _install_fake_lpips(fake_site, {"weights/v0.1/alex.pth": data},
                        record_override={"weights/v0.1/alex.pth": b"what the wheel shipped"})
    tried: list[str] = []
    assert W.resolve("lpips-alex-heads", _tried=tried) is None  # and the download (closed port) fails too
    assert any("does not match its RECORD" in t for t in tried) and any("download from" in t for t in tried)
    assert "lpips" not in sys.modules


# ---------------------------------------------------------------------------------------------------------- training
def test_training_with_perceptual_loss_and_no_weights_stops_before_building_the_model(cache, tmp_path, monkeypatch):
    import jobs.training.loop as loop

    def no_model(*a, **k):
        raise AssertionError("the model was built before the weights were checked")

    monkeypatch.setattr(loop, "GQModel", no_model)
    out = tmp_path / "run"
    with pytest.raises(W.WeightsUnavailable) as err:
        loop.train(str(TINY), [f"run.out_dir={out}", "loss.perceptual_weight=1.0", "deepspeed.enabled=false",
                               "run.progress=false", "run.tensorboard=false"])
    msg = str(err.value)
    for expected in ("vgg16-397923af.pth", W.FILES["vgg16"].url, "397923af", "lpips-v0.1-vgg.pth",
                     W.FILES["lpips-vgg-heads"].url, W.FILES["lpips-vgg-heads"].sha256,
                     "gq weights fetch lpips-vgg", "loss.perceptual_weight=0", str(cache),
                     "loss.perceptual_weight=1.0"):
        assert expected in msg, expected
    assert not (out / "metrics.jsonl").exists()


def test_training_offline_env_gives_the_same_refusal(cache, tmp_path, monkeypatch):
    from jobs.training.loop import train

    monkeypatch.setenv("GQ_OFFLINE", "1")
    with pytest.raises(W.WeightsUnavailable, match="(?s)download skipped.*loss.perceptual_weight=0"):
        train(str(TINY), [f"run.out_dir={tmp_path / 'run'}", "loss.perceptual_weight=0.5",
                          "deepspeed.enabled=false", "run.progress=false"])


def test_a_negative_perceptual_weight_is_rejected():
    from jobs.training.config import load_config

    with pytest.raises(ValueError, match="perceptual_weight must be >= 0"):
        load_config(str(TINY), ["loss.perceptual_weight=-1"])


# ---------------------------------------------------------------------------------------------------------- eval
def _eval(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = gq_main(["eval", *map(str, argv)])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture()
def two_images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(2):
        (d / f"im{i}.png").write_bytes(rgb_bytes(32, 40, seed=i, fmt="PNG"))
    return d


def test_eval_without_metric_weights_is_an_error_unless_skipped_on_purpose(cache, tiny_model_dir, two_images):
    base = ("--model", tiny_model_dir, "--input", two_images, "--image-size", 32)
    rc, _, err = _eval(*base)
    assert rc == 1
    for expected in ("alexnet-owt-7be5be79.pth", W.FILES["alexnet"].url, "lpips-v0.1-alex.pth",
                     W.FILES["lpips-alex-heads"].sha256, "gq weights fetch lpips-alex", "--no-lpips"):
        assert expected in err, expected
    rc, _, err = _eval(*base, "--no-lpips")
    assert rc == 1 and "pt_inception-2015-12-05-6726825d.pth" in err and "6726825d" in err and "--no-fid" in err
    assert "gq weights fetch fid-inception" in err
    rc, out, err = _eval(*base, "--no-lpips", "--no-fid")
    assert rc == 0 and "LPIPS skipped (--no-lpips)" in err and "rFID skipped (--no-fid)" in err


def _lpips_alex_files(root: Path) -> dict[str, bytes]:
    """Random LPIPS-Alex weights in the published formats, as bytes (backbone, heads)."""
    from gq_model.metrics.lpips_alex import LPIPSAlex

    torch.manual_seed(3)
    sd = LPIPSAlex().state_dict()
    out = {}
    for key, part in (("alexnet", {k[4:]: v for k, v in sd.items() if k.startswith("net.")}),
                      ("lpips-alex-heads", {k: v.abs() for k, v in sd.items() if k.startswith("lin")})):
        buf = io.BytesIO()
        torch.save(part, buf)
        out[key] = buf.getvalue()
    return out


def test_eval_downloads_lpips_weights_into_the_cache_then_runs_offline(server, cache, tiny_model_dir, two_images,
                                                                       monkeypatch):
    root, url, seen = server
    for key, data in _lpips_alex_files(root).items():
        digest = hashlib.sha256(data).hexdigest()
        name = f"{key}-{digest[:8]}.pth"
        (root / name).write_bytes(data)
        monkeypatch.setitem(W.FILES, key, _spec(key, name, digest, prefix=True))
    monkeypatch.setenv("GQ_WEIGHTS_BASE_URL", url)
    base = ("--model", tiny_model_dir, "--input", two_images, "--image-size", 32, "--no-fid")
    rc, out, err = _eval(*base)
    assert rc == 0, err
    assert sorted(seen) == sorted(f"/{W.FILES[k].name}" for k in ("alexnet", "lpips-alex-heads"))
    assert "LPIPS n/a" not in out and "LPIPS" in out
    assert sorted(p.name for p in cache.iterdir()) == sorted(W.FILES[k].name for k in ("alexnet", "lpips-alex-heads"))
    monkeypatch.setenv("GQ_OFFLINE", "1")  # now from the cache, without the network
    rc, out2, err = _eval(*base)
    assert rc == 0, err
    assert len(seen) == 2 and out2.split("|")[1] == out.split("|")[1]


# ---------------------------------------------------------------------------------------------------------- CLI
def _gq(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = gq_main(list(map(str, argv)))
    return rc, out.getvalue(), err.getvalue()


def test_gq_weights_fetch_and_list(server, cache, monkeypatch):
    root, url, seen = server
    for key in ("alexnet", "lpips-alex-heads"):
        data, digest = _small_file(root, key)
        name = f"{key}-{digest[:8]}.pth"
        (root / name).write_bytes(data)
        monkeypatch.setitem(W.FILES, key, _spec(key, name, digest, prefix=True))
    rc, out, err = _gq("weights", "list")
    assert rc == 0 and f"cache: {cache}" in out and out.count("(not cached)") == 5
    rc, out, err = _gq("weights", "fetch", "lpips-alex", "--base-url", url)
    assert rc == 0, err
    assert out.count("download") == 2 and out.count("verified") == 2
    rc, out, err = _gq("weights", "list")
    names = {W.FILES[k].name for k in ("alexnet", "lpips-alex-heads")}
    lines = {ln.split()[0]: ln for ln in out.splitlines()[2:]}
    for n in names:
        assert " yes " in lines[n] and "MB" in lines[n] and str(cache / n) in lines[n]
    assert sum("(not cached)" in ln for ln in lines.values()) == 3
    # a file that rots in the cache is reported as not verified
    (cache / W.FILES["alexnet"].name).write_bytes(b"rot")
    rc, out, err = _gq("weights", "list")
    assert rc == 0 and " NO " in out and "corrupt" in err
    rc, out, err = _gq("weights", "list", "--json")
    import json

    rows = {r["key"]: r for r in json.loads(out)}
    assert rows["alexnet"]["verified"] is False and rows["lpips-alex-heads"]["verified"] is True


def test_gq_weights_fetch_refuses_corrupt_files_and_unknown_names(server, cache, monkeypatch):
    root, url, seen = server
    data, digest = _small_file(root, "fid")
    name = f"fid-{digest[:8]}.pth"
    (root / name).write_bytes(b"not it")
    monkeypatch.setitem(W.FILES, "fid-inception", _spec("fid-inception", name, digest, prefix=True))
    rc, out, err = _gq("weights", "fetch", "fid-inception", "--base-url", url)
    assert rc == 1 and "corrupt download refused" in err and name in err
    assert not (cache / name).exists() and _no_partial_files(cache)
    with pytest.raises(SystemExit):
        _gq("weights", "fetch", "lpips-squeeze")


def test_two_ranks_without_weights_both_stop_with_the_error(cache, tmp_path):
    """torchrun with 2 gloo ranks: local rank 0 tries, every rank raises the same error, nothing hangs."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "jobs.train", str(TINY), f"run.out_dir={tmp_path / 'run'}",
           "loss.perceptual_weight=1.0", "deepspeed.enabled=false", "deepspeed.backend=gloo", "run.progress=false"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert out.count("WeightsUnavailable") >= 2 and "(on another rank)" in out, out[-4000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
