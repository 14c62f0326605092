"""The package's import graph has no cycles, and each module imports at module level
(an import inside a function carries a comment with its reason)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "recsys_core"
pytestmark = pytest.mark.unit


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        for n in nodes:
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("recsys_core"):
                targets = [n.module] + [f"{n.module}.{a.name}" for a in n.names]
            elif isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            else:
                continue
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycles():
    """Counting imports inside functions too: a lazy import does not hide a cycle."""
    assert _cycle(_graph(top_level_only=False)) is None


def test_cycle_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_function_level_imports_have_a_reason():
    missing = []
    for p in PKG.rglob("*.py"):
        lines = p.read_text().splitlines()
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for s in ast.walk(n):
                    if isinstance(s, (ast.Import, ast.ImportFrom)):
                        line = lines[s.lineno - 1]
                        i = s.lineno - 2  # the comment may head a run of consecutive imports
                        while i > 0 and lines[i].strip().startswith(("import ", "from ")) and "#" not in lines[i]:
                            i -= 1
                        above = lines[i].strip() if i >= 0 else ""
                        if "#" not in line and not above.startswith("#") and "#" not in lines[i]:
                            missing.append(f"{p.relative_to(PKG.parent)}:{s.lineno}: {line.strip()}")
    assert not missing, "imports inside functions without a reason:\n" + "\n".join(missing)


def test_stage_folders_exist():
    """The README's layout: one folder per pipeline stage."""
    for pkg in ("data", "model", "train", "serve", "eval", "ops"):
        assert (PKG / pkg / "__init__.py").is_file(), pkg
