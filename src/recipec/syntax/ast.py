"""The recipe AST: immutable nodes, each with the span it came from.

Spans do not take part in equality, so two parses of the same program compare equal wherever its
layout differs; `recipec fmt` relies on that to prove it preserves meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from ..source import Source, Span


def _span() -> Span:
    return field(compare=False, repr=False)  # type: ignore[return-value]


@dataclass(frozen=True)
class Number:
    value: Fraction
    text: str  # as written (`100M`), so fmt keeps the user's notation
    span: Span = _span()


@dataclass(frozen=True)
class String:
    value: str
    span: Span = _span()


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span = _span()


@dataclass(frozen=True)
class Name:
    id: str
    span: Span = _span()


@dataclass(frozen=True)
class Keyword:
    name: str
    value: Expr
    span: Span = _span()  # the whole `name=value`
    name_span: Span = _span()


@dataclass(frozen=True)
class Call:
    func: Name
    args: tuple[Expr, ...]
    kwargs: tuple[Keyword, ...]
    span: Span = _span()


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * /
    left: Expr
    right: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Neg:
    operand: Expr
    span: Span = _span()


@dataclass(frozen=True)
class List:
    items: tuple[Expr, ...]
    span: Span = _span()


Expr = Number | String | Bool | Name | Call | BinOp | Neg | List


@dataclass(frozen=True)
class Assign:
    name: Name
    value: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Export:
    value: Expr
    path: String
    format: Name | None
    span: Span = _span()


@dataclass(frozen=True)
class Use:
    path: String
    span: Span = _span()


Statement = Assign | Export | Use


@dataclass(frozen=True)
class Comment:
    text: str  # including the leading '#'
    span: Span = _span()
    trailing: bool = False  # after code on the same line


@dataclass(frozen=True)
class Recipe:
    version: int
    statements: tuple[Statement, ...]
    comments: tuple[Comment, ...] = field(compare=False, default=())
    source: Source | None = field(compare=False, default=None, repr=False)
