"""The op graph: immutable, typed, hash-consed nodes.

A `Node` is an op applied to input nodes with canonical parameters. `Graph.add` returns the existing
node when the same (op, inputs, params) was added before, so identical subexpressions are one node
and are built once. Spans and the names a node is bound to are recorded beside it, for diagnostics
and for the plan's labels, and take no part in identity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..source import Span
from .types import Type


def canonical_json(value: Any) -> str:
    """Canonical JSON of parameter values (sorted keys, no whitespace): what identity and cache keys hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_plain)


def plain_data(value: Any) -> Any:
    """Parameter values as canonical JSON reads back: fractions as numbers, tuples as lists, paths as text."""
    return json.loads(canonical_json(value))


def _plain(value: Any) -> Any:
    if isinstance(value, Fraction):
        return int(value) if value.denominator == 1 else float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"parameter value {value!r} is not plain data")


@dataclass(frozen=True, eq=False)
class Node:
    id: int
    op: str
    inputs: tuple[Node, ...]
    params: dict[str, Any]
    type: Type
    spans: list[Span] = field(default_factory=list, repr=False)
    names: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """How the plan names this node: its first bound name, else `%id`."""
        return self.names[0] if self.names else f"%{self.id}"

    @property
    def written_as(self) -> str:
        """How the recipe names this node: its bound name, else the text that made it (`text("a.jsonl")`)."""
        return self.label if self.names or not self.spans else self.spans[0].text

    def __hash__(self) -> int:
        return self.id


@dataclass(frozen=True)
class ExportSpec:
    node: Node
    path: Path
    format: str
    span: Span
    display: str  # the path as the recipe wrote it


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    exports: list[ExportSpec] = field(default_factory=list)
    roots: list[Node] = field(default_factory=list)  # built and shown by `run` though not exported (reports)
    _index: dict[tuple, Node] = field(default_factory=dict, repr=False)

    def add(self, op: str, inputs: tuple[Node, ...], params: dict[str, Any], type_: Type,
            span: Span | None = None) -> Node:
        """The node for (op, inputs, params), created on first use."""
        key = (op, tuple(n.id for n in inputs), canonical_json(params))
        node = self._index.get(key)
        if node is None:
            node = Node(len(self.nodes), op, inputs, dict(params), type_)
            self.nodes.append(node)
            self._index[key] = node
        if span is not None:
            node.spans.append(span)
        return node

    def reachable(self) -> list[Node]:
        """Nodes the exports and roots depend on, in creation order, which is topological (inputs first)."""
        seen: set[int] = set()
        stack = [export.node for export in self.exports] + list(self.roots)
        while stack:
            node = stack.pop()
            if node.id not in seen:
                seen.add(node.id)
                stack.extend(node.inputs)
        return [self.nodes[i] for i in sorted(seen)]
