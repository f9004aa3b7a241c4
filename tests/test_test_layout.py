"""The test tree's own layering: fixtures in ``conftest.py``, shared helpers in helper modules, and nothing else
importing the tests.

A test module that imports ``conftest`` or another ``test_*`` module makes that file a library by accident: its
private names become an API, pytest's module-level state (fixtures, ``pytestmark``) leaks into the importer, and
moving a test breaks unrelated ones. Shared code lives in ``tests/helpers.py``, ``tests/model_helpers.py``,
``tests/kernel_cases.py``, ``tests/oracles.py`` and ``tests/shard_writer.py``. Benchmarks and examples run without
the test tree (``benchmarks/synthetic.py`` carries what the benchmarks need), so they, and the packages, import
nothing from ``tests``.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTSIDE_TESTS = ("benchmarks", "examples", "gq_model", "gq_pipeline", "jobs", "kernels")


def _imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every module a file imports, anywhere in it (function-level imports too);
    ``package`` is the file's own package, against which relative imports resolve. ``from a import b`` yields both
    ``a`` and ``a.b``, since ``b`` may be a module."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}" if base else a.name) for a in node.names]
    return out


def _imports_of(path: Path) -> list[tuple[int, str]]:
    return _imported_modules(path.read_text(encoding="utf-8"), ".".join(path.relative_to(REPO).parent.parts))


def _is_test_module(name: str) -> bool:
    parts = name.split(".")
    if parts[0] == "tests":
        parts = parts[1:]
    return bool(parts) and (parts[0] == "conftest" or parts[0].startswith("test_"))


def _first_per_line(files: list[Path], forbidden) -> list[str]:
    """``file:line: imports name`` for each import statement that names a forbidden module (its first such name)."""
    hits: dict[str, str] = {}
    for f in files:
        for line, name in _imports_of(f):
            if forbidden(name):
                hits.setdefault(f"{f.relative_to(REPO)}:{line}", name)
    return [f"{where}: imports {name}" for where, name in hits.items()]


def test_no_test_module_imports_conftest_or_another_test_module():
    files = sorted((REPO / "tests").glob("*.py"))
    assert any(f.name == "test_kernels_triton.py" for f in files), "the scan must see the test modules"
    bad = _first_per_line(files, _is_test_module)
    assert not bad, "shared code belongs in a helper module, not a test module or conftest:\n" + "\n".join(bad)


def test_benchmarks_examples_and_packages_import_nothing_from_tests():
    files = sorted(p for d in OUTSIDE_TESTS for p in (REPO / d).rglob("*.py"))
    assert any(f.name == "bench_pipeline.py" for f in files), "the scan must see the benchmarks"
    bad = _first_per_line(files, lambda name: name == "tests" or name.startswith("tests."))
    assert not bad, "benchmarks, examples and packages must run without the test tree:\n" + "\n".join(bad)


def test_the_scan_sees_the_imports_it_forbids():
    """The checks above pass on a clean tree; this one shows they would catch each way of writing the import."""
    source = ("import tests.conftest\nfrom tests.test_model import x\nfrom . import test_losses\n"
              "def f():\n    from .conftest import y\nfrom tests import helpers\n")
    found = [(line, name) for line, name in _imported_modules(source, "tests") if _is_test_module(name)]
    assert found == [(1, "tests.conftest"), (2, "tests.test_model"), (2, "tests.test_model.x"),
                     (3, "tests.test_losses"), (5, "tests.conftest"), (5, "tests.conftest.y")], found
    outside = [name for _, name in _imported_modules("from tests.helpers import rgb_bytes\n", "benchmarks")]
    assert "tests.helpers" in outside
