"""The package's layers, checked from its source: no import cycle between recipec's packages and top
modules, and no layer importing one it must not (the parser knows no torch; backends know no syntax)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "recipec"

# What a layer may never import, whatever else changes.
FORBIDDEN = {
    "backends": {"syntax", "cli", "check"},
    "store": {"ir", "ops", "check", "backends", "engine", "plan", "syntax", "cli"},
    "ir": {"ops", "check", "backends", "engine", "plan", "syntax", "cli"},
    "dtypes": {"*"},
    "textprep": {"syntax", "check", "ops", "backends", "engine", "plan", "cli"},
    "syntax": {"ir", "ops", "check", "backends", "engine", "plan", "store", "cli"},
}


def _unit(module: str) -> str:
    """The package or top module a dotted module name belongs to (`recipec.ir.types` -> `ir`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "recipec"


def import_graph() -> dict[str, set[str]]:
    """unit -> the other units it imports (at any depth of its modules, lazy imports included)."""
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[:-1]  # what a relative import starts from, for a package's __init__ and a module alike
        module = ".".join(parts[:-1] if path.name == "__init__.py" else parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
                # `from .. import arch` imports the module recipec.arch, not the package.
                targets = [f"{prefix}.{a.name}" for a in node.names] if not node.module else [prefix]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target.startswith("recipec.") and _unit(target) != _unit(module):
                    edges.setdefault(_unit(module), set()).add(_unit(target))
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(unit: str) -> list[str] | None:
        state[unit] = 1
        stack.append(unit)
        for nxt in sorted(edges.get(unit, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[unit] = 2
        stack.pop()
        return None

    for unit in sorted(edges):
        if unit not in state and (found := visit(unit)):
            return found
    return None


def test_no_import_cycle_between_packages():
    edges = import_graph()
    assert {"check", "ir", "ops", "store", "backends", "engine"} <= set(edges)  # the walk sees the package
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])


def test_layers_import_only_what_they_may():
    edges = import_graph()
    for unit, forbidden in FORBIDDEN.items():
        imported = edges.get(unit, set()) - {"recipec"}
        bad = imported if "*" in forbidden else imported & forbidden
        assert not bad, f"{unit} imports {sorted(bad)}"


def test_a_cycle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
