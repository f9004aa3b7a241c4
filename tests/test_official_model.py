"""The official model by name: ``official:sd3unet_gq_0.25`` and ``hf://owner/repo/file.ckpt`` (gq_model/hub.py).

A local server on 127.0.0.1 plays the Hugging Face Hub (``HF_ENDPOINT`` points at it) the way huggingface_hub 2.4
talks to it: ``HEAD /{repo}/resolve/{revision}/{file}`` answers an LFS file with a 302 to a second server on another
port (the CDN) carrying ``X-Repo-Commit``, ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``; the client then GETs
the CDN URL. Missing files answer 404 with ``X-Error-Code: EntryNotFound``. No test reaches the internet.
"""
from __future__ import annotations

import hashlib
import http.server
import threading

import pytest
import torch

from gq_model import GQModel
from gq_model.hub import HubFile, infer_preset, parse_hub_spec
from gq_model.loading import load_model
from tests.helpers import make_tiny_attn_model
from tests.model_helpers import SMALL_REFERENCE_YAML, WritesMarker, same_tokens, write_lightning_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """The Hub's resolve endpoint and an LFS CDN, each a ThreadingHTTPServer on 127.0.0.1."""

    def __init__(self):
        self.files: dict[tuple[str, str], bytes] = {}  # (repo_id, path) -> content
        self.cdn_override: dict[str, bytes] = {}  # sha256 -> bytes actually served (to corrupt a download)
        self.requests: list[tuple[str, str]] = []
        hub, cdn = self, None

        class Resolve(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, body: bool):
                hub.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "RepoNotFound")
                repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                if not any(r == repo for r, _ in hub.files):
                    return self._error(401, "RepoNotFound")
                if revision not in ("main", COMMIT):
                    return self._error(404, "RevisionNotFound")
                data = hub.files.get((repo, name))
                if data is None:
                    return self._error(404, "EntryNotFound")
                sha = hashlib.sha256(data).hexdigest()
                self.send_response(302)
                self.send_header("Location", f"{cdn.url}/lfs/{sha}")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha1(b"pointer " + sha.encode()).hexdigest() + '"')
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _error(self, status: int, code: str):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self):
                self._answer(False)

            def do_GET(self):
                self._answer(True)

        class Cdn(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self, body: bool):
                hub.requests.append((self.command, "cdn:" + self.path))
                sha = self.path.rsplit("/", 1)[-1]
                data = hub.cdn_override.get(sha) or next(
                    (d for d in hub.files.values() if hashlib.sha256(d).hexdigest() == sha), None)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):
                self._serve(False)

            def do_GET(self):
                self._serve(True)

        self.servers = []
        for handler in (Resolve, Cdn):
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.url = f"http://127.0.0.1:{server.server_port}"
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers.append(server)
        self.hub_server, cdn = self.servers
        self.url = self.hub_server.url

    def downloads(self) -> int:
        return sum(1 for m, p in self.requests if m == "GET" and p.startswith("cdn:"))

    def close(self):
        for s in self.servers:
            s.shutdown()
            s.server_close()


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """The fake Hub, with the Hub cache and gq's cache in tmp_path and offline mode off."""
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("GQ_CACHE", str(tmp_path / "gq_cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    yield server
    server.close()


@pytest.fixture()
def small(tmp_path):
    """A small model in the reference's Lightning layout (tests/model_helpers.py writes it), and its YAML."""
    yaml_path = tmp_path / "small_gq.yaml"
    yaml_path.write_text(SMALL_REFERENCE_YAML)
    source = make_tiny_attn_model(seed=11, codebook_size=1024, group=8)
    write_lightning_checkpoint(source, tmp_path / "small.ckpt")
    return source, (tmp_path / "small.ckpt").read_bytes(), str(yaml_path)


def test_spec_parsing_and_preset_inference():
    assert parse_hub_spec("official:sd3unet_gq_0.25") == HubFile("xutongda/GQModel", "sd3unet_gq_0.25.ckpt")
    assert parse_hub_spec("hf://xutongda/GQModel/sd3unet_gq_0.25.ckpt") == \
        HubFile("xutongda/GQModel", "sd3unet_gq_0.25.ckpt")
    assert parse_hub_spec("hf://o/r@v2/sub/dir/m.ckpt") == HubFile("o/r", "sub/dir/m.ckpt", "v2")
    assert HubFile("o/r", "a/m.ckpt").url("http://h") == "http://h/o/r/resolve/main/a/m.ckpt"
    for bad in ("hf://only-owner/file.ckpt", "hf://o/r/../x.ckpt", "hf://o/@v/x.ckpt"):
        with pytest.raises(ValueError):
            parse_hub_spec(bad)
    with pytest.raises(ValueError, match="official:sd3unet_gq_0.25"):
        parse_hub_spec("official:no_such_model")
    assert infer_preset("sd3unet_gq_0.25.ckpt") == "sd3unet_gq_0.25"
    assert infer_preset("dir/bsqvit_gq_1.00.ckpt") == "bsqvit_gq_1.00"
    assert infer_preset("my_finetune.ckpt") is None


def test_hf_checkpoint_downloads_once_verifies_and_caches_a_bundle(hub, small, tmp_path, monkeypatch):
    source, data, yaml_path = small
    hub.files[("test-org/tiny-gq", "ckpts/small_gq.ckpt")] = data
    spec = "hf://test-org/tiny-gq/ckpts/small_gq.ckpt"
    # the file name names no preset: the error says so and how to give one
    with pytest.raises(ValueError, match="cannot be inferred.*--preset / --config"):
        load_model(spec)
    model = load_model(spec, config=yaml_path)
    assert same_tokens(model, source) and hub.downloads() == 1
    sha = hashlib.sha256(data).hexdigest()
    blobs = list((tmp_path / "hf_cache").rglob(f"blobs/{sha}"))
    assert len(blobs) == 1  # huggingface_hub's own cache layout, keyed by the LFS sha256
    bundles = list((tmp_path / "gq_cache" / "bundles").iterdir())
    assert len(bundles) == 1 and bundles[0].name.startswith(sha) and (bundles[0] / "config.json").is_file()
    # the second load asks the Hub (HEAD) but downloads nothing, and reads the cached bundle
    again = GQModel.from_pretrained(spec, config=yaml_path)
    assert hub.downloads() == 1 and same_tokens(again, source)
    # a damaged cache entry is never used: rebuilt from the (verified) checkpoint, still without a download
    weights = bundles[0] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    assert same_tokens(load_model(spec, config=yaml_path), source) and hub.downloads() == 1
    assert same_tokens(GQModel.from_pretrained(bundles[0]), source)  # the rebuilt entry is whole again
    # every CLI resolves specs through the same function: gq eval's loader, the pipeline's loader
    from gq_pipeline.job import load_model as pipeline_load_model
    from jobs.eval import _load_model

    assert same_tokens(_load_model({"model": spec, "reference_config": yaml_path, "preset": None}), source)
    assert same_tokens(pipeline_load_model(spec, config=yaml_path), source)
    from jobs.cli import main as gq_main

    assert gq_main(["convert", spec, str(tmp_path / "converted"), "--config", yaml_path]) == 0
    assert same_tokens(GQModel.from_pretrained(tmp_path / "converted"), source)
    # offline, with the Hub gone: served from the cache
    hub.close()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert same_tokens(load_model(spec, config=yaml_path), source)


def test_preset_inferred_from_the_file_name_can_be_overridden(hub, small):
    source, data, yaml_path = small
    hub.files[("test-org/tiny-gq", "sd3unet_gq_0.25.ckpt")] = data  # named like the preset, but a small model
    spec = "hf://test-org/tiny-gq/sd3unet_gq_0.25.ckpt"
    with pytest.raises(ValueError, match="another architecture"):
        load_model(spec)  # the inferred sd3unet_gq_0.25 preset does not fit these weights
    assert same_tokens(load_model(spec, config=yaml_path), source)


def test_official_alias_full_size_model(hub, tmp_path):
    """``official:sd3unet_gq_0.25`` -> xutongda/GQModel/sd3unet_gq_0.25.ckpt, architecture from the file name."""
    from gq_model.config import GQConfig
    from gq_model.reference_config import preset_config

    torch.manual_seed(0)
    source = GQModel(GQConfig.from_reference(preset_config("sd3unet_gq_0.25"))).eval()
    write_lightning_checkpoint(source, tmp_path / "sd3unet_gq_0.25.ckpt")
    hub.files[("xutongda/GQModel", "sd3unet_gq_0.25.ckpt")] = (tmp_path / "sd3unet_gq_0.25.ckpt").read_bytes()
    model = GQModel.from_pretrained("official:sd3unet_gq_0.25")
    assert model.fingerprint == "effbb50723ff7d93"
    assert same_tokens(model, source, size=64)
    via_url = load_model("hf://xutongda/GQModel/sd3unet_gq_0.25.ckpt")  # the same file: cached, not downloaded again
    assert hub.downloads() == 1 and same_tokens(via_url, source, size=64)


def test_offline_with_nothing_cached_names_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("GQ_CACHE", str(tmp_path / "gq_cache"))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = "https://huggingface.co/xutongda/GQModel/resolve/main/sd3unet_gq_0.25.ckpt"
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set") as e:
        load_model("official:sd3unet_gq_0.25")
    assert url in str(e.value)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        GQModel.from_pretrained("hf://xutongda/GQModel/sd3unet_gq_0.25.ckpt")


def test_unreachable_hub_with_nothing_cached_names_the_url(tmp_path, monkeypatch):
    from tests.helpers import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match="could not be reached") as e:
        load_model("official:sd3unet_gq_0.25")
    assert f"{endpoint}/xutongda/GQModel/resolve/main/sd3unet_gq_0.25.ckpt" in str(e.value)


def test_corrupt_download_is_refused_and_not_kept(hub, small, tmp_path):
    source, data, yaml_path = small
    hub.files[("test-org/tiny-gq", "small.ckpt")] = data
    sha = hashlib.sha256(data).hexdigest()
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0xFF  # same size: huggingface_hub's own size check passes
    hub.cdn_override[sha] = bytes(corrupt)
    spec = "hf://test-org/tiny-gq/small.ckpt"
    with pytest.raises(ValueError, match="does not match the Hub's checksum.*removed from the cache"):
        load_model(spec, config=yaml_path)
    assert not list((tmp_path / "hf_cache").rglob(f"blobs/{sha}"))
    assert not (tmp_path / "gq_cache" / "bundles").exists()
    del hub.cdn_override[sha]  # the CDN heals: the next load downloads again and succeeds
    assert same_tokens(load_model(spec, config=yaml_path), source) and hub.downloads() == 2


def test_missing_file_and_repository(hub, small):
    _, data, yaml_path = small
    hub.files[("test-org/tiny-gq", "small.ckpt")] = data
    with pytest.raises(FileNotFoundError, match="has no file 'other.ckpt'"):
        load_model("hf://test-org/tiny-gq/other.ckpt", config=yaml_path)
    with pytest.raises(FileNotFoundError, match="no repository"):
        load_model("hf://nobody/nothing/small.ckpt", config=yaml_path)


def test_hub_checkpoint_is_always_weights_only(hub, small, tmp_path):
    source, _, yaml_path = small
    marker = tmp_path / "PWNED"
    state = {k: v.clone() for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "callbacks": WritesMarker(marker)}, tmp_path / "evil.ckpt")
    hub.files[("test-org/tiny-gq", "evil.ckpt")] = (tmp_path / "evil.ckpt").read_bytes()
    with pytest.raises(ValueError, match="weights_only"):
        load_model("hf://test-org/tiny-gq/evil.ckpt", config=yaml_path)
    with pytest.raises(ValueError, match="always read weights_only"):
        load_model("hf://test-org/tiny-gq/evil.ckpt", config=yaml_path, trust_checkpoint=True)
    assert not marker.exists()
