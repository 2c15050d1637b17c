"""The package's shape: no import cycles, no private names across modules, a light import."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "geoinvert"


def _modules():
    """``{dotted name: path}`` of every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(module, path, modules):
    """``(target module, imported name)`` of every import in ``module`` (at any depth of the
    file: function-level imports count as module-level ones)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "geoinvert":
                    yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "geoinvert":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub, None) if sub in modules else (target, alias.name)


def _graph():
    modules = _modules()
    edges, private = {m: set() for m in modules}, []
    for module, path in modules.items():
        for target, name in _imported(module, path, modules):
            if target != module:
                edges[module].add(target)
            if name and name.startswith("_") and not name.startswith("__"):
                private.append(f"{module} imports {target}.{name}")
    return edges, private


def _cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _package_edges(edges):
    """The graph without a package's imports of its own submodules (``__init__`` re-exports):
    a cycle through them is a cycle of the submodules themselves, which stays visible."""
    return {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}


def test_no_import_cycle():
    edges, _ = _graph()
    assert _cycles(_package_edges(edges)) == []


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_crosses_a_module():
    _, private = _graph()
    assert private == []


def test_import_geoinvert_loads_no_heavy_dependency():
    code = ("import sys, geoinvert, geoinvert.case, geoinvert.parallel; "
            "print([m for m in ('torch', 'dolfinx', 'petsc4py') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
