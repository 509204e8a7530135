"""Ops: one module per family. Importing this package imports every module in it, which registers
their ops in `base.REGISTRY`: a new op family is a new module here, listed nowhere else."""

from __future__ import annotations

import importlib
import pkgutil
import re

from .base import REGISTRY, LINEAR, Op


def _import_op_modules() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_op_modules()


def call_form(op: type[Op]) -> str:
    """How a call of `op` reads in a recipe: `merge(models..., method=, base=, ...)`."""
    parts = [f"{i.name}..." if i.variadic else i.name for i in op.inputs if not i.optional]
    parts += list(op.positional)
    parts += [f"{i.name}=" for i in op.inputs if i.optional]  # keyword only: they follow the positional ones
    hidden = getattr(op, "internal", frozenset())
    named = {i.name for i in op.inputs} | set(op.positional)
    parts += [f"{name}=" for name in op.Params.model_fields if name not in hidden and name not in named]
    return f"{op.name}({', '.join(parts)})"


def summary_and_example(op: type[Op]) -> tuple[str, str]:
    """The first paragraph of an op's docstring (before its example) and its example call."""
    doc = " ".join((op.__doc__ or "").strip().split("\n\n")[0].split())
    example = EXAMPLE.search(op.__doc__ or "")
    summary = doc.split("Example:")[0].strip().removesuffix(".")
    return summary, example.group(1) if example else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bar would end the table cell


EXAMPLE = re.compile(r"Example: `([^`]+)`")


def ops_markdown() -> str:
    """The README's op table, generated from the registry."""
    rows = ["| op | what it gives | example |", "| --- | --- | --- |"]
    for name, op in sorted(REGISTRY.items()):
        summary, example = summary_and_example(op)
        rows.append(f"| `{call_form(op)}` | {_cell(summary)} | `{_cell(example)}` |")
    return "\n".join(rows) + "\n"


__all__ = ["LINEAR", "REGISTRY", "Op", "call_form", "ops_markdown", "summary_and_example"]
