"""One writer per output: the conditional-write primitives (local disk, S3 on moto, GCS on fake-gcs-server), the
``.gq/lease.json`` lease (create once, expiry, force, release only if ours, heartbeat, lost detection), real processes
racing for it, commit records created once, and two ``gq tokenize`` runs on one output (local and S3)."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pyarrow.parquet as pq
import pytest

from gq_model.storage import (conditional_support, create_exclusive, delete_if_match, read_versioned,
                              replace_if_match)
from gq_pipeline.commit import create_record
from gq_pipeline.lease import LEASE_NAME, LeaseHeldError, LeaseLostError, OutputLease, read_lease
from gq_pipeline.manifest import OutputStore
from tests.helpers import rgb_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32


@pytest.fixture(params=["local", "s3", "gcs"])
def where(request, tmp_path):
    """(fsspec filesystem, a fresh root path on it, storage options) for each store the lease supports."""
    if request.param == "local":
        import fsspec

        yield fsspec.filesystem("file"), str(tmp_path / "out"), None
    elif request.param == "s3":
        s3 = request.getfixturevalue("s3")
        bucket = f"gq-lease-{uuid.uuid4().hex[:8]}"
        s3.mkdir(bucket)
        yield s3, f"{bucket}/out", request.getfixturevalue("moto_s3")
    else:
        gcs = request.getfixturevalue("gcs")
        bucket = f"gq-lease-{uuid.uuid4().hex[:8]}"
        gcs.mkdir(bucket)
        yield gcs, f"{bucket}/out", request.getfixturevalue("fake_gcs")


def _kind(fs) -> str:
    p = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return {"file": "local", "s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(p, p)


# ------------------------------------------------------------------------------------------------- the primitives


def test_create_exclusive_creates_once_and_never_overwrites(where):
    fs, root, _ = where
    path = f"{root}/obj.json"
    assert conditional_support(fs) == "atomic"
    assert create_exclusive(fs, path, b"first") is True
    assert create_exclusive(fs, path, b"second") is False
    data, version = read_versioned(fs, path)
    assert data == b"first" and version
    assert read_versioned(fs, f"{root}/missing") is None
    if _kind(fs) == "local":
        assert not glob.glob(os.path.join(root, "*.tmp-*"))  # the hard-link temporary is gone


def test_replace_and_delete_only_at_the_version_read(where):
    fs, root, _ = where
    path = f"{root}/obj.json"
    create_exclusive(fs, path, b"v1")
    _, v1 = read_versioned(fs, path)
    v2 = replace_if_match(fs, path, b"v2", v1)
    assert v2 and v2 != v1 and read_versioned(fs, path) == (b"v2", v2)
    assert replace_if_match(fs, path, b"stale writer", v1) is None  # v1 is gone: the swap is refused
    assert read_versioned(fs, path)[0] == b"v2"
    assert replace_if_match(fs, f"{root}/missing", b"x", v1) is None
    if _kind(fs) != "gcs":  # fake-gcs-server ignores preconditions on DELETE (GCS itself honours them)
        assert delete_if_match(fs, path, v1) is False and read_versioned(fs, path)[0] == b"v2"
    assert delete_if_match(fs, path, v2) is True
    assert read_versioned(fs, path) is None
    assert delete_if_match(fs, path, v2) is False


# ------------------------------------------------------------------------------------------------------- the lease


def test_a_second_lease_is_refused_naming_the_owner_and_expiry(where):
    fs, root, _ = where
    with OutputLease(fs, root, ttl_s=60) as a:
        doc = read_lease(fs, root)
        assert doc["owner"]["run_id"] == a.run_id and doc["owner"]["pid"] == os.getpid()
        assert {"created", "heartbeat", "expires", "ttl_s"} <= set(doc)
        b = OutputLease(fs, root, ttl_s=60)
        with pytest.raises(LeaseHeldError) as e:
            b.acquire()
        msg = str(e.value)
        assert a.run_id in msg and doc["owner"]["host"] in msg and doc["expires"] in msg and "--force-lease" in msg
        assert e.value.lease["owner"]["run_id"] == a.run_id
        assert not b.held and a.held
    assert read_lease(fs, root) is None  # released: gone
    with OutputLease(fs, root, ttl_s=60):  # and free for the next run
        pass


def test_an_expired_lease_is_taken_over_and_its_old_owner_notices(where):
    fs, root, _ = where
    a = OutputLease(fs, root, ttl_s=1.0, heartbeat_s=1000).acquire()  # never renews: behaves like a stalled owner
    time.sleep(1.3)
    logs = []
    b = OutputLease(fs, root, ttl_s=60, log=logs.append).acquire()
    assert b.taken_from["owner"]["run_id"] == a.run_id and "expired" in logs[0]
    assert b.temp_grace_s > 0  # the old owner may be alive: its fresh temporaries are left alone
    assert read_lease(fs, root)["taken_from"]["owner"]["run_id"] == a.run_id
    assert a.renew() is False and a.lost
    with pytest.raises(LeaseLostError, match="lost the output's lease"):
        a.check()
    assert a.release() is False  # not ours any more: left alone
    assert read_lease(fs, root)["owner"]["run_id"] == b.run_id
    assert b.release() is True and read_lease(fs, root) is None


def test_force_takes_a_live_lease_and_the_heartbeat_detects_the_loss(where):
    fs, root, _ = where
    a = OutputLease(fs, root, ttl_s=60, heartbeat_s=0.2).acquire()
    b = OutputLease(fs, root, ttl_s=60, force=True).acquire()
    assert b.taken_from["owner"]["run_id"] == a.run_id
    deadline = time.monotonic() + 10
    while not a.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.lost and not a.held
    assert a.release() is False and read_lease(fs, root)["owner"]["run_id"] == b.run_id
    b.release()


def test_the_heartbeat_keeps_a_short_lease_alive(where):
    fs, root, _ = where
    with OutputLease(fs, root, ttl_s=1.5, heartbeat_s=0.2) as a:
        first = read_lease(fs, root)
        time.sleep(2.5)  # longer than the TTL: only renewals keep it valid
        now = read_lease(fs, root)
        assert now["owner"]["run_id"] == a.run_id and now["expires"] > first["expires"]
        assert now["created"] == first["created"]
        with pytest.raises(LeaseHeldError):
            OutputLease(fs, root, ttl_s=60).acquire()
        assert not a.lost


def test_an_unreadable_lease_is_refused_until_forced(where):
    fs, root, _ = where
    create_exclusive(fs, f"{root}/{LEASE_NAME}", b"{not json")
    with pytest.raises(LeaseHeldError, match="not a valid lease.*--force-lease"):
        OutputLease(fs, root).acquire()
    with OutputLease(fs, root, force=True) as lease:
        assert read_lease(fs, root)["owner"]["run_id"] == lease.run_id


# ----------------------------------------------------------------------------------------- real processes racing

_RACER = textwrap.dedent("""
    import json, sys, time
    from gq_model.storage import url_to_fs
    from gq_pipeline.lease import LeaseHeldError, OutputLease
    url, options, start = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
    fs, root = url_to_fs(url, options)
    while time.time() < start:
        pass
    try:
        lease = OutputLease(fs, root, ttl_s=60).acquire()
    except LeaseHeldError:
        print("refused", flush=True)
        sys.exit(0)
    print("won " + lease.run_id, flush=True)
    sys.stdin.read()  # hold the lease until the test closes our stdin
    lease.release()
""")


def _racers(url: str, options, n: int) -> list[subprocess.Popen]:
    env = dict(os.environ, PYTHONPATH=REPO)
    start = time.time() + 6.0  # every process is imported and spinning by then (2 slow cores)
    return [subprocess.Popen([sys.executable, "-c", _RACER, url, json.dumps(options), str(start)], cwd=REPO,
                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(n)]


@pytest.mark.parametrize("store", ["local", "s3"])
def test_processes_racing_for_one_lease_exactly_one_wins(store, tmp_path, request):
    if store == "local":
        url, options = str(tmp_path / "out"), None
    else:
        s3, options = request.getfixturevalue("s3"), request.getfixturevalue("moto_s3")
        bucket = f"gq-race-{uuid.uuid4().hex[:8]}"
        s3.mkdir(bucket)
        url = f"s3://{bucket}/out"
    procs = _racers(url, options, 4)
    try:
        outs = [p.stdout.readline().strip() for p in procs]  # the winner holds the lease until every line is in
    finally:
        for p in procs:
            p.stdin.close()
    for p in procs:
        p.wait(timeout=120)
        err = p.stderr.read()
        p.stdout.close()
        p.stderr.close()
        assert p.returncode == 0, err[-2000:]
    assert sorted(o.split()[0] for o in outs if o) == ["refused", "refused", "refused", "won"], outs


def test_the_lease_of_a_dead_process_on_this_machine_is_taken_at_once(tmp_path):
    url = str(tmp_path / "out")
    (p,) = _racers(url, None, 1)
    line = p.stdout.readline().split()
    assert line[0] == "won"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    for f in (p.stdin, p.stdout, p.stderr):
        f.close()
    import fsspec

    fs = fsspec.filesystem("file")
    assert read_lease(fs, url)["owner"]["run_id"] == line[1]  # the crash left it behind, far from expiry
    logs = []
    with OutputLease(fs, url, log=logs.append) as lease:
        assert lease.taken_from["owner"]["run_id"] == line[1] and "process is gone" in logs[0]
        assert lease.temp_grace_s == 0  # nobody else can be writing: every temporary may go


# -------------------------------------------------------------------------------------------------- commit records


def _record(uid: str, formats=("parquet",), latents=False, inputs=3) -> dict:
    return {"unit_id": uid, "inputs": inputs, "tokenized": inputs, "errors": 0, "formats": sorted(formats),
            "latents": latents, "shards": []}


def test_commit_records_are_created_once(where):
    fs, root, options = where
    url = root if _kind(fs) == "local" else f"{'s3' if _kind(fs) == 's3' else 'gs'}://{root}"
    store = OutputStore(url, options)
    store.prepare()
    assert create_record(store, _record("u1")) is True
    assert create_record(store, _record("u1")) is False  # the same record again: another attempt, not counted twice
    assert create_record(store, _record("u1", inputs=99)) is False  # a different writer's record: the first one stays
    assert store.read_record("u1")["inputs"] == 3
    assert create_record(store, _record("u1", formats=("parquet", "webdataset"))) is True  # a rerun adding a format
    assert store.read_record("u1")["formats"] == ["parquet", "webdataset"]
    assert create_record(store, _record("u1")) is False  # fewer formats never replace more
    assert create_record(store, _record("u1", formats=("parquet", "webdataset"), latents=True)) is True
    assert store.read_record("u2") is None


def test_prepare_removes_temporaries_but_spares_fresh_ones_of_a_possibly_live_owner(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.prepare()
    old = tmp_path / "out" / ".gq" / "units" / "a.json.tmp-1-aa"
    fresh = tmp_path / "out" / "parquet" / "b.parquet.tmp-2-bb"
    old.write_bytes(b"x")
    fresh.parent.mkdir(exist_ok=True)  # parquet/ appears with the first shard
    fresh.write_bytes(b"y")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    contender = tmp_path / "out" / ".gq" / "lease.json.tmp-3-cc"  # another run trying to take the lease right now
    contender.write_bytes(b"z")
    store.prepare(temp_stale_s=900)
    assert not old.exists() and fresh.exists()
    store.prepare()  # the lease holder with no live predecessor removes them all
    assert not fresh.exists() and contender.exists()


# ------------------------------------------------------------------------------------------- two gq tokenize runs


def _images(folder, start: int, stop: int) -> None:
    os.makedirs(folder, exist_ok=True)
    for i in range(start, stop):
        with open(os.path.join(folder, f"img_{i:03d}.jpg"), "wb") as f:
            f.write(rgb_bytes(36 + i % 5, 40, seed=i))


def _tokenize_argv(model_dir, folder, out, options) -> list[str]:
    argv = ["tokenize", "--model", model_dir, "--input", folder, "--output", out, "--image-size", str(SIZE),
            "--unit-size", "3", "--batch-size", "4", "--quiet"]
    return argv + (["--storage-options", json.dumps(options)] if options else [])


@pytest.mark.parametrize("store", ["local", "s3"])
def test_two_tokenize_runs_on_one_output_one_refuses_and_every_input_is_there_once(
        store, ray_cluster, tiny_model_dir, tmp_path, request, capsys):
    from gq_model.cli import main

    folder = str(tmp_path / "in")
    _images(folder, 0, 24)
    if store == "local":
        import fsspec

        fs, options, out = fsspec.filesystem("file"), None, str(tmp_path / "out")
        root = out
    else:
        fs, options = request.getfixturevalue("s3"), request.getfixturevalue("moto_s3")
        bucket = f"gq-two-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        root, out = f"{bucket}/out", f"s3://{bucket}/out"
    # Run A in its own process; run B starts while A holds the lease.
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    a = subprocess.Popen([sys.executable, "-m", "jobs.tokenize", *_tokenize_argv(tiny_model_dir, folder, out,
                                                                               options)[1:]],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while read_lease(fs, root) is None:
            assert a.poll() is None, a.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "run A never took the lease"
            time.sleep(0.05)
        owner = read_lease(fs, root)["owner"]
        assert owner["pid"] == a.pid
        capsys.readouterr()
        assert main(_tokenize_argv(tiny_model_dir, folder, out, options)) == 1  # B refuses, clearly
        err = capsys.readouterr().err
        assert owner["run_id"] in err and str(a.pid) in err and "--force-lease" in err and "until" in err
        a_out, a_err = a.communicate(timeout=300)
        assert a.returncode == 0, a_err[-3000:]
    finally:
        if a.poll() is None:
            a.kill()
            a.communicate()
    assert json.loads(a_out)["inputs"] == 24
    assert read_lease(fs, root) is None  # A released it

    # The folder grows (the case that duplicated samples before) and B runs again: it adds only the new images.
    _images(folder, 24, 30)
    summary = str(tmp_path / "b.json")
    assert main(_tokenize_argv(tiny_model_dir, folder, out, options) + ["--summary-json", summary]) == 0
    s = json.load(open(summary))
    assert s["this_run"]["inputs"] == 6 and s["inputs"] == 30
    # A no-op rerun of the complete output still works and leaves no lease behind.
    assert main(_tokenize_argv(tiny_model_dir, folder, out, options) + ["--summary-json", summary]) == 0
    assert json.load(open(summary))["this_run"]["inputs"] == 0
    assert read_lease(fs, root) is None

    files = [f for f in fs.find(root) if "/parquet/" in f and f.endswith(".parquet")]
    sources = [src for f in files for src in pq.read_table(f, filesystem=fs, columns=["source"])
               .column("source").to_pylist()]
    names = sorted(os.path.basename(s) for s in sources)
    assert names == sorted(f"img_{i:03d}.jpg" for i in range(30))  # every input exactly once
    manifest = json.loads(fs.cat_file(f"{root}/.gq/manifest.json"))
    assert manifest["inputs"] == manifest["tokenized"] == 30
    assert sum(u["inputs"] for u in manifest["units"]) == 30


def test_a_run_whose_lease_is_forced_away_stops_and_writes_no_manifest(ray_cluster, tiny_model_dir, tmp_path,
                                                                       monkeypatch):
    """The holder notices the take-over (at a renewal, at the latest the one just before the manifest) and stops
    without writing the manifest; the run that forced the lease then owns the output, and a rerun has every input
    exactly once. (The thief's lease temporary also survives the holder's clean-up of temporaries.)"""
    import threading

    import fsspec

    import gq_pipeline
    import gq_pipeline.lease

    monkeypatch.setattr(gq_pipeline.lease, "DEFAULT_TTL_S", 2.0)
    folder, out = str(tmp_path / "in"), str(tmp_path / "out")
    _images(folder, 0, 24)
    fs = fsspec.filesystem("file")
    taken = {}

    def force_when_leased():
        deadline = time.monotonic() + 120
        while read_lease(fs, out) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        taken["lease"] = OutputLease(fs, out, ttl_s=60, force=True).acquire()

    thief = threading.Thread(target=force_when_leased)
    thief.start()
    try:
        with pytest.raises(LeaseLostError, match="lost the output's lease"):
            gq_pipeline.tokenize(tiny_model_dir, [folder], out, image_size=SIZE, unit_size=3, batch_size=4,
                                 progress=False)
    finally:
        thief.join()
    assert not os.path.exists(os.path.join(out, "manifest.json"))  # the loser never writes the holder's manifest
    assert read_lease(fs, out)["owner"]["run_id"] == taken["lease"].run_id  # and leaves the holder's lease alone
    taken["lease"].release()
    s = gq_pipeline.tokenize(tiny_model_dir, [folder], out, image_size=SIZE, unit_size=3, batch_size=4,
                             progress=False)
    assert s["inputs"] == 24 and s["units_skipped"] + s["units_committed"] == 8
    keys = pq.read_table(sorted(glob.glob(os.path.join(out, "parquet", "*.parquet"))), columns=["key"])
    assert len(keys) == len(set(keys.column("key").to_pylist())) == 24


def test_gq_gc_refuses_while_a_run_holds_the_lease(tmp_path):
    import fsspec

    from gq_pipeline.gc_cli import LeaseHeldError as GcLeaseHeld
    from gq_pipeline.gc_cli import collect_garbage

    out = str(tmp_path / "out")
    OutputStore(out).prepare()
    fs = fsspec.filesystem("file")
    with OutputLease(fs, out, ttl_s=60) as lease:
        with pytest.raises(GcLeaseHeld, match=lease.run_id):
            collect_garbage(out, dry_run=True)
    assert collect_garbage(out, dry_run=True).removed == []  # released: gc runs
