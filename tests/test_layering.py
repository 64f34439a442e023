"""Imports flow one way: ops, data, losses, sharding -> models -> convert -> train, generate -> eval, scoring -> recipes.

Within the eval/scoring rank, eval may use scoring (multiple choice by option log-likelihood), never the reverse.
Every `import vlmjax.X` in the package (module level or inside a function) is checked against that order; siblings
of one rank do not import each other, and no two modules import each other (directly or through a cycle).
"""

from __future__ import annotations

import ast
import pathlib

import vlmjax

RANK = {"ops": 0, "data": 0, "losses": 0, "sharding": 0, "runtime": 0, "models": 1, "convert": 2, "train": 3,
        "generate": 3, "scoring": 4, "eval": 4.5, "recipes": 5, "demo": 6}
ROOT = pathlib.Path(vlmjax.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = ("vlmjax",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute vlmjax module names imported anywhere in the file (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from vlmjax.models import lora` imports the module vlmjax.models.lora
            out |= {f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names}
    return {m for m in out if m == "vlmjax" or m.startswith("vlmjax.")}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_top_level_part_has_a_rank():
    parts = {_top(m) for m in _graph()} - {""}
    assert parts <= set(RANK), f"give these a rank in RANK: {sorted(parts - set(RANK))}"


def test_imports_flow_one_way():
    bad = []
    for mod, deps in sorted(_graph().items()):
        a = _top(mod)
        for dep in sorted(deps):
            b = _top(dep)
            if a and b and a != b and RANK[b] >= RANK[a]:
                bad.append(f"{mod} imports {dep} ({a} rank {RANK[a]} -> {b} rank {RANK[b]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    modules = set(graph)

    def resolve(dep: str) -> str | None:  # `from vlmjax.models import lora` names a module or a package attribute
        while dep and dep not in modules:
            dep = dep.rpartition(".")[0]
        return dep or None

    edges = {m: {r for d in deps if (r := resolve(d)) and r != m and not m.startswith(r + ".")}
             for m, deps in graph.items()}
    edges = {m: {d for d in ds if not d.endswith("__init__")} for m, ds in edges.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(edges.get(m, ())):
            if _is_package(d):
                continue  # importing a package's __init__ re-exports, not a module dependency
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _is_module(module: str) -> bool:
    path = ROOT.parent / module.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _is_package(module: str) -> bool:
    return (ROOT.parent / module.replace(".", "/") / "__init__.py").exists()


def test_benches_use_public_names_only():
    """A bench measures the library as users call it: no private (_name) imports from vlmjax."""
    bad = []
    for path in (ROOT.parent / "bench").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vlmjax"):
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, "private imports in bench/:\n" + "\n".join(bad)
