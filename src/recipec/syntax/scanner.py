"""Cut recipe text into statements before parsing, and find comments.

A statement ends at a newline outside brackets. Cutting here, rather than in the grammar, lets each
statement be parsed on its own so one broken line cannot hide the errors of the others, and lets an
unclosed bracket or string be reported where it was opened (E002) instead of at the end of the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_CLOSER = {"(": ")", "[": "]"}
# Where to resume after an unclosed bracket: a new line that starts, unindented, like a statement.
_STATEMENT_START = re.compile(r"\n(?=(export\s|use\s|[A-Za-z_]\w*[ \t]*=(?!=)))")


@dataclass(frozen=True)
class Chunk:
    start: int
    end: int
    broken: bool = False  # the scanner already reported an error inside it


@dataclass(frozen=True)
class ScanError:
    kind: str  # "string", "bracket" (never closed), "mismatch" (closed by the wrong closer, at start) or "stray"
    start: int
    end: int
    opener: str
    opened: int = -1  # a mismatch: where the bracket it should have closed was opened


@dataclass
class Scan:
    masked: str  # the text with comments blanked out, positions unchanged
    chunks: list[Chunk] = field(default_factory=list)
    comments: list[tuple[int, int]] = field(default_factory=list)
    errors: list[ScanError] = field(default_factory=list)


def scan(text: str) -> Scan:
    """Find statements, comments, unclosed strings and unclosed brackets in one pass."""
    out = Scan(masked="")
    masked = list(text)
    pos, n = 0, len(text)
    chunk_start: int | None = None
    stack: list[int] = []
    broken = False

    def close_chunk(end: int) -> None:
        nonlocal chunk_start, broken
        if chunk_start is not None:
            out.chunks.append(Chunk(chunk_start, end, broken))
        chunk_start, broken = None, False

    while pos < n or stack:
        if pos >= n:
            # Unclosed bracket: report the outermost one and resume at the next likely statement.
            opener = stack[0]
            stack.clear()
            broken = True
            resume = _STATEMENT_START.search(text, opener)
            stop = resume.start() if resume else n
            # What lies past the resume point is scanned again; its errors will be found again.
            out.errors = [e for e in out.errors if e.start < stop]
            if not any(e.kind == "string" and e.start > opener for e in out.errors):
                out.errors.append(ScanError("bracket", opener, opener + 1, text[opener]))
            out.comments = [c for c in out.comments if c[0] < stop]
            if resume:
                close_chunk(stop)
                pos = stop
            continue
        ch = text[pos]
        if ch == "#":
            end = text.find("\n", pos)
            end = n if end < 0 else end
            out.comments.append((pos, end))
            masked[pos:end] = " " * (end - pos)
            pos = end
            continue
        if ch == "\n":
            if not stack:
                close_chunk(pos)
            pos += 1
            continue
        if ch in " \t\r\f":
            pos += 1
            continue
        if chunk_start is None:
            chunk_start = pos
        if ch == '"':
            end = _string_end(text, pos)
            if end is None:
                line_end = text.find("\n", pos)
                line_end = n if line_end < 0 else line_end
                out.errors.append(ScanError("string", pos, line_end, '"'))
                broken = True
                pos = line_end
            else:
                pos = end
            continue
        if ch in _CLOSER:
            stack.append(pos)
        elif ch in ")]" and stack and _CLOSER[text[stack[-1]]] == ch:
            stack.pop()
        elif ch in ")]" and any(_CLOSER[text[i]] == ch for i in stack):
            # `f([a, b)`: this closer ends an outer bracket while an inner one is open. Said here, at the
            # closer, naming the inner one; the brackets up to its match are taken as closed.
            out.errors.append(ScanError("mismatch", pos, pos + 1, text[stack[-1]], stack[-1]))
            broken = True
            while _CLOSER[text[stack.pop()]] != ch:
                pass
        elif ch in ")]":  # closes no bracket that is open: `merge([a, b]))`
            out.errors.append(ScanError("stray", pos, pos + 1, ch))
            broken = True
        pos += 1
    close_chunk(n)
    out.errors.sort(key=lambda e: e.start)
    out.masked = "".join(masked)
    return out


def _string_end(text: str, start: int) -> int | None:
    """Offset just past the string opened at `start`, or None if the line ends first."""
    pos = start + 1
    while pos < len(text):
        ch = text[pos]
        if ch == "\\":
            pos += 2
            continue
        if ch == '"':
            return pos + 1
        if ch == "\n":
            return None
        pos += 1
    return None
