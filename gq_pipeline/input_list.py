"""``--input-list``: read a list of input URLs as a stream of batches, in bounded memory, whatever its format.

A list names inputs one row each, so planning 100 M images costs one sequential read of the list instead of a LIST
and a HEAD per image. Formats (told apart by the name; compressed text by its extension, e.g. ``.gz``):

* ``*.txt`` (or any other name): one URL or path per line; blank lines and lines starting with ``#`` are skipped;
* ``*.csv`` / ``*.tsv``: a header row and a ``url`` (or ``path``, ``uri``, ``file``) column, or the one named by
  ``column``;
* ``*.parquet``: a string column found the same way;
* ``manifest.json`` of an S3 Inventory: its CSV(.gz) or Parquet data files in ``files``, each row a bucket and a
  (URL-encoded, in CSV) key. An inventory is a listing of a bucket, so it is treated like one: image files become
  rows, tars and Parquet files units of their own, hidden names are skipped and other files are counted as ignored;
  rows that are not the latest version, or that are delete markers, are skipped.

Rows of a plain list are all inputs, whatever their extension (content-addressed stores have none): a row naming a
``.tar``/``.tgz`` or ``.parquet`` becomes a unit of that kind, every other row is read as an image file.

Where a row points (:func:`resolve`): a row with a scheme (``s3://``, ``gs://``, ``http(s)://``, ``file://``, any
fsspec protocol, on any bucket or host) is used as it is, with the run's ``storage_options`` for that protocol. A
row without one is a path resolved like a link in a web page: relative to the list's own directory, or, starting
with ``/``, to the root of the list's store (the local root, the list's bucket, the list's host).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterator

from gq_pipeline.records import PARQUET_EXTENSIONS, TAR_EXTENSIONS

__all__ = ["InputList", "open_input_list", "resolve", "row_kind", "BATCH_ROWS"]

BATCH_ROWS = 4096  # rows per batch read from a list: what the planner holds at once, besides one unit
_COLUMN_NAMES = ("url", "path", "uri", "file", "filename", "key")
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")
# A field separator no path contains: txt lists are parsed as one-column CSV without quoting.
_NO_DELIMITER = "\x1f"


_TAR_SUFFIXES = tuple("." + e for e in TAR_EXTENSIONS)
_PARQUET_SUFFIXES = tuple("." + e for e in PARQUET_EXTENSIONS)


def row_kind(url: str) -> str:
    """``tar``, ``parquet`` or ``image`` for a URL by its extension (a plain list's rows are images otherwise)."""
    low = url[-8:].lower()
    if low.endswith(_TAR_SUFFIXES):
        return "tar"
    if low.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    return "image"


def _split_url(url: str) -> tuple[str, str]:
    """(``scheme://authority`` or ``""`` for a local path, path)."""
    if "://" not in url:
        return "", url
    scheme, rest = url.split("://", 1)
    if scheme in ("file", "local"):
        return "file://", "/" + rest.lstrip("/")
    authority, _, path = rest.partition("/")
    return f"{scheme}://{authority}", "/" + path


def resolve(list_url: str, row: str) -> str:
    """The URL a list row names (module docstring): schemes as they are, paths against the list's directory.

    Local results are ``file://`` URLs, the form folder planning gives files, so a file gets the same sample key
    whether it came from a folder or from a list."""
    if "://" in row:
        if row.startswith("file://") or row.startswith("local://"):
            base, path = _split_url(row)
            return "file://" + posixpath.normpath(path)
        return row
    base, list_path = _split_url(list_url)
    if row.startswith("/"):
        path = posixpath.normpath(row)
    else:
        path = posixpath.normpath(posixpath.join(posixpath.dirname(list_path), row))
    if path.startswith("//"):  # normpath keeps a leading "//"
        path = "/" + path.lstrip("/")
    if not base or base == "file://":
        return "file://" + path
    return base + path


@dataclass
class InputList:
    """An opened input list: where it is, what identifies its content, and its rows as a stream of batches."""

    url: str  # canonical URL of the list (or of the inventory's manifest.json)
    format: str  # txt, csv, parquet, s3-inventory
    identity: dict[str, Any]  # what changes when the content changes (ETag, mtime + size, or a content hash)
    column: str | None = None
    storage_options: dict | None = field(default=None, repr=False)
    _inventory: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def is_listing(self) -> bool:
        """True for an S3 Inventory: a bucket listing, whose non-image files are ignored as a folder's are."""
        return self.format == "s3-inventory"

    def batches(self) -> Iterator[list[str]]:
        """Resolved URLs, in list order, at most :data:`BATCH_ROWS` at a time."""
        if self.format == "s3-inventory":
            yield from self._inventory_batches()
            return
        base, list_path = _split_url(self.url)
        here = (base or "file://") + posixpath.dirname(list_path).rstrip("/") + "/"
        url = self.url
        for raw in _column_batches(self.url, self.format, self.column, self.storage_options):
            # Plain relative names ("imgs/a.jpg") need no normalizing: a concatenation, not resolve(), per row.
            yield [r if ("://" in r and not r.startswith(("file:", "local:")))
                   else here + r if (r[0] != "/" and "://" not in r and "." != r[0] and "/." not in r
                                     and "//" not in r)
                   else resolve(url, r) for r in raw]

    def _inventory_batches(self) -> Iterator[list[str]]:
        inv = self._inventory
        fmt = str(inv.get("fileFormat", "CSV")).lower()
        schema = [c.strip() for c in str(inv.get("fileSchema", "")).split(",") if c.strip()]
        dest = str(inv.get("destinationBucket", ""))
        dest_bucket = dest.split(":::", 1)[1] if ":::" in dest else dest.replace("s3://", "").strip("/")
        if fmt not in ("csv", "parquet"):
            raise ValueError(f"{self.url}: S3 Inventory format {inv.get('fileFormat')!r} is not supported (CSV or "
                             f"Parquet; for ORC, export the keys to a Parquet or text list)")
        lower = [_norm(c) for c in schema]
        for need in ("bucket", "key") if fmt == "csv" else ():  # Parquet files name their own columns
            if need not in lower:
                raise ValueError(f"{self.url}: the inventory's fileSchema {schema} has no {need!r} field")
        for entry in inv.get("files", []):
            data_url = f"s3://{dest_bucket}/{entry['key']}"
            for table in _inventory_tables(data_url, fmt, schema, self.storage_options):
                cols = {_norm(n): table.column(n).to_pylist() for n in table.column_names}
                latest = cols.get("islatest")
                marker = cols.get("isdeletemarker")
                out = []
                for i, (bucket, key) in enumerate(zip(cols["bucket"], cols["key"])):
                    if latest is not None and str(latest[i]).lower() == "false":
                        continue
                    if marker is not None and str(marker[i]).lower() == "true":
                        continue
                    if key is None or bucket is None:
                        continue
                    if fmt == "csv":  # CSV inventories URL-encode keys
                        key = urllib.parse.unquote_plus(key)
                    out.append(f"s3://{bucket}/{key}")
                yield out


def _norm(column: str) -> str:
    """Inventory field names: ``IsLatest`` in a CSV manifest's fileSchema, ``is_latest`` in Parquet files."""
    return column.strip().lower().replace("_", "")


def _content_hash(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _identity(fs, path: str) -> dict[str, Any]:
    """Cheap facts that change when the file's content does (one HEAD/stat); a content hash where there are none."""
    info = fs.info(path)
    ident = {k: info[k] for k in ("ETag", "etag", "md5Hash", "generation", "VersionId", "mtime", "LastModified",
                                  "updated") if info.get(k) is not None}
    if not ident:
        ident["sha256"] = _content_hash(fs, path)
    ident["size"] = info.get("size")
    return {k: (v if isinstance(v, (int, float, str)) or v is None else str(v)) for k, v in ident.items()}


def open_input_list(url: str, storage_options: dict | None = None, column: str | None = None) -> InputList:
    """Open ``url`` as an input list (see the module docstring); refuses a missing list or a missing column."""
    from gq_pipeline.sources import get_fs, to_url

    fs, path = get_fs(url, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"--input-list {url}: no such file")
    canonical = to_url(fs, path)
    name = posixpath.basename(path).lower()
    stem = name
    for ext in _COMPRESSED:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    if name == "manifest.json":
        blob = fs.cat_file(path)
        try:
            inv = json.loads(blob)
        except ValueError as e:
            raise ValueError(f"--input-list {url}: not valid JSON ({e})") from None
        if not isinstance(inv, dict) or "files" not in inv or "fileSchema" not in inv:
            raise ValueError(f"--input-list {url}: a manifest.json must be an S3 Inventory manifest (with "
                             f"'files' and 'fileSchema')")
        return InputList(canonical, "s3-inventory", {"sha256": hashlib.sha256(blob).hexdigest()},
                         storage_options=storage_options, _inventory=inv)
    fmt = "parquet" if stem.endswith(".parquet") else "csv" if stem.endswith((".csv", ".tsv")) else "txt"
    lst = InputList(canonical, fmt, _identity(fs, path), column=column, storage_options=storage_options)
    if fmt != "txt":
        lst.column = _find_column(fs, path, fmt, stem, column, url)
    elif column:
        raise ValueError(f"--input-list-column {column!r}: a text list has no columns (one URL per line)")
    return lst


def _find_column(fs, path: str, fmt: str, stem: str, requested: str | None, url: str) -> str:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            names = list(pq.read_schema(f).names)
    else:
        import csv
        import io

        with fs.open(path, "rb", compression="infer") as f:
            first = io.TextIOWrapper(f, encoding="utf-8", newline="").readline()
        names = next(csv.reader([first], delimiter="\t" if stem.endswith(".tsv") else ","), [])
    if requested:
        if requested not in names:
            raise ValueError(f"--input-list {url}: no column {requested!r} (columns: {names})")
        return requested
    for want in _COLUMN_NAMES:
        for n in names:
            if n.strip().lower() == want:
                return n
    raise ValueError(f"--input-list {url}: no url/path column (columns: {names}); pass --input-list-column")


def _column_batches(url: str, fmt: str, column: str | None, storage_options: dict | None) -> Iterator[list[str]]:
    """The raw (unresolved) rows of a txt/CSV/Parquet list, stripped, blank ones dropped, in batches."""
    import pyarrow.compute as pc

    from gq_pipeline.sources import get_fs

    fs, path = get_fs(url, storage_options)
    for arr in _arrow_batches(fs, path, fmt, column):
        arr = pc.utf8_trim_whitespace(arr.cast("string"))
        keep = pc.and_(pc.is_valid(arr), pc.greater(pc.utf8_length(arr), 0))
        if fmt == "txt":
            keep = pc.and_(keep, pc.invert(pc.starts_with(arr, "#")))
        rows = arr.filter(pc.fill_null(keep, False)).to_pylist()
        if rows:
            yield rows


def _arrow_batches(fs, path: str, fmt: str, column: str | None):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=[column]):
                yield batch.column(0)
        return
    block = 1 << 19  # ~ BATCH_ROWS rows of 128 bytes
    tsv = posixpath.basename(path).lower().split(".gz")[0].endswith(".tsv")
    if fmt == "txt":
        read = pcsv.ReadOptions(block_size=block, column_names=["url"])
        parse = pcsv.ParseOptions(delimiter=_NO_DELIMITER, quote_char=False, escape_char=False)
        conv = pcsv.ConvertOptions(column_types={"url": "string"}, strings_can_be_null=False)
    else:
        read = pcsv.ReadOptions(block_size=block)
        parse = pcsv.ParseOptions(delimiter="\t" if tsv else ",", newlines_in_values=True)
        conv = pcsv.ConvertOptions(include_columns=[column], column_types={column: "string"})
    with fs.open(path, "rb", compression="infer") as f:
        reader = pcsv.open_csv(f, read_options=read, parse_options=parse, convert_options=conv)
        for batch in reader:
            col = batch.column(0)
            for start in range(0, len(col), BATCH_ROWS):
                yield col.slice(start, BATCH_ROWS)


def _inventory_tables(data_url: str, fmt: str, schema: list[str], storage_options: dict | None):
    """One inventory data file as Arrow tables of bounded size (CSV files have no header: the manifest's
    ``fileSchema`` names the columns)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from gq_pipeline.sources import get_fs

    fs, path = get_fs(data_url, storage_options)
    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = {_norm(n): n for n in pf.schema_arrow.names}
            cols = [names[c] for c in ("bucket", "key", "islatest", "isdeletemarker") if c in names]
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
                yield batch
        return
    read = pcsv.ReadOptions(block_size=1 << 20, column_names=schema)
    conv = pcsv.ConvertOptions(column_types={c: "string" for c in schema}, include_columns=[
        c for c in schema if _norm(c) in ("bucket", "key", "islatest", "isdeletemarker")])
    with fs.open(path, "rb", compression="infer") as f:
        for batch in pcsv.open_csv(f, read_options=read, convert_options=conv):
            yield batch
