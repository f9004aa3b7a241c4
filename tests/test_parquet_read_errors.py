"""A damaged Parquet file and a store that fails mid-read are told apart by type (gq_pipeline.storage_errors), not
by message text: the first becomes an error record (the same on every run), the second a retried unit."""
from __future__ import annotations

import http.server
import io
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gq_pipeline.planning import plan_units
from gq_pipeline.sources import UnitInfo, UnitReadError, iter_samples
from tests.helpers import rgb_bytes


def _image_parquet(rows: int, pad: int = 0, group: int = 2) -> bytes:
    images = [rgb_bytes(16, 16, seed=i) for i in range(rows)]
    table = pa.table({"image": images, "blob": [np.random.default_rng(i).bytes(pad) for i in range(rows)]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=group, compression="snappy")
    return buf.getvalue()


def _unit(url: str):
    units = plan_units([url]).units
    assert len(units) == 1 and units[0].kind == "parquet"
    return units[0]


def test_damaged_data_pages_are_an_error_record_after_the_rows_before(tmp_path):
    data = _image_parquet(192, group=64)  # row groups of the reader's batch size (64)
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    rg = meta.row_group(2).column(0)  # damage the third row group's image column: rows 0-127 are fine
    start = rg.data_page_offset
    broken = data[:start] + b"\xff" * 64 + data[start + 64:]  # its first page header and data
    assert len(broken) == len(data)
    path = tmp_path / "damaged.parquet"
    path.write_bytes(broken)
    samples = list(iter_samples(_unit(str(path)), UnitInfo()))
    good = [s for s in samples if s.error is None]
    bad = [s for s in samples if s.error is not None]
    assert len(good) == 128 and all(s.data for s in good)
    assert len(bad) == 1 and bad[0].error.kind == "read" and "corrupt after 128 rows" in str(bad[0].error)


def test_not_parquet_at_all_is_one_error_record(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_bytes(b"this is not a parquet file" * 10)
    (s,) = list(iter_samples(_unit(str(path)), UnitInfo()))
    assert s.error.kind == "read" and "not a readable Parquet file" in str(s.error)


class _FailsAfterFooter(http.server.BaseHTTPRequestHandler):
    """Serves one file with ranges; once the footer has been read, every further GET answers 503."""

    data = b""
    gets = 0
    allowed = 10 ** 9  # GETs answered before the 503s start

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self):
        cls = type(self)
        cls.gets += 1
        if cls.gets > cls.allowed:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = 0, len(self.data) - 1
        rng = self.headers.get("Range")
        if rng:
            a, b = rng.split("=", 1)[1].split("-")
            start, end = int(a or 0), min(int(b) if b else len(self.data) - 1, len(self.data) - 1)
        body = self.data[start:end + 1]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(self.data)}")
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def failing_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailsAfterFooter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_store_failing_mid_read_is_a_retried_unit_not_a_record(failing_server):
    # 12 MB: more than fsspec's HTTP block, so the footer and the data pages are separate range requests
    _FailsAfterFooter.data = _image_parquet(8, pad=1_500_000)
    _FailsAfterFooter.gets, _FailsAfterFooter.allowed = 0, 10 ** 9
    url = f"{failing_server}/big.parquet"
    unit = _unit(url)  # planning reads happily
    _FailsAfterFooter.gets, _FailsAfterFooter.allowed = 0, 1  # then the footer read is the last one answered
    with pytest.raises(UnitReadError, match="StorageReadError|503|Service Unavailable"):
        list(iter_samples(unit, UnitInfo()))
    assert _FailsAfterFooter.gets >= 2
