"""Property tests for the front end: the compiler answers any input with diagnostics, never a traceback,
and `recipec fmt` is idempotent and keeps the AST.

* Random text, random bytes, token soups and mutated valid recipes go through `syntax.parse` and
  `ir.lower.lower_file`: only RecipeError may come out, every diagnostic has a registered code and a
  span inside its text, and renders as text and as JSON.
* Well-formed programs over the real ops (names bound before use) go through `lower_file` the same way.
* Valid recipes from a small grammar strategy (calls, kwargs, lists, arithmetic with parentheses,
  numbers with suffixes, strings with escapes and unicode, comments on their own lines, trailing and
  inside multi-line brackets, blank lines, CRLF) check `format_recipe`: parse(fmt(x)) == parse(x),
  fmt(fmt(x)) == fmt(x), every comment kept, and the output is text a file can hold (UTF-8).
* Crashers the fuzzer found, kept as concrete regression inputs (most are fixed; see the comments).

`benchmarks/fuzz_recipes.py` runs the same checks over many more inputs, through the CLI as well.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from recipec.codes import CODES
from recipec.diagnostics import RecipeError, render_all, to_json
from recipec.check import lower_file
from recipec.syntax import parse
from recipec.syntax.format import format_recipe

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = (ROOT / "examples" / "quickstart.rcp").read_text(encoding="utf-8")


def fast(max_examples: int) -> settings:
    """Small example counts and no deadline: the whole file runs in seconds, and timing noise never fails it."""
    return settings(max_examples=max_examples, deadline=None, phases=[p for p in Phase if p is not Phase.explain],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


SEEDS = [
    QUICKSTART,
    'recipec 1\n'
    'use "lib.rcp"   # brings `shared` into scope\n'
    '\n'
    '# two toy models\n'
    'base = init("llama", size="tiny", seed=1)\n'
    'chat = init("llama", size="tiny", seed=2)\n'
    'delta = chat - base\n'
    'model = combine(\n'
    '    base + 0.5*delta,   # half the chat vector\n'
    '    embeddings="overlap",\n'
    '    norms="keep",\n'
    ')\n'
    'corpus = text("data/*.txt", field="text")\n'
    'export model to "out/m"  # trailing\n'
    'export shared to "out/shared" as hf\n',
    'recipec 1  # ヘッダー\n'
    '# λ — “quotes” 🦙\n'
    'a = init("gpt2", size="tiny", seed=1_000)\n'
    'b = init("gpt2", size="tiny", seed=2, dtype="bfloat16")\n'
    'm = 0.25*a + .75*b\n'
    'n = (a + b)/2\n'
    'k = [1, 2.5, 1e9, 100M, 2B, 1.5T, 500K, 1e-5, -3, +4,]\n'
    's = ["caf\\u00e9", "tab\\there", "quote\\"q", "back\\\\slash", "λ中🦙"]\n'
    'export m to "out/\\u00e9"\n'
    'export n to "out/n"\n',
    'recipec 1\n'
    'x = load("models/none")\n'
    'h = hf("org/name", revision="main")\n'
    'z = combine(x - "org/name" + (x), dtype="float16")\n'
    'w = -(-x) + 2*(x - x/1) - 0*x\n'
    'deep = [[1, [2, [3]]], [], ["a", true, false]]\n'
    'export z to "out/z"\n'
    'export w to "out/w.onnx"\n',
]

KEYWORDS = {"recipec", "export", "to", "as", "use", "true", "false"}
TOKENS = sorted(KEYWORDS) + [
    "a", "b", "x", "_", "init", "combine", "load", "hf", "text", "chat", "merge", "method", "size", "seed", "dtype",
    "embeddings",
    "0", "1", "0.8", ".5", "1e9", "1E-5", "100M", "2B", "1.5T", "1_000", "1e400", "00",
    '"llama"', '"tiny"', '"out/m"', '"lib.rcp"', '""', '"\\u00e9"', '"\\q"', '"a\\"b"', '"λ🦙"',
    "(", ")", "[", "]", ",", "=", "+", "-", "*", "/", "#", '"', "\n", " ", "\t", "\r\n", ".", "recipec 1",
]
ODD = ["\x00", "\ufeff", "\u200b", "\u2028", "\u0085", "\u202e", "\xa0", "\x0b", "\x0c", "\x7f", "\ufffd", "\u0301",
       "é", "λ", "中", "🦙", "\u0661", "\uff11", "\r"]
TOKEN_RE = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|\d[\d_]*(?:\.\d*)?(?:[eE][+-]?\d+)?[KMGBT]?|\.\d+|[A-Za-z_]\w*'
                      r'|\r?\n|[ \t]+|.', re.S)


# --- the compiler, and what its answers must look like ---------------------------------------------------


@pytest.fixture(scope="module")
def workdir():
    """A scratch directory (on a tmpfs when there is one) with files recipes can `use` and glob."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="recipec-props-", dir=base))
    (root / "data").mkdir()
    (root / "data" / "a.txt").write_text("hello\n")
    (root / "lib.rcp").write_text('recipec 1\nshared = init("llama", size="tiny", seed=7)\n')
    (root / "bad.rcp").write_text("recipec 1\nx = (\n")
    # a config.json that is valid JSON but not a valid config: `architectures` must be a list
    (root / "arch_int.json").write_text('{"model_type": "llama", "architectures": 5}')
    yield root  # (conftest.py points the hub cache at an empty directory for every test)
    shutil.rmtree(root, ignore_errors=True)


def check_diagnostics(diagnostics) -> None:
    for d in diagnostics:
        assert d.code in CODES, d
        for span in [d.span] + [n.span for n in d.notes]:
            if span is not None:
                assert 0 <= span.start <= span.end <= len(span.source.text), (d.code, d.message, span.start, span.end)
    render_all(diagnostics)
    render_all(diagnostics, color=True)
    json.loads(to_json(diagnostics))


def _crash_report(exc: BaseException) -> str:
    """The exception and its innermost recipec frames, short: a RecursionError has ~1000 frames."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/recipec/" in f.filename] or \
        traceback.extract_tb(exc.__traceback__)
    where = "; ".join(f"{f.filename.rsplit('/src/', 1)[-1]}:{f.lineno} ({f.name})" for f in frames[-3:])
    return f"{type(exc).__name__}: {str(exc)[:200]}\n  at {where}"


def compile_only_recipe_errors(data: str | bytes, workdir: Path) -> None:
    """Parse and lower `data`: success or RecipeError with well-formed diagnostics, nothing else."""
    raw = data.encode("utf-8", errors="surrogatepass") if isinstance(data, str) else data
    text = raw.decode("utf-8", errors="replace")  # what parse_file reads from the file
    path = workdir / "prop.rcp"
    path.write_bytes(raw)
    for step in (lambda: parse(text), lambda: lower_file(path)):
        crash = None
        try:
            result = step()
        except RecipeError as err:
            assert err.diagnostics
            check_diagnostics(err.diagnostics)
        except Exception as exc:  # noqa: BLE001 - anything else is a compiler bug
            crash = _crash_report(exc)
        else:
            check_diagnostics(getattr(result, "diagnostics", []))
        if crash:
            raise AssertionError(f"not a RecipeError: {crash}")


# --- junk in: diagnostics out ------------------------------------------------------------------------------

junk_chars = st.one_of(
    st.sampled_from(list('abxyz_019 =+-*/()[],."#\n\t\\eEMKB')),
    st.sampled_from(ODD),
    st.characters(codec="utf-8"),
)
maybe_header = st.sampled_from(["", "recipec 1\n", "recipec 1\n"])


@fast(150)
@given(maybe_header, st.text(junk_chars, max_size=120))
def test_random_text_only_raises_recipe_errors(workdir, header, body):
    compile_only_recipe_errors(header + body, workdir)


@fast(80)
@given(st.sampled_from([b"", b"recipec 1\n"]), st.binary(max_size=120))
def test_random_bytes_only_raise_recipe_errors(workdir, header, body):
    compile_only_recipe_errors(header + body, workdir)


@fast(150)
@given(maybe_header, st.lists(st.sampled_from(TOKENS), max_size=40), st.sampled_from(["", " "]))
def test_token_soup_only_raises_recipe_errors(workdir, header, tokens, sep):
    compile_only_recipe_errors(header + sep.join(tokens), workdir)


@st.composite
def mutated_recipes(draw) -> str:
    seed = draw(st.sampled_from(SEEDS))
    by_tokens = draw(st.booleans())
    units = TOKEN_RE.findall(seed) if by_tokens else list(seed)
    pool = st.sampled_from(TOKENS) if by_tokens else st.one_of(st.sampled_from(list('()[],=+-*/#"\n .e_1a')),
                                                               st.sampled_from(ODD))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate", "swap"]))
        i = draw(st.integers(0, len(units)))
        if op == "insert" or not units:
            units.insert(i, draw(pool))
        elif op == "delete":
            del units[i:i + draw(st.integers(1, 4))]
        elif op == "replace":
            units[min(i, len(units) - 1)] = draw(pool)
        elif op == "duplicate":
            j = draw(st.integers(i, min(len(units), i + 20)))
            units[i:i] = units[i:j]
        else:
            j = draw(st.integers(0, len(units) - 1))
            k = min(i, len(units) - 1)
            units[j], units[k] = units[k], units[j]
    text = "".join(units)
    if draw(st.integers(0, 9)) == 0:
        text = text.replace("\n", "\r\n")
    return text


@fast(120)
@given(mutated_recipes())
def test_mutated_recipes_only_raise_recipe_errors(workdir, text):
    compile_only_recipe_errors(text, workdir)


# --- well-formed programs over the real ops: past the parser, into lowering ----------------------------------

PROGRAM_NUMBERS = ["0", "1", "2", "0.5", ".25", "1e9", "100M", "1.5T", "1_000", "1e-5", "1e400", "1e-400", "1/3",
                   "1e300", "1e-300", "(1e300*1e300 + 0.5)", "(1e300*1e300)", "(1e-300*1e-300)", "-1"]
PROGRAM_STRINGS = ['"arch_int.json"', '"llama"', '"gpt2"', '"bert"', '"tiny"', '"small"', '"huge"', '"float16"',
                   '"bfloat16"',
                   '"overlap"', '"keep"', '"add"', '"org/name"', '"data/*.txt"', '"lib.rcp"', '"out/m"', '""',
                   '"."', '"\\u00e9"', '"\\u0000"', '"\\ud800"', '"λ"']
OP_PARAMS = {
    "init": ["size", "seed", "dtype", "config"],
    "load": ["path"],
    "hf": ["revision"],
    "text": ["field"],
    "chat": [],
    "combine": ["embeddings", "norms", "special_tokens", "dtype"],
    "merge": ["base", "method", "weights", "density", "drop_rate", "t", "seed", "normalize", "dtype", "shard_size"],
    "nope": ["x"],
}


@st.composite
def program_exprs(draw, names: tuple[str, ...], depth: int = 0) -> str:
    kinds = ["atom", "atom", "call", "bin", "neg", "list"] if depth < 3 else ["atom"]
    kind = draw(st.sampled_from(kinds))
    if kind == "atom":
        return draw(st.sampled_from(list(names) + PROGRAM_NUMBERS + PROGRAM_STRINGS + ["true", "false"]))
    if kind == "bin":
        op = draw(st.sampled_from("+-*/"))
        return f"({draw(program_exprs(names, depth + 1))} {op} {draw(program_exprs(names, depth + 1))})"
    if kind == "neg":
        return f"-({draw(program_exprs(names, depth + 1))})"
    if kind == "list":
        return "[" + ", ".join(draw(st.lists(program_exprs(names, depth + 1), max_size=3))) + "]"
    op = draw(st.sampled_from(sorted(OP_PARAMS)))
    args = draw(st.lists(program_exprs(names, depth + 1), max_size=2))
    keys = draw(st.lists(st.sampled_from(OP_PARAMS[op] + ["bogus"]), max_size=3, unique=True))
    args += [f"{k}={draw(program_exprs(names, depth + 1))}" for k in keys]
    return f"{op}({', '.join(args)})"


@st.composite
def programs(draw) -> str:
    lines, names_, models = ["recipec 1"], [], []
    if draw(st.booleans()):
        lines.append('use "lib.rcp"')
        names_.append("shared")
        models.append("shared")
    number = st.sampled_from(PROGRAM_NUMBERS)
    for i in range(draw(st.integers(1, 4))):
        form = draw(st.sampled_from(["init", "init", "affine", "merge", "expr"]))
        if form == "init":  # a model, most of the time a good one
            arch = draw(st.sampled_from(['"llama"', '"llama"', '"gpt2"', '"bert"', '"nope"']))
            size = draw(st.sampled_from(['"tiny"', '"tiny"', '"small"', '"huge"', "1"]))
            value = f"init({arch}, size={size}, seed={draw(number)})"
            models.append(f"v{i}")
        elif form == "merge" and models:
            method = draw(st.sampled_from(['"linear"', '"task_arithmetic"', '"ties"', '"dare"', '"slerp"']))
            args = draw(st.lists(st.sampled_from(models), min_size=1, max_size=3))
            keys = draw(st.lists(st.sampled_from(OP_PARAMS["merge"][1:]), max_size=2, unique=True))
            args += [f"{k}={draw(program_exprs(tuple(names_)))}" for k in keys]
            value = f"merge({', '.join(args)}, method={method})"
        elif form == "affine" and len(models) >= 2:  # weights that sum to 1, whatever the number
            a, b = draw(st.sampled_from(models)), draw(st.sampled_from(models))
            c = draw(number)
            value = f"{c}*{a} + (1 - {c})*{b}"
            if draw(st.booleans()):
                value = f"combine({value}, {draw(st.sampled_from(OP_PARAMS['combine']))}={draw(program_exprs(()))})"
        else:
            value = draw(program_exprs(tuple(names_)))
        lines.append(f"v{i} = {value}")
        names_.append(f"v{i}")
    for _ in range(draw(st.integers(0, 2))):
        target = draw(st.sampled_from(PROGRAM_STRINGS))
        fmt = draw(st.sampled_from(["", "", " as hf", " as onnx"]))
        value = draw(st.sampled_from(names_) if names_ and draw(st.booleans()) else program_exprs(tuple(names_)))
        lines.append(f"export {value} to {target}{fmt}")
    return "\n".join(lines) + "\n"


@fast(100)
@given(programs())
def test_programs_only_raise_recipe_errors(workdir, text):
    compile_only_recipe_errors(text, workdir)


# --- valid recipes: the formatter -----------------------------------------------------------------------------

# Pools rather than fine-grained strategies where that keeps generation fast; near-keywords test the lexer.
NAME_POOL = ["a", "b", "x", "_", "_9", "A", "Z9", "base", "chat", "cp", "model", "init", "combine", "f", "g_h",
             "exporter", "user", "tox", "asx", "true_", "falsey", "recipec2", "e", "E", "K", "M", "e5", "x_1_"]
_WORD = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
names = st.one_of(
    st.sampled_from(NAME_POOL),
    st.tuples(st.sampled_from(_WORD), st.text(st.sampled_from(_WORD + "0123456789"), max_size=6))
    .map("".join).filter(lambda n: n not in KEYWORDS),
)
COMMENT_POOL = ["#", "# c", "#c", "# λ 🦙", "#\ttab", "# a # b", '# "quoted', "# (unclosed", "#)", "# \\",
                "# export x to", "#!", "# a\rb", "# trailing spaces   ", "#\u200b", "# recipec 2"]
comment_texts = st.one_of(
    st.sampled_from(COMMENT_POOL),
    st.text(st.characters(codec="utf-8", exclude_characters="\n"), max_size=10).map(lambda t: "#" + t),
)
NUMBER_POOL = ["0", "7", "42", "1_000", "1__", "00", "0_0", "0.8", "1.", "3.14159", ".5", ".0", "1_0.25", "1e9",
               "1E-5", "2e+3", "1.5e10", ".5e-3", "1_e5", "100M", "2B", "1.5T", "500K", "7G", "1e3K", "1.e2",
               "1e300", "1e-300", "99999999999999999999"]
numbers = st.sampled_from(NUMBER_POOL)
GAPS = ["", " ", " ", "  ", "\t"]
MULTILINE_GAPS = GAPS * 3 + ["\n", "\n  ", "\n\t", "\n\n    ", " # c\n  ", "  # λ (\n", "#\n", "# a # b\n    ",
                             " #)\n"]


# Strategies are built once (module constants, memoized factories): hypothesis validates every new strategy
# object, and building them inside the draws made generation several times slower than the checks.
_HOW = st.sampled_from(["raw", "raw", "raw", "escape"])
_STRING_CHARS = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=6)
_SURROGATE = st.integers(0xD800, 0xDFFF)


@functools.lru_cache(maxsize=None)
def strings(lone_surrogates: bool = False) -> st.SearchStrategy[str]:
    @st.composite
    def build(draw) -> str:
        out = []
        for ch in draw(_STRING_CHARS):
            how = draw(_HOW)
            if ch in '"\\':
                out.append("\\" + ch)
            elif ch in "\b\f\n\r\t" and how == "raw":
                out.append(json.dumps(ch)[1:-1])
            elif ord(ch) < 0x20 or how == "escape":
                if ord(ch) > 0xFFFF:  # a surrogate pair
                    hi, lo = divmod(ord(ch) - 0x10000, 0x400)
                    out.append(f"\\u{0xD800 + hi:04x}\\u{0xDC00 + lo:04X}")
                else:
                    out.append(f"\\u{ord(ch):04x}" if ord(ch) % 2 else f"\\u{ord(ch):04X}")
            elif ch == "/":
                out.append("\\/")
            else:
                out.append(ch)
        if lone_surrogates and draw(st.booleans()):
            out.insert(draw(st.integers(0, len(out))), f"\\u{draw(_SURROGATE):04x}")
        return '"' + "".join(out) + '"'

    return build()


_GAP = {False: st.sampled_from(GAPS), True: st.sampled_from(MULTILINE_GAPS)}
_KINDS = st.sampled_from(["atom", "atom", "atom", "bin", "unary", "paren", "call", "list"])
_SIGN = st.sampled_from(["-", "-", "+", "- "])
_OP = st.sampled_from("+-*/")
_EQ = st.sampled_from(["=", " = "])
_COMMA = st.sampled_from([",", ", ", " , "])
_N_ITEMS, _N_KWARGS = st.integers(0, 3), st.integers(0, 2)
_BOOL_WORDS = st.sampled_from(["true", "false"])


@functools.lru_cache(maxsize=None)
def _atoms(lone_surrogates: bool) -> st.SearchStrategy[str]:
    return st.one_of(numbers, strings(lone_surrogates), names, _BOOL_WORDS)


@functools.lru_cache(maxsize=None)
def exprs(depth: int = 0, multiline: bool = False, lone_surrogates: bool = False) -> st.SearchStrategy:
    """(text, precedence) of an expression: precedence 4 atom, 3 unary, 2 product, 1 sum."""
    if depth >= 3:
        return _atoms(lone_surrogates).map(lambda a: (a, 4))

    @st.composite
    def build(draw) -> tuple[str, int]:
        kind = draw(_KINDS)
        same, inner = exprs(depth + 1, multiline, lone_surrogates), exprs(depth + 1, True, lone_surrogates)
        gap, gap_in = _GAP[multiline], _GAP[True]
        if kind == "atom":
            return draw(_atoms(lone_surrogates)), 4
        if kind == "unary":
            operand, prec = draw(same)
            return draw(_SIGN) + (f"({operand})" if prec < 3 else operand), 3
        if kind == "bin":
            op = draw(_OP)
            p = 1 if op in "+-" else 2
            (left, lp), (right, rp) = draw(same), draw(same)
            left = f"({left})" if lp < p else left
            right = f"({right})" if rp <= p else right  # left-associative
            return left + draw(gap) + op + draw(gap) + right, p
        if kind == "paren":
            return "(" + draw(gap_in) + draw(inner)[0] + draw(gap_in) + ")", 4
        items = [draw(inner)[0] for _ in range(draw(_N_ITEMS))]
        if kind == "call":
            for _ in range(draw(_N_KWARGS)):
                pos = draw(st.integers(0, len(items)))  # keywords may come before positionals: the AST sorts them
                items.insert(pos, draw(names) + draw(_EQ) + draw(inner)[0])
        sep = [draw(_COMMA) + draw(gap_in) for _ in items]
        body = "".join(item + s for item, s in zip(items, sep))
        if items and draw(st.booleans()):  # no trailing comma
            body = body[: len(body) - len(sep[-1])]
        opener, closer = ("(", ")") if kind == "call" else ("[", "]")
        head = draw(names) if kind == "call" else ""
        return head + opener + draw(gap_in) + body + draw(gap_in) + closer, 4

    return build()


_LINE_COMMENT = st.tuples(st.sampled_from(["", " ", "  ", "\t"]), comment_texts).map("".join)
_BEFORE_HEADER = st.one_of(st.sampled_from(["", "  "]), comment_texts)
_HEADER = st.tuples(st.sampled_from(["", " "]), st.just("recipec"), st.sampled_from([" ", "  ", "\t"]), st.just("1"))
_BETWEEN = st.one_of(st.sampled_from(["", " ", "\t"]),
                     st.tuples(st.sampled_from(["", "  "]), comment_texts).map("".join))
_STMT_KIND = st.sampled_from(["assign", "assign", "assign", "export", "use"])
_INDENT = st.sampled_from(["", "", " ", "\t"])
_ASSIGN_EQ = st.sampled_from([" = ", "=", "  =  "])
_AFTER = st.sampled_from(["", "# end", "  # end"])
_NEWLINE = st.sampled_from(["\n", "\n", "\n", "\r\n"])
_SOME = st.integers(0, 2)
_QUARTER = st.integers(0, 3)
_N_STATEMENTS = st.integers(0, 6)


@functools.lru_cache(maxsize=None)
def valid_recipes(lone_surrogates: bool = False) -> st.SearchStrategy[str]:
    """Whole recipes the grammar accepts, laid out every way it allows."""
    expr = exprs(0, False, lone_surrogates).map(lambda e: e[0])
    string = strings(lone_surrogates)

    @st.composite
    def build(draw) -> str:
        lines = [draw(_BEFORE_HEADER) for _ in range(draw(_SOME))]
        lines.append("".join(draw(_HEADER)) + (draw(_LINE_COMMENT) if draw(_QUARTER) == 0 else ""))
        for _ in range(draw(_N_STATEMENTS)):
            lines += [draw(_BETWEEN) for _ in range(draw(_SOME))]  # blank lines and comment lines
            kind = draw(_STMT_KIND)
            if kind == "assign":
                stmt = draw(names) + draw(_ASSIGN_EQ) + draw(expr)
            elif kind == "export":
                stmt = f"export {draw(expr)} to {draw(string)}"
                if draw(st.booleans()):
                    stmt += f" as {draw(names)}"
            else:
                stmt = f"use {draw(string)}"
            if draw(_QUARTER) == 0:
                stmt += draw(_LINE_COMMENT)
            lines.append(draw(_INDENT) + stmt)
        lines += [draw(_AFTER) for _ in range(draw(_SOME))]
        newline = draw(_NEWLINE)
        return newline.join(lines) + (newline if draw(_QUARTER) else "")

    return build()


def comment_texts_of(recipe) -> list[str]:
    return sorted(c.text for c in recipe.comments)


@fast(150)
@given(valid_recipes())
def test_format_is_idempotent_and_keeps_the_ast(text):
    recipe = parse(text)  # the strategy only makes valid recipes: a RecipeError here is a bug in one of us
    once = format_recipe(recipe)
    reparsed = parse(once)
    assert reparsed == recipe, once
    assert format_recipe(reparsed) == once


@fast(80)
@given(valid_recipes())
def test_format_keeps_every_comment(text):
    recipe = parse(text)
    once = format_recipe(recipe)
    assert comment_texts_of(parse(once)) == comment_texts_of(recipe), once


@fast(50)
@given(valid_recipes(lone_surrogates=True))
def test_format_output_is_utf8_text(text):
    # `recipec fmt` writes its output to a UTF-8 file: a `"\ud800"` escape must not become a raw surrogate.
    try:
        recipe = parse(text)
    except RecipeError:
        return  # refusing a lone surrogate is fine too
    format_recipe(recipe).encode("utf-8")


# --- crashers found by fuzzing, kept as regression inputs ------------------------------------------------

TWO_MODELS = 'a = init("llama", size="tiny", seed=1)\nb = init("llama", size="tiny", seed=2)\n'
HUGE = "(1e300*1e300 + 0.5)"  # a non-integer too big for a float, made by arithmetic from literals in range
CRASHERS = {
    # a number too big for a float, as a literal or computed, passed as a parameter (lower.py `_python`)
    "float-overflow-param-literal": 'recipec 1\nx = init("llama", size="tiny", seed=1e400+0.5)\n',
    "float-overflow-param": f'recipec 1\nx = init("llama", size="tiny", seed={HUGE})\n',
    "float-overflow-list-param":
        f'recipec 1\n{TWO_MODELS}export merge(a, b, method="linear", weights=[{HUGE}, 1]) to "o"\n',
    # ...or shown in a message (lower.py `_fmt`, via `_describe`)
    "float-overflow-message-literal": 'recipec 1\nx = combine(0.5 + 1e400)\n',
    "float-overflow-message": f'recipec 1\nexport {HUGE} to "out"\n',
    # ...or as a coefficient of a combination whose weights do sum to 1 (lower.py `combine`)
    "float-overflow-coefficient-literal": f'recipec 1\n{TWO_MODELS}export 1e400*a + (1 - 1e400)*b to "out"\n',
    "float-overflow-coefficient": f'recipec 1\n{TWO_MODELS}export {HUGE}*a + (1 - {HUGE})*b to "out"\n',
    "float-underflow-coefficient": f'recipec 1\n{TWO_MODELS}export 1e-300*1e-300*a + (1 - 1e-300*1e-300)*b to "o"\n',
    # a huge exponent: Fraction builds 10**9999999 (tens of seconds) before anything can refuse it
    "huge-exponent": "recipec 1\nx = 1e9999999\n",
    # export paths are resolved without checking they are paths (lower.py `_export`)
    "nul-in-export-path": f'recipec 1\n{TWO_MODELS}export a to "\\u0000"\n',
    "surrogate-in-export-path": f'recipec 1\n{TWO_MODELS}export a to "\\ud800"\n',
    # hub revisions become file names unchecked (store/hub.py `cached_snapshot`)
    "nul-in-hf-revision": 'recipec 1\nx = hf("org/name", revision="\\u0000")\n',
    "surrogate-in-hf-revision": 'recipec 1\nx = hf("org/name", revision="\\ud800")\n',
    # a config whose `architectures` is not a list (arch.py `_settings`: list(5))
    "config-architectures-not-a-list": 'recipec 1\nx = init("llama", config="arch_int.json")\n',
    # nesting a few hundred deep overflows the Python stack in the AST builder (parser.py `_parse_statement`)
    "300-deep-list": "recipec 1\nx = " + "[" * 300 + "1" + "]" * 300 + "\n",
    "500-term-sum": "recipec 1\nx = " + " + ".join(["1"] * 500) + "\n",
    "500-deep-parens": "recipec 1\nx = " + "(" * 500 + "1" + ")" * 500 + "\n",
    "300-deep-calls": "recipec 1\nx = " + "init(" * 300 + ")" * 300 + "\n",
    "2000-deep-negation": "recipec 1\nx = " + "-" * 2000 + "1\n",
    # the RecursionError raised inside a transformer callback arrives wrapped in lark's VisitError
    "300-deep-right-nested-sub": "recipec 1\nx = " + "1 - (" * 300 + "1" + ")" * 300 + "\n",
    # parses, but lowering an export recurses deeper than the parser did (lower.py `_export` -> `_binop`)
    "export-400-term-sum": "recipec 1\nexport " + " + ".join(["1"] * 400) + ' to "out"\n',
}


@pytest.mark.parametrize("text", list(CRASHERS.values()), ids=list(CRASHERS))
def test_known_crashers_only_raise_recipe_errors(workdir, text):
    compile_only_recipe_errors(text, workdir)


def test_format_keeps_escaped_lone_surrogates_writable():
    try:
        recipe = parse('recipec 1\nx = "\\ud800"\n')
    except RecipeError:
        return  # refusing a lone surrogate is fine too
    format_recipe(recipe).encode("utf-8")


@pytest.mark.parametrize("text", [
    'recipec 1\nm = combine(\n    base,  # a\n    norms="keep",  # b\n)\n',
    'recipec 1\nx = (  # one\n  1\n)  # two\n',
], ids=["two-comments-inside-a-call", "comment-inside-and-after"])
def test_format_keeps_comments_inside_multiline_statements(text):
    assert comment_texts_of(parse(format_recipe(parse(text)))) == comment_texts_of(parse(text))


def test_format_of_a_deep_negation_still_parses():
    # `--x` is printed `-(-x)`: each level gains a bracket, so a recipe near the nesting limit that `check`
    # accepts can come out of `fmt` as one that `check` refuses.
    text = "recipec 1\nx = " + "-" * 300 + "1\n"
    try:
        recipe = parse(text)
    except RecipeError:
        return  # refusing it outright is consistent too
    assert parse(format_recipe(recipe)) == recipe
