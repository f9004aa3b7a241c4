"""The embedded Ray that gq starts by itself listens on 127.0.0.1 only, even without
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER in the environment and with ``ray`` imported first (a fresh process)."""
import os
import subprocess
import sys

SCRIPT = """
import ray
from gq_pipeline.ray_init import init_ray
assert init_ray(num_cpus=1, object_store_memory=80 * 1024 * 1024)
node = ray.nodes()[0]
print(ray.get_runtime_context().gcs_address, node["NodeManagerAddress"])
print(ray.get(ray.remote(lambda: 41 + 1).remote()))
ray.shutdown()
"""


def test_local_ray_binds_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    gcs, node, answer = p.stdout.split()[-3:]
    assert gcs.startswith("127.0.0.1:") and node == "127.0.0.1" and answer == "42", p.stdout


def test_a_stale_ray_current_cluster_file_is_never_joined():
    """``ray.init()`` without an address joins whatever ``ray_current_cluster`` names (the last ``ray start``
    on the machine): a dead one made gq hang, a live one ran the job on someone else's cluster. gq starts its own
    local instance unless RAY_ADDRESS or --ray-address names a cluster."""
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="gqr", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:9\n")  # nothing listens there
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = tmp
        p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        gcs, node, answer = p.stdout.split()[-3:]
        assert gcs != "127.0.0.1:9" and answer == "42"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
