"""The package stays readable: short modules and functions, no import cycles, one atomic-write helper,
messages through `logging` (read from the source, no imports)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "orchestrator"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imports_of(path: Path) -> set[str]:
    """The package modules `path` imports, at the top or inside functions."""
    known = {module_name(p) for p in MODULES}
    out = set()
    for node in ast.walk(tree(path)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else None
            names = [base] + [f"{base}.{a.name}" for a in node.names] if base else []
        out |= {n for n in names if n in known}
    return out - {module_name(path)}


def test_no_module_or_function_is_too_long_to_read():
    long_modules = [(p.name, n) for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long_modules
    long_functions = [(p.name, node.name, node.end_lineno - node.lineno + 1) for p in MODULES
                      for node in ast.walk(tree(p)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long_functions


def test_the_import_graph_has_no_cycles():
    graph = {module_name(p): imports_of(p) for p in MODULES}
    for package in [m for m in graph if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()]:
        graph[package] = {m for m in graph[package] if not m.startswith(f"{package}.")}  # a package's own parts
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join([*path, module, dep])}"
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def calls(name: str) -> list[str]:
    """Modules calling `name` (e.g. "os.replace", "print")."""
    found = []
    for p in MODULES:
        for node in ast.walk(tree(p)):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else (
                    f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None)
                if called == name:
                    found.append(p.name)
    return sorted(set(found))


def test_files_are_replaced_atomically_in_one_place():
    assert calls("os.replace") == ["files.py"]


def test_messages_go_through_logging():
    assert calls("print") == ["cli.py", "jobs.py"]  # what a command outputs (tables, ids, job logs) on stdout
    assert calls("warnings.warn") == [] and calls("tqdm.write") == []
    loggers = [p.name for p in MODULES if "logging.getLogger(__name__)" in p.read_text()]
    logging_modules = [p.name for p in MODULES if "log." in p.read_text() and p.name != "cli.py"]
    assert set(logging_modules) <= set(loggers)  # each module that logs has its own logger
