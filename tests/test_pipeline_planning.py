"""Planning at 100 M+ scale: ``--input-list`` in every format, brace patterns without a request per URL, listings
that fail loudly, plans persisted under the output, and a real ``gq tokenize --input-list`` run.

Work is measured, never time: requests are counted with s3fs's own botocore event hooks on the moto server, memory
with tracemalloc and pyarrow's allocator.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import io
import json
import os
import sys
import threading
import tracemalloc
import urllib.parse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gq_pipeline.planning import ListingError, plan_units
from gq_pipeline.sources import UnitInfo, UnitReadError, _list_unit_urls, get_fs, iter_samples
from tests.helpers import make_wds_tar, rgb_bytes

SIZE = 32


class Requests(list):
    """(operation, key or listed prefix) of every S3 call."""

    def count(self, op: str | None = None, under: str = "") -> int:
        return sum(1 for o, target in self if (op is None or o == op) and target.startswith(under))


@contextlib.contextmanager
def s3_requests(storage_options):
    """Record the S3 calls that plan_units' own (cached, per-thread) s3fs instance sends, via botocore's hooks."""
    fs, _ = get_fs("s3://any", storage_options)
    calls = Requests()

    def record(model, params, **kwargs):
        query = params.get("query_string") or {}
        target = query.get("prefix") if isinstance(query, dict) and "prefix" in query else params.get("url_path", "")
        calls.append((model.name, str(target).lstrip("/")))

    events = fs.s3.meta.events
    events.register("before-call.s3", record)
    try:
        yield calls
    finally:
        events.unregister("before-call.s3", record)


def _urls(units, storage_options=None):
    """Every URL the plan's list units stand for, read back from the persisted plan as a worker reads it."""
    out = []
    for u in units:
        out.extend(_list_unit_urls(u, storage_options) if u.kind == "list" else [f"<{u.kind}> {u.source}"])
    return out


# ---------------------------------------------------------------------------------------------------- scale


def test_100k_url_list_plans_in_bounded_memory_and_is_planned_once(tmp_path):
    n = 100_000
    (tmp_path / "list.txt").write_text("".join(f"imgs/{i:06d}.jpg\n" for i in range(n)))
    plan_dir = str(tmp_path / "out" / "_plan")
    # Warm-up on a small list: imports and pyarrow's first allocations are not the planner's memory.
    (tmp_path / "small.txt").write_text("a.jpg\n")
    list(plan_units([], 10, input_list=str(tmp_path / "small.txt"), plan_dir=plan_dir).list_units)

    plan = plan_units([], 1000, input_list=str(tmp_path / "list.txt"), plan_dir=plan_dir)
    tracemalloc.start()
    arrow_peak, ids = 0, []
    arrow_base = pa.total_allocated_bytes()
    try:
        for u in plan.list_units:  # a stream: nothing but the ids is kept here
            ids.append(u.unit_id)
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - arrow_base)
        _, py_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ids) == len(set(ids)) == 100 and plan.list_units.rows == n
    # Holding the list would take n resolved URLs as Python strings (~13 MB here); the planner holds a batch of rows
    # and one unit.
    all_urls = n * sys.getsizeof(f"file://{tmp_path}/imgs/000000.jpg")
    assert py_peak < all_urls / 4, (py_peak, all_urls)
    assert arrow_peak < all_urls / 2, (arrow_peak, all_urls)
    assert not plan.list_units.reused

    # A rerun reads the persisted plan instead of the list, with the same unit ids.
    again = plan_units([], 1000, input_list=str(tmp_path / "list.txt"), plan_dir=plan_dir)
    assert [u.unit_id for u in again.list_units] == ids and again.list_units.reused
    # The list grew at its end: it is planned again, and the units of its first rows keep their ids.
    with open(tmp_path / "list.txt", "a") as f:
        f.write("imgs/extra.jpg\n")
    grown = list(plan_units([], 1000, input_list=str(tmp_path / "list.txt"), plan_dir=plan_dir).list_units)
    assert [u.unit_id for u in grown[:100]] == ids and len(grown) == 101 and grown[-1].count == 1


def test_100k_url_list_on_s3_sends_no_request_per_url(moto_s3, s3):
    s3.mkdir("plan-scale")
    n = 100_000
    s3.pipe("plan-scale/lists/all.txt", "".join(f"s3://plan-scale/imgs/{i:06d}.jpg\n" for i in range(n)).encode())
    with s3_requests(moto_s3) as ops:
        plan = plan_units([], 500, moto_s3, input_list="s3://plan-scale/lists/all.txt",
                          plan_dir="s3://plan-scale/out/_plan")
        units = list(plan.list_units)
    assert len(units) == 200 and sum(u.count for u in units) == n
    # HEADs and ranged GETs of the list, PUTs of the plan: a few dozen requests, none about the 100k images.
    assert ops.count(under="plan-scale/imgs") == ops.count(under="imgs") == 0, ops
    assert len(ops) < 60, ops
    with s3_requests(moto_s3) as ops:
        again = list(plan_units([], 500, moto_s3, input_list="s3://plan-scale/lists/all.txt",
                                plan_dir="s3://plan-scale/out/_plan").list_units)
    assert [u.unit_id for u in again] == [u.unit_id for u in units]
    # The list is not read again (its identity is one HEAD); plan.json and one part's units are.
    assert ops.count("GetObject", "lists/") == 0 and ops.count("PutObject") == 0, ops
    assert ops.count("GetObject", "out/_plan/") == 2, ops


# ---------------------------------------------------------------------------------------------------- formats


def _expected(tmp_path):
    return [f"file://{tmp_path}/lists/a.jpg", f"file://{tmp_path}/imgs/b.jpg", "file:///abs/c.jpg",
            "s3://bucket/d e.jpg", "https://example.org/x/e.jpg", f"file://{tmp_path}/lists/noext"]


_ROWS = ["a.jpg", "../imgs/b.jpg", "/abs/c.jpg", "s3://bucket/d e.jpg", "https://example.org/x/e.jpg", "noext"]


@pytest.mark.parametrize("fmt", ["txt", "txt.gz", "csv", "parquet"])
def test_list_formats_resolve_rows_and_cut_units(tmp_path, fmt):
    (tmp_path / "lists").mkdir()
    rows = _ROWS + ["shards/s-000.tar"]
    path = tmp_path / "lists" / f"inputs.{fmt}"
    if fmt.startswith("txt"):
        text = "# a comment\n\n" + "\n".join(f"  {r}  " for r in rows) + "\n"
        path.write_bytes(gzip.compress(text.encode()) if fmt.endswith("gz") else text.encode())
    elif fmt == "csv":
        path.write_text("id,path,caption\n" + "".join(f'{i},{r},"a, quoted\ncaption"\n' for i, r in enumerate(rows)))
    else:
        pq.write_table(pa.table({"id": list(range(len(rows))), "url": rows}), str(path))
    plan = plan_units([], 4, input_list=str(path), plan_dir=str(tmp_path / "out" / "_plan"))
    units = list(plan.list_units)
    assert [u.kind for u in units] == ["list", "tar", "list"]  # a tar row's unit comes when it is read
    assert [u.count for u in units if u.kind == "list"] == [4, 2]
    expected = _expected(tmp_path)
    assert _urls(units) == expected[:4] + [f"<tar> file://{tmp_path}/lists/shards/s-000.tar"] + expected[4:]
    assert plan.list_units.rows == len(rows)


def test_csv_list_column_is_found_or_named(tmp_path):
    (tmp_path / "l.csv").write_text("name,where\nx,a.jpg\n")
    with pytest.raises(ValueError, match="no url/path column"):
        plan_units([], 4, input_list=str(tmp_path / "l.csv"), plan_dir=str(tmp_path / "_plan"))
    plan = plan_units([], 4, input_list=str(tmp_path / "l.csv"), input_list_column="where",
                      plan_dir=str(tmp_path / "_plan"))
    assert _urls(plan.list_units) == [f"file://{tmp_path}/a.jpg"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        plan_units([], 4, input_list=str(tmp_path / "missing.txt"), plan_dir=str(tmp_path / "_plan"))


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_s3_inventory_manifest_is_planned_like_a_listing(moto_s3, s3, fmt):
    bucket = f"inv-{fmt.lower()}"
    s3.mkdir(bucket)
    keys = [("imgs/a b.jpg", "true", "false"), ("imgs/c+d.png", "true", "false"), ("imgs/old.jpg", "false", "false"),
            ("imgs/gone.jpg", "true", "true"), ("imgs/notes.txt", "true", "false"), ("imgs/._a.jpg", "true", "false"),
            ("imgs/sub/", "true", "false"), ("shards/x.tar", "true", "false")]
    schema = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size"
    files = []
    for part, chunk in enumerate([keys[:5], keys[5:]]):
        if fmt == "CSV":  # keys are URL-encoded in CSV inventories
            body = "".join(f'"src","{urllib.parse.quote_plus(k, safe="/")}","v1","{lat}","{dm}","10"\n'
                           for k, lat, dm in chunk)
            data, name = gzip.compress(body.encode()), f"inv/data/part-{part}.csv.gz"
        else:
            buf = io.BytesIO()
            pq.write_table(pa.table({"bucket": ["src"] * len(chunk), "key": [k for k, _, _ in chunk],
                                     "version_id": ["v1"] * len(chunk), "is_latest": [c[1] == "true" for c in chunk],
                                     "is_delete_marker": [c[2] == "true" for c in chunk],
                                     "size": [10] * len(chunk)}), buf)
            data, name = buf.getvalue(), f"inv/data/part-{part}.parquet"
        s3.pipe(f"{bucket}/{name}", data)
        files.append({"key": name, "size": len(data), "MD5checksum": "x"})
    manifest = {"sourceBucket": "src", "destinationBucket": f"arn:aws:s3:::{bucket}", "version": "2016-11-30",
                "fileFormat": fmt, "fileSchema": schema, "files": files}
    if fmt == "Parquet":  # a Parquet schema in the manifest; the files name their own (snake_case) columns
        manifest["fileSchema"] = ("message s3.inventory { required binary bucket (STRING); required binary key "
                                  "(STRING); optional binary version_id (STRING); optional boolean is_latest; "
                                  "optional boolean is_delete_marker; optional int64 size; }")
    s3.pipe(f"{bucket}/inv/manifest.json", json.dumps(manifest).encode())
    plan = plan_units([], 10, moto_s3, input_list=f"s3://{bucket}/inv/manifest.json",
                      plan_dir=f"s3://{bucket}/out/_plan")
    units = list(plan.list_units)
    got = _urls(units, moto_s3)
    # Latest versions only, no delete markers, hidden names and "directories" skipped, a tar as its own unit.
    assert got == ["<tar> s3://src/shards/x.tar", "s3://src/imgs/a b.jpg", "s3://src/imgs/c+d.png"]
    lu = plan.list_units
    assert lu.ignored == 1 and lu.ignored_examples == ["s3://src/imgs/notes.txt"]


# ---------------------------------------------------------------------------------------------------- reading


def test_list_unit_reads_each_row_and_records_missing_files(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(rgb_bytes(40, 40, seed=i))
    (tmp_path / "list.txt").write_text("imgs/0.jpg\nimgs/missing.jpg\nimgs/1.jpg\nimgs/2.jpg\n")
    units = list(plan_units([], 10, input_list=str(tmp_path / "list.txt"),
                            plan_dir=str(tmp_path / "out" / "_plan")).list_units)
    samples = list(iter_samples(units[0], UnitInfo()))
    assert [s.idx for s in samples] == [0, 1, 2, 3] and units[0].expected_inputs == 4
    assert [s.source.rsplit("/", 1)[1] for s in samples] == ["0.jpg", "missing.jpg", "1.jpg", "2.jpg"]
    assert samples[1].error.kind == "read" and "does not exist" in samples[1].error.message
    assert samples[0].data == (tmp_path / "imgs" / "0.jpg").read_bytes()
    assert len({s.key for s in samples}) == 4
    assert samples[0].key.startswith("imgs_0_jpg-")  # readable part: the path relative to the list
    # The same file listed by a folder input has the same identity (the key's hash): one per file, either way.
    folder = plan_units([str(tmp_path / "imgs")], 10)
    folder_keys = {s.key.rsplit("-", 1)[1] for s in iter_samples(folder.units[0], UnitInfo())}
    assert {s.key.rsplit("-", 1)[1] for s in samples if s.error is None} == folder_keys
    # A plan file that no longer holds the planned rows fails the unit (retryable), never reads other files.
    part = units[0].part.removeprefix("file://")
    pq.write_table(pa.table({"url": ["file:///etc/hostname"] * 4}), part)
    with pytest.raises(UnitReadError, match="no longer holds"):
        list(iter_samples(units[0], UnitInfo()))


# ---------------------------------------------------------------------------------------------------- listings


class _Handler(http.server.SimpleHTTPRequestHandler):
    broken = "/data/broken/"

    def do_GET(self):
        if self.path.startswith(self.broken):
            self.send_error(503, "listing unavailable")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture()
def http_tree(tmp_path):
    root = tmp_path / "www"
    for d in ("data/ok/deeper", "data/broken", "data/more"):
        (root / d).mkdir(parents=True)
    for name in ("data/c.jpg", "data/ok/a.jpg", "data/ok/deeper/x.jpg", "data/broken/b.jpg", "data/more/m.jpg"):
        (root / name).write_bytes(rgb_bytes(32, 32))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_failed_listing_of_one_prefix_fails_the_plan_naming_it(http_tree):
    with pytest.raises(ListingError, match="/data/broken/") as e:
        plan_units([f"{http_tree}/data/"], 10)
    assert "503" in str(e.value.__cause__)
    # The other prefixes list fine, breadth-first in parallel, nested ones included.
    plan = plan_units([f"{http_tree}/data/ok/", f"{http_tree}/data/more/"], 10)
    assert sorted(f for u in plan.units for f in u.files) == ["a.jpg", "m.jpg", "x.jpg"]


def test_parallel_walk_of_s3_prefixes_lists_each_prefix_once(moto_s3, s3):
    s3.mkdir("plan-walk")
    for p in range(6):
        for i in range(3):
            s3.pipe(f"plan-walk/root/p{p}/q/{i}.jpg", b"x")
    with s3_requests(moto_s3) as ops:
        plan = plan_units(["s3://plan-walk/root"], 100, moto_s3)
    assert sum(len(u.files) for u in plan.units) == 18 and len(plan.units) == 6
    # One listing per prefix (root, p*, p*/q) plus the isdir check of the root; no request per file.
    assert ops.count("ListObjectsV2") <= 1 + 1 + 6 + 6, ops
    assert ops.count("HeadObject", "root/p") == 0 and ops.count("GetObject") == 0, ops


def test_brace_pattern_costs_one_listing_per_parent_and_names_missing_shards(moto_s3, s3):
    s3.mkdir("plan-brace")
    for i in range(30):
        s3.pipe(f"plan-brace/shards/a/shard-{i:03d}.tar", make_wds_tar([]))
    for i in range(20):
        s3.pipe(f"plan-brace/shards/b/shard-{i:03d}.tar", make_wds_tar([]))
    inputs = ["s3://plan-brace/shards/a/shard-{000..029}.tar", "s3://plan-brace/shards/b/shard-{000..019}.tar"]
    with s3_requests(moto_s3) as ops:
        plan = plan_units(inputs, 10, moto_s3, plan_dir="s3://plan-brace/out/_plan")
    assert [u.kind for u in plan.units] == ["tar"] * 50
    # One listing per parent prefix, no request per shard (the rest is the plan store's lookups and writes).
    assert ops.count("ListObjectsV2", "shards/") == 2 and ops.count(under="shards/") == 2, ops
    assert len(ops) <= 2 + 4 * len(inputs), ops
    # Persisted: the rerun lists nothing.
    with s3_requests(moto_s3) as ops:
        again = plan_units(inputs, 10, moto_s3, plan_dir="s3://plan-brace/out/_plan")
    assert [u.unit_id for u in again.units] == [u.unit_id for u in plan.units] and again.reused == inputs
    assert ops.count("ListObjectsV2") == 0 and ops.count(under="shards/") == 0, ops
    # --relist lists again.
    with s3_requests(moto_s3) as ops:
        plan_units(inputs, 10, moto_s3, plan_dir="s3://plan-brace/out/_plan", relist=True)
    assert ops.count("ListObjectsV2", "shards/") == 2, ops
    # A shard the pattern names but the bucket lacks is an error at plan time, named, from the same one listing.
    with s3_requests(moto_s3) as ops, pytest.raises(FileNotFoundError, match="1 of the 31 .*shard-030.tar"):
        plan_units(["s3://plan-brace/shards/a/shard-{000..030}.tar"], 10, moto_s3)
    assert ops.count(under="shards/") == 1, ops


def test_brace_pattern_over_directories_walks_them(tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "i.jpg").write_bytes(b"x")
    plan = plan_units([f"{tmp_path}/{{x,y}}"], 10, plan_dir=str(tmp_path / "_plan"))
    assert sorted(u.source.rsplit("/", 1)[1] for u in plan.units) == ["x", "y"]
    assert not (tmp_path / "_plan").exists()  # folders are listed on every run: never persisted


# ---------------------------------------------------------------------------------------------------- end to end


def test_tokenize_input_list_end_to_end(ray_cluster, tiny_model_dir, tmp_path):
    from jobs.cli import main

    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(5):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(rgb_bytes(36 + i, 40, seed=i))
        rows.append(f"imgs/{i}.jpg")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rows += ["imgs/broken.jpg", "imgs/missing.jpg", str(tmp_path / "shard.tar")]
    (tmp_path / "shard.tar").write_bytes(make_wds_tar([{"__key__": "s0", "jpg": rgb_bytes(40, 40, seed=9)}]))
    (tmp_path / "list.txt").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "tokens")
    summary = str(tmp_path / "summary.json")
    args = ["tokenize", "--model", tiny_model_dir, "--input-list", str(tmp_path / "list.txt"), "--output", out,
            "--image-size", str(SIZE), "--batch-size", "4", "--unit-size", "3", "--quiet", "--summary-json", summary]
    assert main(["tokenize", "--model", tiny_model_dir, "--output", out]) == 1  # neither --input nor --input-list
    assert not os.path.exists(out)
    assert main(args) == 0
    s = json.load(open(summary))
    assert (s["inputs"], s["tokenized"], s["errors"]) == (8, 6, 2)
    assert s["errors_by_kind"] == {"decode": 1, "read": 1}
    tokens = pq.read_table(os.path.join(out, "parquet")).to_pylist()
    errors = pq.read_table(os.path.join(out, ".gq", "errors")).to_pylist()
    sources = sorted(r["source"] for r in tokens + errors)
    listed = sorted(f"file://{tmp_path}/{r}" for r in rows[:7]) + [f"file://{tmp_path}/shard.tar"]
    assert sources == sorted(listed)  # every listed input exactly once: tokens + errors = inputs
    assert len({r["key"] for r in tokens + errors}) == 8
    manifest = json.load(open(os.path.join(out, ".gq", "manifest.json")))
    assert sorted(u["kind"] for u in manifest["units"]) == ["list", "list", "list", "tar"]
    assert os.path.isfile(os.path.join(out, ".gq", "plan", "lists", os.listdir(os.path.join(out, ".gq", "plan", "lists"))[0],
                                       "plan.json"))
    # A rerun reads the persisted plan and skips every committed unit.
    assert main(args) == 0
    s2 = json.load(open(summary))
    assert s2["units_skipped"] == 4 and s2["units_committed"] == 0 and s2["inputs"] == 8
