"""The architecture as import facts: verif/ is pure science, jobs/ is a one-way pipeline, config is light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph(package: str) -> dict[str, set[str]]:
    files = [p for p in (REPO / package).rglob("*.py")]
    names = {_module_name(p) for p in files}
    return {_module_name(p): {m for m in _imports(p) if m in names and m != _module_name(p)} for p in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, if any (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (found := visit(node)):
            return found
    return None


def test_jobs_is_a_one_way_pipeline():
    cycle = _cycle(_graph("jobs"))
    assert cycle is None, f"import cycle in jobs/: {' -> '.join(cycle)}"


def test_cycle_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_verif_imports_no_orchestration_and_no_test_code():
    bad = {
        _module_name(p): sorted(m for m in _imports(p) if m.split(".")[0] in ("jobs", "launch", "tests", "ray", "wandb"))
        for p in (REPO / "verif").rglob("*.py")
    }
    assert not {k: v for k, v in bad.items() if v}


def test_product_never_imports_test_support():
    for package in ("jobs", "verif"):
        for path in (REPO / package).rglob("*.py"):
            assert not any(m.startswith("tests") for m in _imports(path)), path
    assert not any(m.startswith("tests") for m in _imports(REPO / "launch.py"))


def test_config_validation_imports_no_heavy_library():
    """A config error must be reported before torch, transformers or Ray load (they take seconds; polars,
    which the prompt-file vocabulary brings, takes ~0.2 s and is allowed)."""
    code = (
        "import sys; import launch; from jobs import config; config.load_config(); "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'ray', 'wandb')); "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
