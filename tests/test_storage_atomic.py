"""One home for atomic writes and for "is this the local disk" (gq_model.storage), and what it promises."""
from __future__ import annotations

import ast
import glob
import os

import fsspec
import pytest

from gq_model.storage import is_local_fs, is_local_protocol, is_local_url, put_atomic, write_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    write_atomic(path, b"old")
    write_atomic(str(path), b"new contents")
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["record.json"]


def test_write_atomic_takes_a_writer_function(tmp_path):
    path = tmp_path / "state.bin"
    write_atomic(path, lambda f: (f.write(b"part 1, "), f.write(b"part 2")))
    assert path.read_bytes() == b"part 1, part 2"


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "latest"
    write_atomic(path, b"step_00000010")

    def broken(f):
        f.write(b"step_000")  # half a tag, then the writer dies (a full disk, a pickling error)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, broken)
    assert path.read_bytes() == b"step_00000010"
    assert os.listdir(tmp_path) == ["latest"]


def test_write_atomic_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch):
    """The rename must not reach the disk before the data does, or a crash leaves a zero-length file under the
    final name: the file's fsync comes before os.replace, the folder's after it."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    write_atomic(tmp_path / "x", b"data")
    assert calls[:2] == ["fsync", "replace"] and calls[2:] in (["fsync"], [])  # folder fsync where supported


def test_put_atomic_local_and_memory(tmp_path):
    local = fsspec.filesystem("file")
    put_atomic(local, str(tmp_path / "a.json"), b"{}")
    assert (tmp_path / "a.json").read_bytes() == b"{}"
    put_atomic(local, f"file://{tmp_path}/b.json", b"[]")
    assert (tmp_path / "b.json").read_bytes() == b"[]"
    mem = fsspec.filesystem("memory")
    put_atomic(mem, "/atomic/c.json", b"1")
    assert mem.cat_file("/atomic/c.json") == b"1"


def test_is_local():
    assert is_local_fs(fsspec.filesystem("file")) and not is_local_fs(fsspec.filesystem("memory"))
    assert is_local_protocol(("file", "local")) and is_local_protocol("file") and not is_local_protocol("s3")
    assert is_local_url("/a/b") and is_local_url("rel/path") and is_local_url("file:///a")
    assert not is_local_url("s3://b/k") and not is_local_url("https://h/x")


# Files that may rename on their own: each moves a file it streamed or staged, not bytes it holds (a staged
# shard's publish, a verified download, a cache fill, a bundle folder), and says so where it does it.
_RENAMES_ALLOWED = {"gq_model/storage.py", "gq_pipeline/commit.py", "gq_pipeline/sink.py", "gq_pipeline/shards.py",
                    "gq_model/weights.py", "gq_model/hub.py", "gq_pipeline/plan_store.py"}


def test_atomic_writes_have_one_home():
    """No other module writes a temporary and renames it: they call write_atomic / put_atomic."""
    offenders = []
    for path in sorted(glob.glob(os.path.join(ROOT, "gq_model", "**", "*.py"), recursive=True)
                       + glob.glob(os.path.join(ROOT, "gq_pipeline", "*.py"))
                       + glob.glob(os.path.join(ROOT, "jobs", "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, ROOT)
        if rel in _RENAMES_ALLOWED:
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("replace", "rename", "mv") and isinstance(node.func.value, ast.Name) and \
                    node.func.value.id in ("os", "fs"):
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []
