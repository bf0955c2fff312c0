"""The house rules, read off the source (every import, at module level or inside a function):
arrows run ``pipeline`` → ``jobs`` → ``elastictrain``; the library never imports a cluster, engine
or tracking package; no two project modules import each other, directly or round a longer loop;
the library's root stays a handful of modules."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("elastictrain", "jobs", "pipeline")
FORBIDDEN = {
    "elastictrain": {"ray", "wandb", "deepspeed", "submitit", "jobs", "pipeline"},
    "jobs": {"pipeline", "wandb"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file; ``from pkg import sub`` names the
    submodule when ``sub`` is one, and relative imports are resolved against the package."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub if sub in modules else base, node.lineno))
    return found


def test_arrows_run_one_way():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        top = name.split(".")[0]
        for imported, line in _imports(name, path, modules):
            if imported.split(".")[0] in FORBIDDEN.get(top, ()):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert wrong == [], "\n".join(wrong)


def test_no_import_cycles():
    modules = _modules()
    graph = {n: sorted({m for m, _ in _imports(n, p, modules) if m in modules and m != n}) for n, p in modules.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                cycles.append(sorted(scc))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == [], cycles


def test_library_root_is_a_handful_of_modules():
    root = sorted(p.name for p in (ROOT / "elastictrain").glob("*.py"))
    assert len(root) <= 8, root
    for sub in ("constraints", "distributed", "train", "artifact", "measure", "data", "models"):
        assert (ROOT / "elastictrain" / sub / "__init__.py").is_file(), sub
