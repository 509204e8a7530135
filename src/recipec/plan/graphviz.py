"""`recipec graph`: the op graph as Graphviz dot or Mermaid, one box per node, edges from inputs."""

from __future__ import annotations

import json

from ..ir.graph import Graph, Node


def _label(node: Node) -> str:
    return f"{node.label}\n{node.op} → {node.type}"


def to_dot(graph: Graph) -> str:
    lines = ["digraph recipe {", "  rankdir=LR;", '  node [shape=box, fontname="monospace"];']
    for node in graph.reachable():
        lines.append(f"  n{node.id} [label={json.dumps(_label(node))}];")
        lines += [f"  n{i.id} -> n{node.id};" for i in node.inputs]
    for k, export in enumerate(graph.exports):
        lines.append(f'  e{k} [shape=note, label={json.dumps(export.display)}];')
        lines.append(f"  n{export.node.id} -> e{k};")
    return "\n".join(lines + ["}"]) + "\n"


def _mermaid_text(text: str) -> str:
    return '"' + text.replace('"', "#quot;").replace("\n", "<br/>") + '"'


def to_mermaid(graph: Graph) -> str:
    lines = ["flowchart LR"]
    for node in graph.reachable():
        lines.append(f"  n{node.id}[{_mermaid_text(_label(node))}]")
        lines += [f"  n{i.id} --> n{node.id}" for i in node.inputs]
    for k, export in enumerate(graph.exports):
        lines.append(f"  e{k}[/{_mermaid_text(export.display)}/]")
        lines.append(f"  n{export.node.id} --> e{k}")
    return "\n".join(lines) + "\n"
