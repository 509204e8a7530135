"""`recipec graph`: the op graph as Graphviz dot or Mermaid, one box per node, edges from inputs."""

from __future__ import annotations

import json
from pathlib import Path

from ..ir.graph import Graph, Node
from ..ops import REGISTRY


_MAX_PARAMS, _MAX_VALUE = 4, 24


def _value_text(value) -> str | None:
    """A parameter value in a few characters, or None for one too structured to show (a config)."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, int | float):
        text = f"{value:g}"
    elif isinstance(value, str):  # an absolute path is location-dependent: its last part says enough
        text = json.dumps(Path(value).name if Path(value).is_absolute() else value)
    elif isinstance(value, list) and all(isinstance(v, int | float) for v in value):
        text = "[" + ", ".join(f"{v:g}" for v in value) + "]"
    else:
        return None
    return text if len(text) <= _MAX_VALUE else text[:_MAX_VALUE - 1] + "…"


def key_params(node: Node) -> str:
    """What a node does, in a few words: a combination's weighted inputs, else the op's plain parameters
    that differ from their defaults (`init("llama", size="tiny", seed=1)` → `arch="llama" size="tiny" seed=1`)."""
    if node.op == "combine":
        terms = [f"{c:g}·{i.label}" for c, i in zip(node.params["coefficients"], node.inputs)]
        return " + ".join(terms).replace("+ -", "− ")
    op = REGISTRY[node.op]
    fields, internal = op.Params.model_fields, getattr(op, "internal", frozenset())
    shown = [f"{name}={_value_text(value)}" for name, value in node.params.items()
             if name in fields and name not in internal and value != fields[name].default
             and _value_text(value) is not None]
    return " ".join(shown[:_MAX_PARAMS] + (["…"] if len(shown) > _MAX_PARAMS else []))


def _label(node: Node) -> str:
    return f"{node.label}\n{node.op} {key_params(node)}".rstrip() + f"\n→ {node.type}"


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
