"""The plan: what `recipec run` would build, in order, and what each step costs.

Steps come in topological order over the nodes the exports need. Inputs (`load`, `hf`, data) are not
built; every other node is built unless the cache already holds it. Costs come from each op's cost
model; the run's peak is the largest step's, since steps run one after another and each result is
streamed to disk. Rendering (text and JSON) lives in `render.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from ..ir.graph import ExportSpec, Graph, Node
from ..ops import REGISTRY
from ..ops.base import Cost

INPUT, BUILD, CACHED = "input", "build", "cached"


@dataclass(frozen=True)
class Step:
    node: Node
    status: str
    cost: Cost
    description: str


@dataclass(frozen=True)
class Plan:
    recipe: str
    steps: tuple[Step, ...]
    exports: tuple[ExportSpec, ...]

    @property
    def to_build(self) -> int:
        return sum(s.status == BUILD for s in self.steps)

    @property
    def cached(self) -> int:
        return sum(s.status == CACHED for s in self.steps)

    @property
    def totals(self) -> Cost:
        built = [s.cost for s in self.steps if s.status == BUILD]
        return Cost(sum(c.bytes_read for c in built), sum(c.bytes_written for c in built),
                    max((c.peak_bytes for c in built), default=0), sum(c.flops for c in built))

    def summary(self) -> str:
        n = len(self.exports)
        return f"Plan: {self.to_build} to build, {self.cached} cached, {n} export{'s' if n != 1 else ''}."


def describe(node: Node) -> str:
    """How the recipe wrote the expression that made this node, on one line."""
    if node.spans:
        return re.sub(r"\s+", " ", node.spans[0].text).strip()
    return node.op


def make_plan(graph: Graph, recipe: str, is_cached: Callable[[Node], bool] = lambda node: False) -> Plan:
    """The plan for a lowered graph; `is_cached` says which built nodes the cache already holds."""
    steps = []
    for node in graph.reachable():
        op = REGISTRY[node.op]
        params = op.Params.model_construct(**node.params)
        if not op.builds:
            status = INPUT
        elif is_cached(node):
            status = CACHED
        else:
            status = BUILD
        cost = op.cost(list(node.inputs), params, node.type) if op.builds else Cost()
        steps.append(Step(node, status, cost, describe(node)))
    return Plan(recipe, tuple(steps), tuple(graph.exports))
