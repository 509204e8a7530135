"""Parse recipe text into an AST (`syntax.ast`), collecting every syntax error as a diagnostic.

The grammar lives in `grammar/recipec.lark` (shipped inside the wheel). The scanner cuts the text into
statements; each is parsed with lark's LALR parser on its own, and one Transformer attaches spans to
every node, so no grammar rule does position bookkeeping. Lark's exceptions never escape: they become
E001/E002/E003 diagnostics with the offending token underlined.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from fractions import Fraction
from functools import lru_cache
from importlib import resources
from pathlib import Path

import lark

from .. import LANGUAGE_VERSION
from ..diagnostics import Diagnostics
from ..source import Source, Span
from . import ast
from .scanner import scan

_SUFFIX = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9, "T": 10**12}
_TOKEN_WORDS = {"NAME": "a name", "NUMBER": "a number", "STRING": "a string", "VERSION": "a version number",
                "$END": "the end of the line"}
RESERVED = frozenset({"recipec", "export", "to", "as", "use", "true", "false"})
_NUMBER_HINT = "numbers look like 0.8, 1e-5, 1_000 or 100M (suffixes K, M, G or B, T)"
_STATEMENT_FORMS = 'a statement is `name = expr`, `export expr to "path"` or `use "other.rcp"`'


def grammar_text() -> str:
    """The grammar, from the installed package or, in a source checkout, from `grammar/`."""
    packaged = resources.files("recipec").joinpath("grammar/recipec.lark")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parents[3] / "grammar" / "recipec.lark"
    return checkout.read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = grammar_text()
    options = dict(parser="lalr", start=["header", "stmt"], propagate_positions=True, keep_all_tokens=True,
                   maybe_placeholders=True)
    # Building the LALR tables costs ~40 ms a process; lark can keep them in a file it validates against
    # the grammar and its own version. The file lives in the user's own cache directory (never a shared
    # temp directory: it is a pickle), named by the grammar's hash.
    cache = _table_cache_path(grammar)
    if cache is not None:
        try:
            return lark.Lark(grammar, cache=str(cache), **options)
        except (OSError, EOFError, ValueError):
            pass
    return lark.Lark(grammar, **options)


def _table_cache_path(grammar: str) -> Path | None:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = Path(base) / "recipec"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    digest = hashlib.sha256(f"{lark.__version__}\n{grammar}".encode()).hexdigest()[:16]
    return directory / f"grammar-{digest}.lark-tables"


def parse_file(path: Path, display: str | None = None) -> ast.Recipe:
    """Parse a recipe file; raises RecipeError with every syntax error found, or E108 if it is not UTF-8."""
    data = path.read_bytes()
    display = display or str(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        _report_not_utf8(path, data, err, display)
    text = text.removeprefix("\ufeff")  # editors' byte-order mark
    return parse(text, Source(path, text, display))


_UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")


def _report_not_utf8(path: Path, data: bytes, err: UnicodeDecodeError, display: str) -> None:
    diags = Diagnostics()
    hint = "save it as UTF-8, e.g. with `iconv -f latin1 -t utf-8`"
    if data.startswith(_UTF16_MARKS):  # no line of it would print legibly: name the file only
        diags.error("E108", "this file is UTF-16; recipes are UTF-8 text", None,
                    "save it as UTF-8, e.g. with `iconv -f utf-16 -t utf-8`", path=display)
    else:
        text = data.decode("utf-8", errors="replace")
        at = len(data[:err.start].decode("utf-8"))  # the bad byte as a character offset
        diags.error("E108", f"byte 0x{data[err.start]:02x} is not UTF-8; recipes are UTF-8 text",
                    Span(Source(path, text, display), at, at + 1), hint)
    diags.raise_if_errors()


def parse(text: str, source: Source | None = None) -> ast.Recipe:
    """Parse recipe text; raises RecipeError with every syntax error found."""
    source = source or Source(Path("<recipe>"), text)
    diags = Diagnostics()
    scanned = scan(text)
    for err in scanned.errors:
        span = Span(source, err.start, err.end)
        if err.kind == "string":
            diags.error("E002", "unclosed string", span, 'close the string with `"` on the same line')
        elif err.kind == "stray":
            diags.error("E002", f"`{err.opener}` closes no open bracket", span, "remove it, or open what it closes")
        elif err.kind == "mismatch":
            closer = ")" if err.opener == "(" else "]"
            line, column = text.count("\n", 0, err.opened) + 1, err.opened - text.rfind("\n", 0, err.opened)
            diags.error("E002", f"`{text[err.start]}` closes an outer bracket while the `{err.opener}` opened at "
                        f"{line}:{column} is still open", span, f"close that `{err.opener}` with `{closer}` first")
        else:
            closer = ")" if err.opener == "(" else "]"
            diags.error("E002", f"unclosed `{err.opener}`", span, f"close it with `{closer}` where the expression ends")

    version, statements = None, []
    chunks = list(scanned.chunks)
    first_code = chunks[0] if chunks else None
    if first_code and not first_code.broken and re.match(r"recipec[ \t]", text[first_code.start:]):
        version = _parse_header(scanned.masked, first_code, source, diags)
        chunks = chunks[1:]
    else:
        at = first_code.start if first_code else 0
        diags.error("E003", "missing header: a recipe starts with `recipec 1`",
                    Span(source, at, at + (1 if first_code else 0)),
                    f"add `recipec {LANGUAGE_VERSION}` as the first line")
    for chunk in chunks:
        if chunk.broken:
            continue
        stmt = _parse_statement(scanned.masked, chunk, source, diags)
        if stmt is not None:
            statements.append(stmt)
    diags.raise_if_errors()
    comments = tuple(_comment(text, start, end, source) for start, end in scanned.comments)
    return ast.Recipe(version or LANGUAGE_VERSION, tuple(statements), comments, source)


def _comment(text: str, start: int, end: int, source: Source) -> ast.Comment:
    line_start = text.rfind("\n", 0, start) + 1
    trailing = bool(text[line_start:start].strip())
    return ast.Comment(text[start:end].rstrip(), Span(source, start, end), trailing)


def _parse_header(masked: str, chunk, source: Source, diags: Diagnostics) -> int | None:
    tree = _parse_chunk(masked, chunk, "header", source, diags)
    if tree is None:
        return None
    token = tree.children[1]
    version = int(token)
    if version != LANGUAGE_VERSION:
        diags.error("E003", f"unsupported language version {version}",
                    Span(source, chunk.start + token.start_pos, chunk.start + token.end_pos),
                    f"this recipec speaks `recipec {LANGUAGE_VERSION}`; upgrade recipec or port the recipe")
    return version


def _parse_statement(masked: str, chunk, source: Source, diags: Diagnostics) -> ast.Statement | None:
    tree = _parse_chunk(masked, chunk, "stmt", source, diags)
    if tree is None:
        return None
    if _depth(tree) > MAX_NESTING:
        diags.error("E001", f"expression nested too deeply (more than {MAX_NESTING} levels)",
                    Span(source, chunk.start, chunk.end), "split it into named parts: `part = ...`")
        return None
    builder = _AstBuilder(source, chunk.start)
    try:
        return builder.transform(tree)
    except lark.exceptions.VisitError as err:
        if isinstance(err.orig_exc, _BadLiteral):
            bad = err.orig_exc
            diags.error("E001", bad.message, Span(source, chunk.start + bad.start, chunk.start + bad.end), bad.hint)
            return None
        raise


# A fixed limit, checked before anything recursive runs, so whether a recipe is accepted never depends on
# Python's stack: deeper than any real recipe, far below what the recursive passes could take.
MAX_NESTING = 200


def _depth(tree: lark.Tree) -> int:
    """The depth of a parse tree, measured without recursion."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, lark.Tree))
    return deepest


def _parse_chunk(masked: str, chunk, start: str, source: Source, diags: Diagnostics):
    text = masked[chunk.start : chunk.end]
    try:
        return _parser().parse(text, start=start)
    except lark.exceptions.UnexpectedCharacters as err:
        at = chunk.start + err.pos_in_stream
        diags.error("E001", f"unexpected character `{masked[at]}`", Span(source, at, at + 1), _STATEMENT_FORMS)
    except lark.exceptions.UnexpectedToken as err:
        _unexpected_token(err, text, chunk, source, diags)
    return None


def _unexpected_token(err: lark.exceptions.UnexpectedToken, text: str, chunk, source: Source,
                      diags: Diagnostics) -> None:
    expected = _describe_expected(err.expected)
    token = err.token
    if token.type == "$END":
        end = chunk.start + len(text.rstrip())
        last = text.rstrip().split()[-1] if text.strip() else ""
        diags.error("E001", f"statement ends unexpectedly after `{last}`; expected {expected}",
                    Span(source, end - 1, end),
                    "finish the expression; to continue on the next line, wrap it in parentheses")
        return
    at = chunk.start + token.start_pos
    if token.type == "VERSION":  # digits that NUMBER refused: a malformed number such as `2Bx`
        end = at + len(token.value)
        while end < chunk.end and (text[end - chunk.start].isalnum() or text[end - chunk.start] in "._"):
            end += 1
        diags.error("E001", f"malformed number `{text[token.start_pos:end - chunk.start]}`",
                    Span(source, at, end), _NUMBER_HINT)
        return
    hint = _STATEMENT_FORMS if token.start_pos == 0 or token.type in ("EQUAL",) else None
    if token.type == "EQUAL" and "EQUAL" not in err.expected:
        hint = "a name is bound once per statement; keyword arguments go inside a call: `f(x, key=value)`"
    diags.error("E001", f"unexpected `{token.value}`; expected {expected}", Span(source, at, at + len(token.value)),
                hint)


def _describe_expected(names) -> str:
    words = []
    terminals = {t.name: t for t in _parser().terminals}
    for name in sorted(names):
        if name in _TOKEN_WORDS:
            words.append(_TOKEN_WORDS[name])
        elif name in terminals and terminals[name].pattern.type == "str":
            words.append(f"`{terminals[name].pattern.value}`")
    words = sorted(set(words), key=lambda w: (not w.startswith("a "), w))
    if not words:
        return "something else"
    return ", ".join(words[:-1]) + (" or " if len(words) > 1 else "") + words[-1]


class _BadLiteral(Exception):
    def __init__(self, message: str, start: int, end: int, hint: str | None = None):
        super().__init__(message)
        self.message, self.start, self.end, self.hint = message, start, end, hint


# Numbers must stay representable as floats, the form ops and backends receive them in.
MAX_MAGNITUDE = Fraction(10) ** 300


def _number(text: str) -> Fraction:
    digits = text.replace("_", "")
    scale = 1
    if digits[-1] in _SUFFIX:
        scale = _SUFFIX[digits[-1]]
        digits = digits[:-1]
    mantissa, _, exponent = digits.lower().partition("e")
    if exponent and abs(int(exponent)) > 400:  # decide before Fraction builds a 10**huge integer
        raise _OutOfRange
    value = Fraction(digits) * scale
    if abs(value) > MAX_MAGNITUDE or (value and abs(value) < 1 / MAX_MAGNITUDE):
        raise _OutOfRange
    return value


class _OutOfRange(ValueError):
    pass


class _AstBuilder(lark.Transformer):
    """Turns lark trees into AST nodes with spans; the only place that knows lark's tree shapes."""

    def __init__(self, source: Source, offset: int):
        super().__init__()
        self._source, self._offset = source, offset

    def _span(self, meta_or_token) -> Span:
        start = meta_or_token.start_pos
        end = meta_or_token.end_pos
        return Span(self._source, self._offset + start, self._offset + end)

    @staticmethod
    def _nodes(children) -> list:
        return [c for c in children if not isinstance(c, lark.Token) or c.type in ("NAME", "STRING", "NUMBER")]

    # statements
    @lark.v_args(meta=True)
    def assign(self, meta, children):
        name_tok, value = children[0], children[2]
        if str(name_tok) in RESERVED:
            raise _BadLiteral(f"`{name_tok}` is a reserved word and cannot be bound", name_tok.start_pos,
                              name_tok.end_pos, "choose another name")
        return ast.Assign(ast.Name(str(name_tok), self._span(name_tok)), value, self._span(meta))

    @lark.v_args(meta=True)
    def export(self, meta, children):
        value, path = children[1], self.string_token(children[3])
        fmt = None
        if len(children) > 4 and children[5] is not None:
            fmt = ast.Name(str(children[5]), self._span(children[5]))
        return ast.Export(value, path, fmt, self._span(meta))

    @lark.v_args(meta=True)
    def use(self, meta, children):
        return ast.Use(self.string_token(children[1]), self._span(meta))

    # expressions
    @lark.v_args(meta=True)
    def number(self, meta, children):
        tok = children[0]
        try:
            value = _number(str(tok))
        except _OutOfRange:
            raise _BadLiteral(f"number `{tok}` is out of range", tok.start_pos, tok.end_pos,
                              "keep numbers between 1e-300 and 1e300 in magnitude") from None
        except (ValueError, ZeroDivisionError):
            raise _BadLiteral(f"malformed number `{tok}`", tok.start_pos, tok.end_pos, _NUMBER_HINT) from None
        return ast.Number(value, str(tok), self._span(tok))

    def string_token(self, tok) -> ast.String:
        try:
            value = json.loads(str(tok))
        except json.JSONDecodeError:
            raise _BadLiteral("invalid escape in string", tok.start_pos, tok.end_pos,
                              'strings take JSON escapes (\\" \\\\ \\n \\t \\uXXXX); write paths with `/`') from None
        if "\x00" in value:  # never meaningful, and no path may contain it
            raise _BadLiteral("a string cannot contain a NUL character", tok.start_pos, tok.end_pos)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _BadLiteral("a string cannot contain a lone surrogate (\\ud800-\\udfff)", tok.start_pos,
                              tok.end_pos, "write the character itself, or a surrogate pair") from None
        return ast.String(value, self._span(tok))

    def string(self, children):
        return self.string_token(children[0])

    @lark.v_args(meta=True)
    def true(self, meta, children):
        return ast.Bool(True, self._span(meta))

    @lark.v_args(meta=True)
    def false(self, meta, children):
        return ast.Bool(False, self._span(meta))

    def name(self, children):
        return ast.Name(str(children[0]), self._span(children[0]))

    @lark.v_args(meta=True)
    def call(self, meta, children):
        func = ast.Name(str(children[0]), self._span(children[0]))
        args_tree = children[2]
        args, kwargs = [], []
        for arg in (args_tree or []):
            (kwargs if isinstance(arg, ast.Keyword) else args).append(arg)
        return ast.Call(func, tuple(args), tuple(kwargs), self._span(meta))

    def args(self, children):
        return [c for c in children if not isinstance(c, lark.Token)]

    items = args

    @lark.v_args(meta=True)
    def kwarg(self, meta, children):
        name = children[0]
        return ast.Keyword(str(name), children[2], self._span(meta), self._span(name))

    @lark.v_args(meta=True)
    def paren(self, meta, children):
        return children[1]

    @lark.v_args(meta=True)
    def list(self, meta, children):
        return ast.List(tuple(children[1] or ()), self._span(meta))

    def _binop(op):  # noqa: N805 - a rule factory used in the class body
        @lark.v_args(meta=True)
        def rule(self, meta, children):
            return ast.BinOp(op, children[0], children[2], self._span(meta))
        return rule

    add, sub, mul, div = _binop("+"), _binop("-"), _binop("*"), _binop("/")

    @lark.v_args(meta=True)
    def neg(self, meta, children):
        return ast.Neg(children[1], self._span(meta))

    def pos(self, children):
        return children[1]
