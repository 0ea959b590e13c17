"""Imports run one way: train.py -> dhm_fast -> pipelines -> kernels (native code), with no cycles.

Two checks: each package imports on its own in a fresh interpreter without pulling in a package above
it, and the import graph read from the source (function-level imports included, since a lazy import
still ties two modules together) has no cycle and no upward edge.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A package may import only the packages listed after it.
LAYERS = ("benchmarks", "dhm_fast", "pipelines", "kernels")
ALLOWED = {"benchmarks": {"dhm_fast", "pipelines", "kernels"}, "dhm_fast": {"pipelines", "kernels"},
           "pipelines": {"kernels"}, "kernels": set()}


OPTIONAL = ("ffcv", "nvidia.dali", "numba")


def module_names(package: str) -> list[str]:
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_modules(module: str) -> set[str]:
    """Project modules `module` imports anywhere in its source (TYPE_CHECKING blocks aside)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {name for name in found if name.split(".")[0] in LAYERS}


def project_graph() -> dict[str, set[str]]:
    modules = {m for package in LAYERS for m in module_names(package)}
    # A module's own parent packages are initialised before it anyway: those edges carry no order.
    return {m: {t for t in imported_modules(m) if t in modules and t != m and not m.startswith(t + ".")}
            for m in modules}


def test_the_graph_reader_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "__init__.py").write_text("")
    (tmp_path / "pipelines" / "x.py").write_text(
        "def f():\n    from dhm_fast import losses\n    from . import y\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import kernels\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imported_modules("pipelines.x") == {"dhm_fast", "dhm_fast.losses", "pipelines", "pipelines.y"}


def test_no_package_imports_a_package_above_it():
    upward = sorted(f"{src} imports {dst}" for src, targets in project_graph().items() for dst in targets
                    if dst.split(".")[0] != src.split(".")[0]
                    and dst.split(".")[0] not in ALLOWED[src.split(".")[0]])
    assert not upward, upward


def test_no_import_cycles():
    graph = project_graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join((path + [node])[(path + [node]).index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, cycles


@pytest.mark.parametrize("package", ["kernels", "pipelines", "dhm_fast"])
def test_each_package_imports_alone_without_the_packages_above_it(package):
    above = [p for p in LAYERS[: LAYERS.index(package)]]
    # A backend module whose optional package (DALI, FFCV) is not installed may refuse to import.
    code = (f"import importlib, json, sys\n"
            f"for name in {module_names(package)!r}:\n"
            f"    try:\n"
            f"        importlib.import_module(name)\n"
            f"    except ImportError as e:\n"
            f"        if not any(opt in str(e) for opt in {OPTIONAL!r}): raise\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert not loaded & set(above), f"importing {package} loaded {sorted(loaded & set(above))}"


def test_the_command_line_starts_without_torchvision_models():
    # torchvision.models takes about a second to import: --help and a refused flag must not pay for it.
    code = "import sys, train, dhm_fast.cli; print(sorted(m for m in sys.modules if m.startswith('torchvision')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("flag", ["--help", "--list-recipes"])
def test_help_and_the_recipe_list_import_neither_torch_nor_torchvision(flag):
    # Both answer from the declarations alone (dhm_fast/config.py, catalog.py): torch's import is 1.4 s.
    code = ("import runpy, sys\n"
            f"sys.argv = ['train.py', {flag!r}]\n"
            "try:\n"
            "    runpy.run_path('train.py', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert ("--arch" if flag == "--help" else "fashion-mnist-resnet20") in result.stdout
    assert lines[-1] == "[]", f"train.py {flag} imported {lines[-1]}"
