"""Benchmark (not a test): members/s of the shard tar writer (``gq_pipeline.writers._TarBuilder``) against Python's
``tarfile`` writing the same members with the same deterministic headers.

    .venv/bin/python benchmarks/bench_tar_writer.py                 # 20 000 members of 2 KB (a 256² image's tokens)
    .venv/bin/python benchmarks/bench_tar_writer.py --members 50000 --json out.json

Why it exists: a unit's tar has two members per image (``.tokens.npy`` and ``.json``), so the writer's cost per
member is paid twice per image on the node that commits the unit. Both archives read back to the same members and
bytes (checked here before timing; the headers differ only in the device fields of regular files, which tarfile
leaves empty); the ratio is measured in one run, on one machine.
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.report import print_table, write_json  # noqa: E402
from gq_pipeline.writers import _TarBuilder  # noqa: E402


def with_tarfile(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = \
                len(data), 0, 0o644, 0, 0, "", ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def with_builder(members: list[tuple[str, bytes]]) -> bytes:
    tar = _TarBuilder()
    for name, data in members:
        tar.add(name, data)
    return tar.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=2_176, help="bytes per member (default: 1024 uint16 tokens + header)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    payload = os.urandom(args.size)
    members = [(f"shard-00000/img_{i:07d}.tokens.npy", payload) for i in range(args.members)]
    if _read_back(with_tarfile(members[:50])) != _read_back(with_builder(members[:50])):
        raise SystemExit("the two writers disagree: the benchmark would compare different archives")
    rows = []
    for name, fn in (("tarfile", with_tarfile), ("_TarBuilder", with_builder)):
        best = min(_time(fn, members) for _ in range(args.repeats))
        rows.append({"writer": name, "members_per_s": round(args.members / best),
                     "us_per_member": round(best / args.members * 1e6, 2)})
    ratio = rows[0]["us_per_member"] / rows[1]["us_per_member"]
    base = rows[0]["us_per_member"]
    print_table(["writer", "members/s", "µs per member", "vs tarfile"],
                [[r["writer"], r["members_per_s"], r["us_per_member"], f"{base / r['us_per_member']:.1f}x"]
                 for r in rows])
    rows[1]["speedup"] = round(ratio, 1)
    if args.json:
        write_json(args.json, {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                               "python": sys.version.split()[0], "date": datetime.date.today().isoformat(),
                               "members": args.members, "rows": rows})
    return 0


def _read_back(data: bytes) -> list[tuple[str, int, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, m.mode, tar.extractfile(m).read()) for m in tar]


def _time(fn, members) -> float:
    t0 = time.perf_counter()
    fn(members)
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
