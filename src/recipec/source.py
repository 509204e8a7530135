"""Source text and spans: where in which file a piece of a recipe came from.

Every AST node and every diagnostic carries a `Span`; line and column are derived here, in one place,
so the parser, the checker and the renderer agree on positions (1-based lines and columns, as editors
expect; columns count characters, `byte` counts UTF-8 bytes for tools that want them).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(eq=False)
class Source:
    """One recipe file's text; identity, not content, makes two sources the same."""

    path: Path
    text: str
    display: str = ""
    _line_starts: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.display = self.display or str(self.path)
        self._line_starts = [0] + [i + 1 for i, ch in enumerate(self.text) if ch == "\n"]

    def line_col(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset."""
        line = bisect.bisect_right(self._line_starts, offset) - 1
        return line + 1, offset - self._line_starts[line] + 1

    def line_text(self, line: int) -> str:
        """The text of a 1-based line, without its newline."""
        start = self._line_starts[line - 1]
        end = self.text.find("\n", start)
        return self.text[start : end if end >= 0 else len(self.text)]

    def byte_offset(self, offset: int) -> int:
        """UTF-8 byte offset of a character offset."""
        return len(self.text[:offset].encode("utf-8"))


@dataclass(frozen=True, eq=False)
class Span:
    """A half-open character range [start, end) in a source."""

    source: Source
    start: int
    end: int

    @property
    def line(self) -> int:
        return self.source.line_col(self.start)[0]

    @property
    def column(self) -> int:
        return self.source.line_col(self.start)[1]

    @property
    def text(self) -> str:
        return self.source.text[self.start : self.end]

    def location(self) -> str:
        """`file:line:col`, the form editors jump to."""
        line, col = self.source.line_col(self.start)
        return f"{self.source.display}:{line}:{col}"

    def to(self, other: Span) -> Span:
        """The span from this one's start to the other's end."""
        return Span(self.source, self.start, max(self.end, other.end))
