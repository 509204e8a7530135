"""Diagnostics: what recipec tells a user about a recipe or an input, as data, and the one renderer.

A `Diagnostic` has a code, a severity, a message, the span it is about, `note`s pointing at related
places and one `hint` phrased as an instruction. Phases collect diagnostics in a `Diagnostics` list
and report them together; `RecipeError` carries a batch out of a phase. The same data renders as text
(`file:line:col: error[CODE]: message`, the source line, carets, notes, hint) or as JSON (`--json`).
The catalogue of codes, with the long explanations behind `recipec explain CODE`, lives in `codes.py`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import IO, Iterable

from .codes import CODES, exit_status_for
from .source import Span

JSON_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Note:
    message: str
    span: Span | None = None


@dataclass(frozen=True)
class Diagnostic:
    code: str
    message: str
    span: Span | None = None
    hint: str | None = None
    notes: tuple[Note, ...] = ()
    severity: str = "error"
    # Set for problems in an input file rather than in the recipe text (e.g. a corrupt header).
    path: str | None = None

    def __post_init__(self) -> None:
        assert self.code in CODES, f"unregistered diagnostic code {self.code}"


@dataclass
class Diagnostics:
    """An ordered collection of diagnostics for one phase."""

    items: list[Diagnostic] = field(default_factory=list)

    def add(self, diagnostic: Diagnostic) -> None:
        self.items.append(diagnostic)

    def error(self, code: str, message: str, span: Span | None = None, hint: str | None = None,
              notes: Iterable[Note] = (), path: str | None = None) -> None:
        self.add(Diagnostic(code, message, span, hint, tuple(notes), "error", path))

    def warning(self, code: str, message: str, span: Span | None = None, hint: str | None = None) -> None:
        self.add(Diagnostic(code, message, span, hint, (), "warning"))

    def note(self, code: str, message: str, span: Span | None = None, hint: str | None = None) -> None:
        self.add(Diagnostic(code, message, span, hint, (), "note"))

    def extend(self, others: Iterable[Diagnostic]) -> None:
        self.items.extend(others)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity == "error"]

    def raise_if_errors(self) -> None:
        if self.errors:
            raise RecipeError(self.items)


class RecipeError(Exception):
    """A batch of diagnostics that stops a phase; the CLI renders them and exits with their status."""

    def __init__(self, diagnostics: Iterable[Diagnostic]):
        self.diagnostics = list(diagnostics)
        super().__init__("\n".join(d.message for d in self.diagnostics))

    @property
    def exit_status(self) -> int:
        return exit_status_for([d.code for d in self.diagnostics if d.severity == "error"])


def use_color(stream: IO[str]) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return hasattr(stream, "isatty") and stream.isatty()


_STYLES = {"error": "1;31", "warning": "1;33", "note": "1;36", "hint": "1;32", "caret": "1;31", "loc": "1"}


def _paint(text: str, style: str, color: bool) -> str:
    return f"\x1b[{_STYLES[style]}m{text}\x1b[0m" if color else text


def _snippet_lines(span: Span, color: bool, caret_style: str = "caret") -> list[str]:
    line, col = span.source.line_col(span.start)
    text = span.source.line_text(line)
    end_line, end_col = span.source.line_col(max(span.start, span.end - 1))
    # A span that runs past its first line is underlined to that line's end.
    last = end_col if end_line == line else len(text)
    width = max(1, last - col + 1)
    return ["  " + text, "  " + " " * (col - 1) + _paint("^" * width, caret_style, color)]


def render(diagnostic: Diagnostic, color: bool = False) -> str:
    """The human form of one diagnostic."""
    d = diagnostic
    where = d.span.location() if d.span else (d.path or "recipec")
    head = f"{_paint(where, 'loc', color)}: {_paint(f'{d.severity}[{d.code}]', d.severity, color)}: {d.message}"
    lines = [head]
    if d.span:
        lines += _snippet_lines(d.span, color)
    for note in d.notes:
        prefix = _paint("note", "note", color)
        if note.span:
            lines.append(f"  {prefix}: {note.span.location()}: {note.message}")
            lines += ["  " + s for s in _snippet_lines(note.span, color, "note")]
        else:
            lines.append(f"  {prefix}: {note.message}")
    if d.hint:
        lines.append(f"  {_paint('hint', 'hint', color)}: {d.hint}")
    return "\n".join(lines)


def _summary(items: list[Diagnostic]) -> str:
    """`2 errors and 1 warning found`; notes are information, not findings, and are not counted."""
    counts = [(sum(d.severity == sev for d in items), sev) for sev in ("error", "warning")]
    found = " and ".join(f"{n} {sev}{'s' if n != 1 else ''}" for n, sev in counts if n)
    return f"\n{found} found\n" if found else "\n"


def in_order(diagnostics: Iterable[Diagnostic]) -> list[Diagnostic]:
    """Diagnostics by position (file, line, column), as a reader meets them; those without a place last.

    Phases find problems in the order they evaluate, which is not the order of the text."""
    def position(d: Diagnostic) -> tuple:
        if d.span is None:
            return (1, d.path or "", 0)
        return (0, d.span.source.display, d.span.start)

    return sorted(diagnostics, key=position)


def render_all(diagnostics: Iterable[Diagnostic], color: bool = False) -> str:
    """All diagnostics in text order, then a count line, as a compiler prints them."""
    items = in_order(diagnostics)
    if not items:
        return ""
    return "\n\n".join(render(d, color) for d in items) + "\n" + _summary(items)


def _position(span: Span, offset: int) -> dict:
    line, col = span.source.line_col(offset)
    return {"line": line, "column": col, "byte": span.source.byte_offset(offset)}


def to_data(d: Diagnostic) -> dict:
    """The JSON form of one diagnostic."""
    data: dict = {"severity": d.severity, "code": d.code, "message": d.message, "hint": d.hint}
    if d.span:
        data["range"] = {
            "file": d.span.source.display,
            "start": _position(d.span, d.span.start),
            "end": _position(d.span, d.span.end),
        }
        data["snippet"] = d.span.source.line_text(d.span.line)
    else:
        data["range"] = None
        data["file"] = d.path
    data["notes"] = [
        {"message": n.message, "location": n.span.location() if n.span else None} for n in d.notes
    ]
    return data


def to_json(diagnostics: Iterable[Diagnostic], **summary) -> str:
    """One JSON document: `ok` (no errors), the diagnostics in text order, and any summary fields given."""
    items = in_order(diagnostics)
    return json.dumps({"format_version": JSON_FORMAT_VERSION, "ok": not any(d.severity == "error" for d in items),
                       "diagnostics": [to_data(d) for d in items], **summary}, indent=2)
