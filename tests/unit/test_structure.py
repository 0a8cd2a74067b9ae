"""The package's shape: no import circle between modules (lazy imports inside functions count), packages
import only the layers below them (ARCHITECTURE.md), and every module imports in a fresh interpreter in
any order."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# Bottom to top: a package may import its own layer's utilities and anything in a lower layer, never higher.
LAYERS = [
    {"version", "errors", "fsutil", "netutil", "hub", "quiet", "plugins"},
    {"config", "metrics"},
    {"data"},
    {"kernels"},
    {"models"},
    {"rundir"},
    {"infer"},
    {"training"},
    {"eval", "exports", "rlaif"},
    {"serve"},
    {"perf"},
    {"api"},
    {"ui"},
    {"cli", "demo", "__init__", "__main__"},
]


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted((SRC / "ayar").rglob("*.py")):
        parts = f.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The ayar modules `name` imports anywhere in its file (a `from pkg import mod` names the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ayar")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ayar"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_cycles():
    g = graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The walk above sees lazy imports: a function-level import back up is a cycle."""
    pkg = tmp_path / "ayar"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from ayar.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from ayar import a\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    with pytest.raises(AssertionError, match="ayar.a -> ayar.b -> ayar.a"):
        test_no_import_cycles()


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_packages_import_only_downward():
    upward = [f"{m} -> {n}" for m, targets in graph().items() for n in targets if layer(n) > layer(m)]
    assert not upward, "imports that go up a layer:\n" + "\n".join(sorted(upward))


def test_every_package_has_a_layer():
    tops = {m.split(".")[1] if "." in m else "__init__" for m in modules()}
    assert tops <= set().union(*LAYERS), f"add these to LAYERS (and ARCHITECTURE.md): {tops - set().union(*LAYERS)}"


@pytest.mark.parametrize("seed", [1, 2])
def test_every_module_imports_in_a_fresh_interpreter_in_any_order(seed):
    names = sorted(modules())
    random.Random(seed).shuffle(names)
    script = "import importlib\nfor n in %r:\n    importlib.import_module(n)\n" % names
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_each_module_imports_alone():
    failed = []
    for name in sorted(modules()):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300)
        if proc.returncode:
            failed.append(f"{name}: {proc.stderr.strip().splitlines()[-1]}")
    assert not failed, "\n".join(failed)
