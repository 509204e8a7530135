"""`recipec fmt`: print an AST back as canonical recipe text, keeping every comment.

Canonical layout: the header, one statement per line, the `=` of consecutive assignments aligned,
spaces around `=`, `+`, `-`, none around `*` and
`/` (as in `cp + 0.8*(chat - base)`), the fewest parentheses that keep the tree the same, numbers as
written, at most one blank line where the source had some. A comment on its own line stays before the
statement that follows it; a comment after code stays at the end of that statement's line; a comment
inside a multi-line statement moves above it. Formatting is idempotent and never changes the AST.
"""

from __future__ import annotations

import json
import re

from . import ast

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_BLANK_LINE = re.compile(r"\n[ \t\r\f]*\n")


def _prec(e: ast.Expr) -> int:
    if isinstance(e, ast.BinOp):
        return _PREC[e.op]
    return 3 if isinstance(e, ast.Neg) else 4


def expr_text(e: ast.Expr) -> str:
    """Canonical text of an expression."""
    if isinstance(e, ast.Number):
        return e.text
    if isinstance(e, ast.String):
        return json.dumps(e.value, ensure_ascii=False)
    if isinstance(e, ast.Bool):
        return "true" if e.value else "false"
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.List):
        return "[" + ", ".join(expr_text(i) for i in e.items) + "]"
    if isinstance(e, ast.Call):
        args = [expr_text(a) for a in e.args] + [f"{k.name}={expr_text(k.value)}" for k in e.kwargs]
        return f"{e.func.id}({', '.join(args)})"
    if isinstance(e, ast.Neg):
        if isinstance(e.operand, ast.Neg):  # `- -x`: no brackets, so fmt never deepens the nesting
            return "- " + expr_text(e.operand)
        return "-" + _wrap(e.operand, _prec(e.operand) < 3)
    if isinstance(e, ast.BinOp):
        p = _PREC[e.op]
        left = _wrap(e.left, _prec(e.left) < p)
        right = _wrap(e.right, _prec(e.right) <= p)  # left-associative: a - (b - c) keeps its parentheses
        return f"{left}{e.op}{right}" if p == 2 else f"{left} {e.op} {right}"
    raise AssertionError(f"unhandled expression {e!r}")


def _wrap(e: ast.Expr, parens: bool) -> str:
    text = expr_text(e)
    return f"({text})" if parens else text


def statement_text(s: ast.Statement) -> str:
    if isinstance(s, ast.Assign):
        return f"{s.name.id} = {expr_text(s.value)}"
    if isinstance(s, ast.Export):
        tail = f" as {s.format.id}" if s.format else ""
        return f"export {expr_text(s.value)} to {expr_text(s.path)}{tail}"
    if isinstance(s, ast.Use):
        return f"use {expr_text(s.path)}"
    raise AssertionError(f"unhandled statement {s!r}")


def format_recipe(recipe: ast.Recipe) -> str:
    """The canonical text of a parsed recipe."""
    text = recipe.source.text if recipe.source else ""
    header_end = text.find("\n", _header_start(text))
    header_end = len(text) if header_end < 0 else header_end
    # Lines to print, each with the source offsets it came from, so blank lines can be kept.
    leading: list[list[ast.Comment]] = [[] for _ in recipe.statements]
    trailing: list[str | None] = [None for _ in recipe.statements]
    before_header: list[ast.Comment] = []
    header_comment, footer = None, []
    starts = [s.span.start for s in recipe.statements]
    for c in recipe.comments:
        if c.span.start < header_end:
            if c.trailing:
                header_comment = c.text
            else:
                before_header.append(c)
            continue
        owner = _owner(recipe.statements, c, text)
        if owner is None:
            nxt = next((i for i, start in enumerate(starts) if start > c.span.start), None)
            (footer if nxt is None else leading[nxt]).append(c)
        elif (c.trailing and c.span.start >= recipe.statements[owner].span.end
              and _same_line(text, recipe.statements[owner].span.end, c.span.start)):
            trailing[owner] = c.text
        else:
            leading[owner].append(c)
    out = [c.text for c in before_header]
    out.append(f"recipec {recipe.version}" + (f"  {header_comment}" if header_comment else ""))
    prev_end = header_end

    def emit(line: str, start: int, end: int) -> None:
        nonlocal prev_end
        if start > prev_end and _BLANK_LINE.search(text, prev_end, start + 1):
            out.append("")
        out.append(line)
        prev_end = max(prev_end, end)

    assigned: dict[int, str] = {}  # line index -> the name an assignment on that line binds
    for i, stmt in enumerate(recipe.statements):
        for c in leading[i]:
            # A comment from inside a multi-line statement is printed above it: blank lines do not apply.
            emit(c.text, c.span.start if c.span.start < stmt.span.start else prev_end, c.span.end)
        line_end = text.find("\n", stmt.span.end)
        emit(statement_text(stmt) + (f"  {trailing[i]}" if trailing[i] else ""), stmt.span.start,
             len(text) if line_end < 0 else line_end)
        if isinstance(stmt, ast.Assign):
            assigned[len(out) - 1] = stmt.name.id
    for c in footer:
        emit(c.text, c.span.start, c.span.end)
    _align_assignments(out, assigned)
    return "\n".join(out) + "\n"


def _align_assignments(lines: list[str], assigned: dict[int, str]) -> None:
    """Align the `=` of consecutive assignments, as a table of definitions reads best."""
    run: list[int] = []
    for index in sorted(assigned) + [-1]:
        if run and index != run[-1] + 1:
            width = max(len(assigned[k]) for k in run)
            for k in run:
                lines[k] = assigned[k].ljust(width) + lines[k][len(assigned[k]):]
            run = []
        run.append(index)


def _header_start(text: str) -> int:
    match = re.search(r"^[ \t]*recipec\b", text, re.MULTILINE)
    return match.start() if match else 0


def _owner(statements, comment: ast.Comment, text: str) -> int | None:
    """The statement a comment belongs to: one whose span contains it, or ends on its line."""
    for i, s in enumerate(statements):
        if s.span.start <= comment.span.start < s.span.end:
            return i
        if comment.trailing and s.span.end <= comment.span.start and _same_line(text, s.span.end, comment.span.start):
            return i
    return None


def _same_line(text: str, a: int, b: int) -> bool:
    return "\n" not in text[a:b]
