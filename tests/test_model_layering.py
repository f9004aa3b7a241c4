"""The model package is the bottom floor: it imports nothing above it, and its modules import each other one way.

``gq_model`` is imported by the pipeline's workers and by training; if it imported ``jobs`` or ``gq_pipeline`` (the
console command once lived in ``gq_model/cli.py``), every worker would pay for them and the floors would be a circle.
Inside it, loaders return ``(config, state_dict)`` and ``GQModel`` assembles itself, so no loader imports the model
back (the circle ``bundle -> model -> reference_checkpoint -> model`` this replaced).
"""
from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import gq_model

ROOT = Path(gq_model.__file__).parent
SHIM = "gq_model.cli"  # the compatibility alias of jobs.cli; nothing in gq_model imports it
# Imports allowed to point up the graph, each a documented door (name of the enclosing function):
# GQModel's own loading conveniences, and the PEP 562 aliases that keep old names of moved loaders importable.
DOORS = {("gq_model.model", "from_pretrained"), ("gq_model.model", "from_reference_checkpoint"),
         ("gq_model.bundle", "__getattr__"), ("gq_model.reference_checkpoint", "__getattr__"),
         ("gq_model.zero_checkpoint", "__getattr__"), ("gq_model.hub", "__getattr__")}
READERS = ("gq_model.bundle", "gq_model.reference_checkpoint", "gq_model.zero_checkpoint", "gq_model.hub")


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages([str(ROOT)], prefix="gq_model.")]
    assert "gq_model.model" in names and "gq_model.loading" in names, names
    return sorted(n for n in names if n != SHIM)


def _path(name: str) -> Path:
    rel = Path(*name.split(".")[1:])
    return ROOT / (str(rel) + ".py") if (ROOT / (str(rel) + ".py")).is_file() else ROOT / rel / "__init__.py"


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(imported gq_model module, enclosing function or None) for every import statement, at any depth."""
    tree = ast.parse(_path(name).read_text())
    out: list[tuple[str, str | None]] = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Import):
                out.extend((a.name, func) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                out.append((child.module, func))
                out.extend((f"{child.module}.{a.name}", func) for a in child.names)  # from gq_model import hub
            visit(child, inner)

    visit(tree, None)
    return out


def test_gq_model_imports_nothing_from_the_floors_above():
    code = ("import importlib, json, sys\n"
            f"for name in {_modules()!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('jobs', 'gq_pipeline'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    for name in _modules():  # nor names them (an importlib string would hide the edge from the run above)
        text = _path(name).read_text()
        assert not any(mod.split(".")[0] in ("jobs", "gq_pipeline") for mod, _ in _imports(name)), name
        assert "import_module(\"jobs" not in text and "import_module('jobs" not in text, name


def test_no_import_cycle_among_gq_model_modules():
    modules = set(_modules())
    graph = {name: sorted({mod for mod, func in _imports(name)
                           if mod in modules and mod != name and (name, func) not in DOORS}) for name in modules}
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join((stack + [node])[(stack + [node]).index(nxt):]
                                                                      + [nxt])
            if nxt not in state:
                walk(nxt, stack + [node])
        state[node] = 2

    for name in sorted(modules):
        if name not in state:
            walk(name, [])


def test_loaders_never_import_the_model():
    """They return (config, state_dict); :meth:`GQModel.from_parts` (via gq_model.loading) builds the model."""
    for name in READERS:
        names = {mod for mod, func in _imports(name) if (name, func) not in DOORS}
        assert not names & {"gq_model.model", "gq_model.loading", "gq_model.GQModel"}, (name, names)

