"""Plan output: a readable, Terraform-style listing for people and the same data as JSON."""

from __future__ import annotations

import json

from ..artifacts import KINDS
from ..ir.graph import Node
from ..units import human_bytes, human_count, human_seconds
from .plan import BUILD, CACHED, INPUT, Plan

PLAN_FORMAT_VERSION = 1
_MARK = {BUILD: "+", CACHED: "=", INPUT: "<"}
_COLOR = {BUILD: "32", CACHED: "36", INPUT: "2"}


def _signature_unknown(node: Node) -> bool:
    return node.type.kind.value in ("Model", "Delta") and node.type.signature is None


def _unknown(node: Node) -> bool:
    """Whether a node's cost cannot be known yet: it reads a model whose signature is unknown (an unfetched
    hub model, a pickle), or is such a model itself. A node whose own shape depends on the weights' values
    (`prune(uniform=false)`, `lowrank(energy=)`) still has a known cost: its inputs are known."""
    return any(_signature_unknown(i) for i in node.inputs) or (not node.inputs and _signature_unknown(node))


def _why_unknown(node: Node) -> str:
    if node.op == "hf":
        return "signature unknown: not in the local Hugging Face cache (the note says how to fetch it)"
    if node.op == "load":
        return "signature unknown until the pickled weights are converted"
    return f"signature unknown until {_awaited(node)}"


def _awaited(node: Node) -> str:
    """What an unknown signature or cost waits for: a download (an unfetched source upstream) or a build
    (an upstream shape that depends on the weights' values)."""
    seen, todo = set(), list(node.inputs)
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if not n.inputs and _signature_unknown(n):
            return "its inputs are fetched"
        todo.extend(n.inputs)
    return "its inputs are built" if any(_signature_unknown(i) for i in node.inputs) \
        else "it is built: it depends on the weights' values"


def _shorten(text: str, width: int = 80) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _type_line(node: Node) -> str:
    sig = node.type.signature
    if node.type.kind.value in ("Model", "Delta"):
        if sig is None:
            return f"{node.type} · {_why_unknown(node)}"
        return (f"{node.type} · {human_count(sig.params)} params · {len(sig.tensors)} tensors · "
                f"{human_bytes(sig.nbytes)} {sig.dtype}")
    kind = KINDS.get(node.type.kind)
    return kind.describe(node.type) if kind else str(node.type)


def render_text(plan: Plan, color: bool = False) -> str:
    def paint(text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if color else text

    width = max((len(s.node.label) for s in plan.steps), default=4) + 2
    lines = [f"recipec plan {plan.recipe}", ""]
    for step in plan.steps:
        node = step.node
        mark = paint(_MARK[step.status], _COLOR[step.status])
        status = {INPUT: "input", CACHED: "cached", BUILD: node.op}[step.status]
        lines.append(f"  {mark} {node.label:<{width}}{_shorten(step.description)}")
        pad = " " * (width + 4)
        lines.append(f"{pad}{paint(status, _COLOR[step.status])} → {_type_line(node)}")
        if node.inputs:
            lines.append(f"{pad}from {', '.join(i.label for i in node.inputs)}")
        if step.status == BUILD and _unknown(node):
            lines.append(f"{pad}cost unknown until {_awaited(node)}")
        elif step.status == BUILD:
            c = step.cost
            lines.append(f"{pad}read {human_bytes(c.bytes_read)} · write {human_bytes(c.bytes_written)} · "
                         f"peak {human_bytes(c.peak_bytes)}{_accelerator(c)} · {human_count(c.flops, 'FLOP')} · "
                         f"~{human_seconds(step.seconds)}")
            if c.detail:
                lines.append(f"{pad}{c.detail}")
            if step.advice:
                lines.append(f"{pad}{step.advice}")
    for export in plan.exports:
        lines.append(f"  {paint('→', '35')} export {export.node.label} to {export.display} ({export.format})")
    t = plan.totals
    unknown = _unknown_builds(plan)
    lines += ["", f"Totals{' of the known steps' if unknown else ''}: read {human_bytes(t.bytes_read)} · "
                  f"write {human_bytes(t.bytes_written)} · peak {human_bytes(t.peak_bytes)}{_accelerator(t)} · "
                  f"{human_count(t.flops, 'FLOP')} · ~{human_seconds(plan.seconds)}"
                  + (f" (+ {unknown} step{'s' if unknown != 1 else ''} of unknown cost)" if unknown else "")]
    if t.peak_bytes:
        lines.append(f"Peak: private memory of `recipec run --threads {plan.threads}`, Python and torch included, "
                     "memory-mapped inputs not counted.")
    lines.append(paint(plan.summary(), "1"))
    return "\n".join(lines) + "\n"


def _accelerator(cost) -> str:
    return f" · accelerator {human_bytes(cost.accelerator_bytes)}" if cost.accelerator_bytes is not None else ""


def _signature_data(node: Node) -> dict | None:
    sig = node.type.signature
    if sig is None:
        return None
    return {"model_type": sig.model_type, "params": sig.params, "tensors": len(sig.tensors), "bytes": sig.nbytes,
            "dtype": sig.dtype, "vocab_size": sig.vocab_size}


def _unknown_builds(plan: Plan) -> int:
    return sum(s.status == BUILD and _unknown(s.node) for s in plan.steps)


def _cost_data(step) -> dict | None:
    """A step's cost, or None (JSON null) when it cannot be known yet: never a misleading 0."""
    if _unknown(step.node):
        return None
    c = step.cost
    return {"bytes_read": c.bytes_read, "bytes_written": c.bytes_written, "peak_bytes": c.peak_bytes,
            "flops": c.flops, "accelerator_bytes": c.accelerator_bytes, "seconds": round(step.seconds, 3)}


def _totals_data(plan: Plan) -> dict:
    """The totals, or nulls when a step's cost is unknown (a sum without it would mislead)."""
    unknown = _unknown_builds(plan)
    figures = {name: None if unknown else value
               for name, value in {**vars(plan.totals), "seconds": round(plan.seconds, 3)}.items()}
    return {**figures, "unknown": bool(unknown), "unknown_steps": unknown}


def to_data(plan: Plan) -> dict:
    return {
        "format_version": PLAN_FORMAT_VERSION,
        "recipe": plan.recipe,
        "threads": plan.threads,  # peak_bytes: the run process's private memory on this many workers
        "steps": [
            {
                "id": s.node.id, "label": s.node.label, "names": list(s.node.names), "op": s.node.op,
                "status": s.status, "description": s.description, "inputs": [i.label for i in s.node.inputs],
                "type": str(s.node.type), "signature": _signature_data(s.node), "unknown": _unknown(s.node),
                "cost": _cost_data(s),
                **({"advice": s.advice} if s.advice else {}),
            }
            for s in plan.steps
        ],
        "exports": [{"node": e.node.label, "path": e.display, "format": e.format} for e in plan.exports],
        "totals": _totals_data(plan),
        "summary": {"build": plan.to_build, "cached": plan.cached, "exports": len(plan.exports),
                    "text": plan.summary()},
    }


def render_json(plan: Plan) -> str:
    return json.dumps(to_data(plan), indent=2) + "\n"
