"""Storage faults after planning end as one gq line and exit 3, never a traceback, and the next run resumes:
a read-only output, a full disk, an S3 endpoint down from the start, an S3 server stopped mid-run. A complete output
on read-only storage reruns with exit 0 and no write. Malformed ``--storage-options`` and a damaged commit record
are named.

The read-only and disk-full cases need a file system this test can make read-only or full: a tmpfs it mounts (root
with ``mount``), or, for read-only without root, ``chmod a-w`` (root ignores permissions, so that does not work
for root)."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

import gq_pipeline
from gq_pipeline.commitset import TornRecordError, read_records
from jobs.tokenize import main as tokenize_main
from tests.helpers import free_port, make_tiny_model, rgb_bytes

SIZE = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(root, n: int, start: int = 0) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (root / f"{i:03d}.png").write_bytes(rgb_bytes(36 + i % 5, 40, seed=i))
    return str(root)


def _cli(model_dir: str, src: str, out: str, *extra: str) -> list[str]:
    return ["--model", model_dir, "--input", src, "--output", out, "--image-size", str(SIZE), "--unit-size", "2",
            "--batch-size", "4", *extra]


def _run_cli(capsys, args: list[str]) -> tuple[int, str]:
    rc = tokenize_main(args)
    return rc, capsys.readouterr().err


def _subprocess(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "jobs.tokenize", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_line_failure(rc: int, err: str, *needles: str) -> None:
    assert rc == 3, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("gq tokenize: ")]
    assert len(lines) == 1, err[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    assert "rerun" in lines[0], lines[0]


def _exactly_once(out: str, n_inputs: int, fs=None) -> None:
    """outputs + recorded errors = inputs, and no key twice (read with plain pyarrow)."""
    if fs is None:
        shards = sorted(glob.glob(os.path.join(out, "parquet", "*.parquet")))
        keys = pq.read_table(shards, columns=["key"]).column("key").to_pylist() if shards else []
        manifest = json.load(open(os.path.join(out, ".gq", "manifest.json")))
    else:
        shards = sorted(fs.glob(f"{out}/parquet/*.parquet"))
        keys = []
        for p in shards:
            with fs.open(p, "rb") as f:
                keys += pq.read_table(f, columns=["key"]).column("key").to_pylist()
        manifest = json.loads(fs.cat_file(f"{out}/.gq/manifest.json"))
    assert len(keys) == len(set(keys)) == n_inputs, (len(keys), len(set(keys)), n_inputs)
    assert manifest["inputs"] == manifest["tokenized"] + manifest["errors"] == n_inputs


def _snapshot(root: str) -> dict[str, tuple[int, int]]:
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            st = os.lstat(os.path.join(d, n))
            out[os.path.relpath(os.path.join(d, n), root)] = (st.st_mtime_ns, st.st_size)
    return out


# ------------------------------------------------------------------------------------------ file systems we can break

def _can_mount() -> str | None:
    """None if this process can mount a tmpfs, else why not."""
    if os.geteuid() != 0:
        return f"not root (uid {os.geteuid()}): cannot mount a tmpfs"
    if shutil.which("mount") is None:
        return "no mount command"
    return None


class _Tmpfs:
    def __init__(self, path, size: str):
        self.path = str(path)
        os.makedirs(self.path, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", self.path], capture_output=True,
                              text=True)
        if proc.returncode:
            pytest.skip(f"mount -t tmpfs failed here ({proc.stderr.strip()}): no file system to fill or freeze")

    def remount(self, opts: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{opts}", self.path], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", self.path], check=False)


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir


def test_read_only_output_reruns_without_writes_and_fails_in_one_line(tmp_path, model_dir, capsys):
    why = _can_mount()
    if why is not None and os.geteuid() == 0:
        pytest.skip(f"running as root (uid 0), which ignores chmod a-w, and {why}")
    fs = _Tmpfs(tmp_path / "ro", "16m") if why is None else None
    try:
        base = fs.path if fs else str(tmp_path / "ro")
        src = _images(tmp_path / "in", 6)
        out = os.path.join(base, "out")
        rc, err = _run_cli(capsys, _cli(model_dir, src, out, "--quiet"))
        assert rc == 0, err

        def freeze(read_only: bool):
            if fs:
                fs.remount("ro" if read_only else "rw")
            else:
                for d, dirs, files in os.walk(out):
                    for n in [d] + [os.path.join(d, f) for f in files]:
                        os.chmod(n, 0o555 if read_only and os.path.isdir(n) else 0o444 if read_only else 0o755)

        freeze(True)
        before = _snapshot(out)
        rc, err = _run_cli(capsys, _cli(model_dir, src, out))  # complete: nothing to write, so it succeeds
        assert rc == 0, err
        assert "nothing was written" in err
        assert _snapshot(out) == before
        _images(tmp_path / "in", 2, start=6)  # new inputs: there is work, and nowhere to write it
        rc, err = _run_cli(capsys, _cli(model_dir, src, out))
        _one_line_failure(rc, err, "Read-only file system" if fs else "Permission denied")
        rc, err = _run_cli(capsys, _cli(model_dir, src, out, "--format", "both"))
        _one_line_failure(rc, err)
        assert _snapshot(out) == before
        freeze(False)
        rc, err = _run_cli(capsys, _cli(model_dir, src, out, "--format", "both", "--quiet"))
        assert rc == 0, err
        _exactly_once(out, 8)
    finally:
        if fs:
            fs.close()


def test_a_full_disk_stops_in_one_line_and_the_rerun_completes(tmp_path, model_dir, capsys):
    why = _can_mount()
    if why is not None:
        pytest.skip(f"a disk-full test needs a small tmpfs: {why}")
    fs = _Tmpfs(tmp_path / "full", "96k")
    try:
        src = _images(tmp_path / "in", 40)
        out = os.path.join(fs.path, "out")
        rc, err = _run_cli(capsys, _cli(model_dir, src, out, "--max-attempts", "1"))
        _one_line_failure(rc, err, "No space left on device")
        committed = len(glob.glob(os.path.join(out, ".gq", "units", "*.json")))
        assert committed < 20
        fs.remount("size=16m")
        rc, err = _run_cli(capsys, _cli(model_dir, src, out, "--quiet"))
        assert rc == 0, err
        _exactly_once(out, 40)
    finally:
        fs.close()


def test_an_s3_endpoint_down_from_the_start(tmp_path, model_dir, moto_s3, s3, capsys):
    src = _images(tmp_path / "in", 4)
    down = {**moto_s3, "endpoint_url": f"http://127.0.0.1:{free_port()}",
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}  # fail fast, same outcome
    args = _cli(model_dir, src, "s3://gq-down/out")
    rc, err = _run_cli(capsys, args + ["--storage-options", json.dumps(down)])
    _one_line_failure(rc, err, "Could not connect", "Nothing was committed")
    s3.mkdir("gq-down")
    rc, err = _run_cli(capsys, args + ["--storage-options", json.dumps(moto_s3), "--quiet"])
    assert rc == 0, err
    _exactly_once("gq-down/out", 4, fs=s3)


def test_an_s3_server_stopped_mid_run(tmp_path, model_dir):
    """A private moto server (the session's stays up for the other tests), stopped once units are committed; the
    run ends in one line, exit 3; a server back on the same port (moto keeps its state in the process) resumes."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing",
               # botocore's own retries of a refused connection (with backoff) only make the stopped server's
               # run take longer to end; the outcome is the same
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)
    fs.mkdir("gq-midrun")
    src = _images(tmp_path / "in", 60)
    args = _cli(model_dir, src, "s3://gq-midrun/out", "--unit-size", "1", "--image-size", "64", "--max-attempts",
                "1", "--max-failed-units", "0", "--storage-options", json.dumps(options))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.tokenize", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while len(fs.glob("gq-midrun/out/.gq/units/*.json")) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "nothing committed in time"
            time.sleep(0.05)
        server.stop()
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    _one_line_failure(proc.returncode, err, "Committed:")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        rerun = _subprocess(args[:-4] + ["--storage-options", json.dumps(options), "--quiet"])
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        fs.invalidate_cache()
        _exactly_once("gq-midrun/out", 60, fs=fs)
    finally:
        server.stop()


@pytest.mark.parametrize("value,needle", [('"str"', "got str"), ("[1,2]", "got list"), ('{"s3":5}', "protocol 's3'"),
                                          ("str", "not valid JSON"),
                                          ('{"s3": {}, "endpoint_url": "x"}', "mixes per-protocol")])
def test_malformed_storage_options_name_the_option(tmp_path, value, needle, capsys):
    with pytest.raises(SystemExit) as e:
        tokenize_main(["--model", "demo", "--input", str(tmp_path), "--output", "s3://b/o", "--storage-options",
                       value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --storage-options" in err and needle in err, err
    assert "Traceback" not in err
    with pytest.raises(ValueError, match="storage_options"):
        gq_pipeline.tokenize(make_tiny_model(), [str(tmp_path)], "s3://b/o", storage_options=json.loads(value)
                             if value != "str" else "str", progress=False)


def test_a_torn_record_is_named_and_its_unit_redone(tmp_path, model_dir, capsys):
    src = _images(tmp_path / "in", 6)
    out = str(tmp_path / "out")
    rc, err = _run_cli(capsys, _cli(model_dir, src, out, "--quiet"))
    assert rc == 0, err
    victim = sorted(glob.glob(os.path.join(out, ".gq", "units", "*.json")))[1]
    blob = open(victim, "rb").read()
    open(victim, "wb").write(blob[: len(blob) // 2])  # cut short, as a truncated copy leaves it
    os.remove(os.path.join(out, ".gq", "manifest.json"))  # the manifest caches records: without it, units/ is read
    with pytest.raises(TornRecordError, match=os.path.basename(victim)):
        read_records(__import__("fsspec").filesystem("file"), out)
    with pytest.raises(ValueError, match=os.path.basename(victim)):
        gq_pipeline.TokenDataset(out, batch_size=2)
    rc, err = _run_cli(capsys, _cli(model_dir, src, out))
    assert rc == 0, err
    assert f"{victim} is damaged" in err and "Traceback" not in err
    assert json.load(open(victim)) == json.loads(blob)  # redone: the same record, whole again
    _exactly_once(out, 6)
