"""Issue 19, read path: no single file aborts, blocks or silently loses a unit, and no read leaves its bounds.

Every input here is built by the test: names holding ``[``, a non-UTF-8 name, a symlink loop, a FIFO, tars cut at
every position around their headers, tars with link members and a member named ``..``, Parquet path references
to files outside the dataset and to a local HTTP server whose access log must stay empty, a BMP header declaring
4294967169 columns and an ``.icns`` whose embedded PNG is far larger than its icon size.
"""
from __future__ import annotations

import http.server
import io
import json
import os
import struct
import tarfile
import threading
import time
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gq_pipeline import planning, sources
from gq_pipeline.manifest import OutputStore
from gq_pipeline.planning import plan_units
from gq_pipeline.preprocess import decode_sample, preprocess_uint8
from gq_pipeline.records import ERROR_KINDS, SampleError, make_key
from gq_pipeline.sources import Unit, UnitInfo, UnitReadError, iter_samples
from gq_pipeline.writers import rows_to_table
from tests.helpers import make_wds_tar, rgb_bytes

CFG = {"image_size": 32, "crop": "center", "max_pixels": 100_000_000, "multiple_of": 8}


def read_all(paths, **kw):
    """Every sample of every unit planned from ``paths`` (read like a worker does, no Ray)."""
    plan = plan_units([str(p) for p in paths], **{k: v for k, v in kw.items() if k == "extensions"})
    out = []
    for u in plan.units:
        out += list(iter_samples(u, UnitInfo(), **kw))
    return plan, out


def in_thread(fn, timeout: float = 30.0):
    """``fn()`` in a daemon thread: a read that blocks for ever fails the test instead of hanging the suite."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"blocked for more than {timeout}s"
    if "error" in box:
        raise box["error"]
    return box["value"]


class _Server:
    """A 127.0.0.1 HTTP server that logs every request and answers from ``files`` (``delay`` seconds late)."""

    def __init__(self, files: dict[str, bytes], delay: float = 0.0):
        self.log: list[str] = []
        self.stop = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.log.append(f"GET {self.path}")
                if outer.stop.wait(delay):
                    return
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def bmp_with_width(width: int, height: int = 1) -> bytes:
    """A BMP whose BITMAPINFOHEADER declares ``width`` columns (Pillow's bmp/b/badwidth.bmp has 4294967169)."""
    info = struct.pack("<IIiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    pixels = b"\0" * 64
    return b"BM" + struct.pack("<IHHI", 14 + 40 + len(pixels), 0, 0, 54) + info + pixels


def png_rgba(w: int, h: int) -> bytes:
    raw = (b"\0" + b"\0" * (4 * w)) * h

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def icns_with_png(png: bytes) -> bytes:
    """An .icns holding one 128x128 ``ic07`` icon whose PNG is really ``png``'s size."""
    entry = b"ic07" + struct.pack(">I", 8 + len(png)) + png
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


# ------------------------------------------------------------------------------------------- 2: path references
def _ref_parquet(path, refs):
    col = pa.array([{"bytes": None, "path": r} for r in refs],
                   pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": col}), path)


def test_parquet_path_references_stay_inside_the_dataset(tmp_path):
    good, secret, internal = rgb_bytes(40, 40, seed=1), rgb_bytes(40, 40, seed=2), rgb_bytes(40, 40, seed=3)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "private.png").write_bytes(secret)
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    (data / "imgs" / "a.png").write_bytes(good)
    os.symlink(tmp_path / "secret" / "private.png", data / "imgs" / "link.png")
    server = _Server({"/internal.jpg": internal})
    try:
        refs = ["imgs/a.png", "../secret/private.png", str(tmp_path / "secret" / "private.png"),
                f"file://{tmp_path}/secret/private.png", f"{server.url}/internal.jpg", "imgs/link.png",
                "imgs/../imgs/a.png", str(data / "imgs" / "a.png")]
        _ref_parquet(data / "ref.parquet", refs)
        _, samples = read_all([data / "ref.parquet"])
        assert [s.data for s in samples if s.error is None] == [good, good, good]
        refused = [i for i, s in enumerate(samples) if s.error is not None]
        assert refused == [1, 2, 3, 4, 5]
        assert all(samples[i].error.kind == "refused" and "--allow-external-refs" in samples[i].error.message
                   for i in refused)
        assert server.log == []  # the internal URL was never requested
        # Allowed explicitly: anywhere ("*"), or only under the given prefixes.
        _, anywhere = read_all([data / "ref.parquet"], allow_external_refs=("*",))
        assert [s.data for s in anywhere] == [good, secret, secret, secret, internal, secret, good, good]
        assert server.log == ["GET /internal.jpg"]
        _, some = read_all([data / "ref.parquet"], allow_external_refs=(server.url + "/",))
        assert [s.error.kind if s.error else "ok" for s in some] == ["ok", "refused", "refused", "refused", "ok",
                                                                      "refused", "ok", "ok"]
    finally:
        server.close()


def test_allow_external_refs_flag():
    from jobs.tokenize import _external_refs, build_parser

    base = ["--model", "demo", "--input", "x", "--output", "o"]
    assert _external_refs(build_parser().parse_args(base).allow_external_refs) == ()
    assert _external_refs(build_parser().parse_args(base + ["--allow-external-refs"]).allow_external_refs) == ("*",)
    args = build_parser().parse_args(base + ["--allow-external-refs", "s3://other/", "--extensions", "ico", ".PPM"])
    assert _external_refs(args.allow_external_refs) == ("s3://other/",) and args.extensions == ["ico", ".PPM"]


# ------------------------------------------------------------------------------------------- 6: header values
def test_header_width_beyond_int32_is_that_samples_error_record():
    for max_pixels in (100_000_000, 2**40):  # refused from the header, or (limit raised) decoded and refused later
        row = decode_sample("u", sources.RawSample(0, "k", None, "file:///d/badwidth.bmp",
                                                   data=bmp_with_width(4294967169)), CFG | {"max_pixels": max_pixels})
        assert row["kind"] == "error" and row["width"] == -1
    good = decode_sample("u", sources.RawSample(1, "g", None, "file:///d/g.jpg", data=rgb_bytes(40, 40)), CFG)
    table = rows_to_table([row, good])  # the unit's table builds: one bad header never fails the unit
    assert table.column("kind").to_pylist() == ["error", "ok"]
    assert SampleError("too_large", "x", 4294967169, 7).width == -1


def test_any_value_a_row_cannot_hold_is_that_samples_error():
    bad = sources.RawSample(0, "k", "m\udcff", "file:///d/\udcff.jpg", data=rgb_bytes(40, 40))
    row = decode_sample("u", bad, CFG)
    assert row["kind"] == "error" and row["error"] == "unsupported" and "\\xff" in row["source"]
    rows_to_table([row])


# ------------------------------------------------------------------------------------------- 7: names with [
def test_names_with_glob_characters_are_read_by_name(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    images = {name: rgb_bytes(40, 40, seed=i) for i, name in
              enumerate(["br[1].jpg", "[abc].png", "a.png", "b1.jpg", "star*.jpg", "q?.jpg"])}
    for name, data in images.items():
        (d / name).write_bytes(data)
    plan, samples = read_all([d])
    assert all(s.error is None for s in samples)
    assert {s.source.rsplit("/", 1)[1]: s.data for s in samples} == images
    # A unit holding only such names (it failed on every run): read, not "file disappeared".
    only = list(iter_samples(Unit("files", f"file://{d}", ("[abc].png", "br[1].jpg")), UnitInfo()))
    assert [s.data for s in only] == [images["[abc].png"], images["br[1].jpg"]]


def test_names_with_glob_characters_on_s3(s3, moto_s3):
    fs, bucket = s3, "gq-glob-names"
    fs.mkdir(bucket)
    images = {"br[1].jpg": rgb_bytes(40, 40, seed=1), "[abc].png": rgb_bytes(40, 40, seed=2),
              "a.png": rgb_bytes(40, 40, seed=3)}
    for name, data in images.items():
        fs.pipe(f"{bucket}/g/{name}", data)
    unit = Unit("files", f"s3://{bucket}/g", tuple(sorted(images)))
    samples = list(iter_samples(unit, UnitInfo(), moto_s3))
    assert all(s.error is None for s in samples) and [s.data for s in samples] == [images[n] for n in unit.files]


# ------------------------------------------------------------------------------------------- 8: names, loops
def test_non_utf8_name_and_symlink_loop_are_error_records(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for i in range(3):
        (d / f"ok{i}.jpg").write_bytes(rgb_bytes(40, 40, seed=i))
    with open(os.path.join(os.fsencode(d), b"caf\xe9.jpg"), "wb") as f:  # Latin-1 name: not UTF-8
        f.write(rgb_bytes(40, 40, seed=9))
    os.symlink("loop.jpg", d / "loop.jpg")  # ELOOP
    plan, samples = read_all([d])
    assert plan.listed == 5 and sum(len(u.files) for u in plan.units) == 5
    errors = {s.source.rsplit("/", 1)[1]: s.error for s in samples if s.error is not None}
    assert set(errors) == {"caf\\xe9.jpg", "loop.jpg"}
    assert errors["caf\\xe9.jpg"].kind == "unsupported" and "UTF-8" in errors["caf\\xe9.jpg"].message
    assert errors["loop.jpg"].kind == "read" and "symbolic links" in errors["loop.jpg"].message
    rows = [decode_sample("u", s, CFG) for s in samples]
    assert rows_to_table(rows).num_rows == 5 and [r["kind"] for r in rows].count("ok") == 3
    assert len({r["key"] for r in rows}) == 5
    assert make_key("file:///d/caf\udce9.jpg", "caf\udce9.jpg") != make_key("file:///d/caf\udce8.jpg", "x")


def test_parquet_without_image_column_after_the_first_is_a_record(tmp_path):
    from tests.helpers import make_image_parquet

    (tmp_path / "a.parquet").write_bytes(make_image_parquet(3))
    pq.write_table(pa.table({"caption": ["x", "y"]}), tmp_path / "b.parquet")
    plan, samples = read_all([tmp_path])
    assert len(plan.units) == 2 and len(samples) == 4
    assert [s.error is None for s in samples] == [True, True, True, False]
    assert samples[3].error.kind == "unsupported" and "2 rows not read" in samples[3].error.message


# ------------------------------------------------------------------------------------------- 9: FIFOs, timeouts
def test_fifo_is_skipped_at_listing_and_never_blocks_a_read(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jpg").write_bytes(rgb_bytes(40, 40))
    os.mkfifo(d / "x.jpg")
    os.symlink(d / "missing.jpg", d / "dangling.jpg")
    # A unit naming the FIFO anyway (planned before it was made): an error record, not a reader blocked for ever.
    samples = in_thread(lambda: list(iter_samples(Unit("files", f"file://{d}", ("a.jpg", "x.jpg")), UnitInfo())))
    assert samples[0].error is None and samples[1].error.kind == "unsupported"
    assert in_thread(lambda: plan_units([str(d / "x.jpg")])).units == []
    for inputs in ([f"{d}/*.jpg"], [d]):
        plan = in_thread(lambda: plan_units([str(p) for p in inputs]))
        assert [u.files for u in plan.units] == [("a.jpg",)]
        assert plan.skipped == 2 and any(e.endswith("/x.jpg") for e in plan.skipped_examples)
    assert planning.ignored_counts(plan)["skipped_files"] == 2


def test_a_remote_read_that_never_answers_times_out(monkeypatch):
    server = _Server({"/d/a.jpg": rgb_bytes(40, 40)}, delay=60)
    monkeypatch.setattr(sources, "READ_TIMEOUT_S", 1.0, raising=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(UnitReadError, match="no answer within 1 s"):
            in_thread(lambda: list(iter_samples(Unit("files", f"{server.url}/d", ("a.jpg",)), UnitInfo())))
        assert time.monotonic() - t0 < 20
    finally:
        server.close()


# ------------------------------------------------------------------------------------------- 10: truncated tars
def test_tar_cut_anywhere_records_its_tail():
    samples = [{"__key__": f"{i:03d}", "jpg": rgb_bytes(24, 24, seed=i), "txt": f"caption {i}"} for i in range(4)]
    tar = make_wds_tar(samples)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        members = t.getmembers()
    end = members[-1].offset_data + ((members[-1].size + 511) // 512) * 512  # the end-of-archive marker
    headers = [m.offset for m in members]
    cuts = sorted({c for h in headers for c in (h, h + 1, h + 100, h + 511, h + 512)} |
                  {end, end + 1, end + 511} | {h - 1 for h in headers[1:]})
    for cut in cuts:
        got = list(iter_samples(_tar_unit(tar[:cut]), UnitInfo()))
        ok = [s for s in got if s.error is None]
        assert got and got[-1].member == "__unreadable__" and got[-1].error.kind == "read", cut
        assert len(ok) == len(got) - 1
        for s in ok:  # what is kept is whole: both members of every sample before the cut
            i = int(s.member)
            assert s.data == samples[i]["jpg"] and s.extra["txt"] == samples[i]["txt"], cut
        # every sample is tokenized or inside the tail record, never gone
        assert [int(s.member) for s in ok] == list(range(len(ok)))
    whole = list(iter_samples(_tar_unit(tar), UnitInfo()))
    assert [s.error for s in whole] == [None] * 4
    assert [s.error for s in iter_samples(_tar_unit(tar[:end + 1024]), UnitInfo())] == [None] * 4


_TAR_DIRS: list = []


def _tar_unit(data: bytes) -> Unit:
    import tempfile

    d = tempfile.mkdtemp(prefix="gq-cut-")
    _TAR_DIRS.append(d)
    path = os.path.join(d, "cut.tar")
    with open(path, "wb") as f:
        f.write(data)
    return Unit("tar", f"file://{path}")


# ------------------------------------------------------------------------------------------- 11: decode memory
def test_icns_whose_icon_is_larger_than_declared_is_refused_before_decoding():
    data = icns_with_png(png_rgba(3000, 3000))  # declares 128x128 (16384 px); the PNG inside is 9 Mpx
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (128, 128)
    old = Image.MAX_IMAGE_PIXELS
    with pytest.raises(SampleError) as e:
        preprocess_uint8(data, 32, max_pixels=20_000)
    assert e.value.kind == "too_large"
    assert Image.MAX_IMAGE_PIXELS == old  # PIL's global is restored
    arr, size = preprocess_uint8(icns_with_png(png_rgba(128, 128)), 32, max_pixels=20_000)
    assert size == (128, 128) and arr.shape == (3, 32, 32)


# ------------------------------------------------------------------------------------------- 12: other formats
def test_pillow_formats_left_out_are_counted_and_extensions_add_them(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    im = Image.new("RGB", (40, 40), (10, 200, 30))
    for ext, fmt in (("ico", "ICO"), ("ppm", "PPM"), ("tga", "TGA")):
        im.save(d / f"x.{ext}", fmt)
    (d / "a.jpg").write_bytes(rgb_bytes(40, 40))
    (d / "notes.txt").write_text("not an image")
    plan = plan_units([str(d)])
    counts = planning.ignored_counts(plan)
    assert plan.ignored == 4 and counts["ignored_decodable"] == 3
    assert counts["ignored_decodable_by_extension"] == {"ico": 1, "ppm": 1, "tga": 1}
    assert "--extensions" in planning.ignored_note(plan)
    plan, samples = read_all([d], extensions=["ppm", ".TGA"])
    assert sorted(f for u in plan.units for f in u.files) == ["a.jpg", "x.ppm", "x.tga"]
    assert plan.ignored == 2 and all(decode_sample("u", s, CFG)["kind"] == "ok" for s in samples)
    # tar members of an added extension are the sample's image
    tar = make_wds_tar([{"__key__": "000", "ppm": (d / "x.ppm").read_bytes()}])
    (s,) = list(iter_samples(_tar_unit(tar), UnitInfo(), extensions=["ppm"]))
    assert s.error is None and decode_sample("u", s, CFG)["kind"] == "ok"
    with pytest.raises(ValueError, match="shards"):
        plan_units([str(d)], extensions=["tar"])


# ------------------------------------------------------------------------------------------- 14: output URLs
def test_output_urls_with_dotdot_are_normalised_or_refused(tmp_path):
    store = OutputStore(f"{tmp_path}/new/../out/./tokens/")
    assert store.root == f"{tmp_path}/out/tokens" and store.url == f"file://{tmp_path}/out/tokens"
    store.prepare()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no stray "new" folder
    assert OutputStore("s3://bucket/a/../tokens").root == "bucket/tokens"
    with pytest.raises(ValueError, match="bucket"):
        OutputStore("s3://bucket/../other/tokens")


# ------------------------------------------------------------------------------------------- 16: tar members
def test_tar_links_and_dotdot_members_are_recorded():
    buf = io.BytesIO()
    jpg = rgb_bytes(24, 24)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as t:
        def add(name, data=None, kind=tarfile.REGTYPE, target=""):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            info.size = len(data) if data is not None else 0
            t.addfile(info, io.BytesIO(data) if data is not None else None)

        add("000.jpg", jpg)
        add("000.txt", b"first")
        add("001.jpg", kind=tarfile.SYMTYPE, target="000.jpg")
        add("002.jpg", kind=tarfile.LNKTYPE, target="000.jpg")
        add("..", jpg)
        add("003.jpg", jpg)
        add("004.jpg", jpg)
        add("004.txt", kind=tarfile.SYMTYPE, target="/etc/hostname")
        add("caf\xe9.jpg", jpg)  # written as Latin-1 bytes: not UTF-8
    got = list(iter_samples(_tar_unit(buf.getvalue()), UnitInfo()))
    assert [s.member for s in got] == ["000", "001", "002", "..", "003", "004", "caf\\xe9"]
    assert [s.error.kind if s.error else "ok" for s in got] == ["ok", "unsupported", "unsupported", "unsupported",
                                                                 "ok", "unsupported", "unsupported"]
    assert "link" in got[1].error.message and "link" in got[5].error.message and "'..'" in got[3].error.message
    assert len({s.key for s in got}) == 7
    rows = [decode_sample("u", s, CFG) for s in got]
    assert rows_to_table(rows).column("member").to_pylist()[3] == ".."


# ------------------------------------------------------------------------------------------- end to end
def test_one_run_over_every_bad_file_commits_all_its_units(tmp_path):
    """The job over a folder with each hazard: no unit fails, outputs + error records = inputs."""
    import gq_pipeline
    from tests.helpers import make_tiny_model

    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        (d / f"ok{i}.jpg").write_bytes(rgb_bytes(40, 40, seed=i))
    (d / "br[1].jpg").write_bytes(rgb_bytes(40, 40, seed=7))
    (d / "badwidth.bmp").write_bytes(bmp_with_width(4294967169))
    with open(os.path.join(os.fsencode(d), b"a\xe9.jpg"), "wb") as f:  # first of its unit: in the commit record
        f.write(rgb_bytes(40, 40, seed=9))
    os.symlink("loop.jpg", d / "loop.jpg")
    os.mkfifo(d / "fifo.jpg")
    Image.new("RGB", (40, 40)).save(d / "x.ppm")
    summary = in_thread(lambda: gq_pipeline.tokenize(make_tiny_model(), [str(d)], str(tmp_path / "out"),
                                                      image_size=32, unit_size=4, progress=False), timeout=300)
    assert summary["units_failed"] == []
    assert (summary["inputs"], summary["tokenized"], summary["errors"]) == (7, 4, 3)
    assert summary["errors_by_kind"] == {"too_large": 1, "unsupported": 1, "read": 1}
    assert summary["ignored_decodable"] == 1 and summary["skipped_files"] == 1
    errors = [r for n in os.listdir(tmp_path / "out" / ".gq" / "errors")
              for r in pq.read_table(tmp_path / "out" / ".gq" / "errors" / n).to_pylist()]
    assert sorted(r["source"].rsplit("/", 1)[1] for r in errors) == ["a\\xe9.jpg", "badwidth.bmp", "loop.jpg"]
    json.dumps(summary)
    assert set(summary["errors_by_kind"]) <= set(ERROR_KINDS)
    again = in_thread(lambda: gq_pipeline.tokenize(make_tiny_model(), [str(d)], str(tmp_path / "out"),
                                                    image_size=32, unit_size=4, progress=False), timeout=300)
    assert again["units_committed"] == 0 and again["units_skipped"] == summary["units_committed"] == 2
