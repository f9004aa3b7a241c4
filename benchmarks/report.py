"""Output shared by the benchmark scripts: a Markdown table on stdout (pasted into docs/benchmarks.md) and the raw
results as JSON (what gpu_checks.sh brings back from a lent GPU)."""
from __future__ import annotations

import json
from typing import Any, Iterable, Sequence


def print_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A Markdown table: ``columns`` as the header, each row's cells already formatted (or str()-able)."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def write_json(path: str | None, results: dict[str, Any]) -> None:
    """Write ``results`` to ``path`` (nothing when no path was given)."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
