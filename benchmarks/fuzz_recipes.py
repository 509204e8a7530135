#!/usr/bin/env python
"""Fuzz the recipec front end: every input must end in diagnostics or success, never in a traceback.

    python benchmarks/fuzz_recipes.py [--n 10000] [--seed 0] [--jobs N] [--show 3] [--minimize 10]

Each input (random text and bytes, mutated valid recipes, token soups built from the grammar's
terminals, well-formed programs over the real ops, deep nesting, very long lines, odd unicode, NUL
bytes, CRLF, a BOM) is written to a recipe file in a scratch workspace (which also holds a few
fixture files: a `use`able library, data files, good and broken model directories) and then

  1. run through `recipec.cli.main(["check", path])` in-process (every 4th as `check --json`), with
     stdout/stderr captured through real UTF-8 streams (stdout strict, stderr backslashreplace, as a
     Python process gets them). An "internal error" line, or any exception escaping `main`, is a bug;
     the input is then rerun with RECIPEC_DEBUG=1 to learn where it failed;
  2. run through `recipec.check.lower_file(path)` directly: any exception other than RecipeError
     is a bug; every diagnostic of a RecipeError (or every warning of a success) must have a code in
     `recipec.codes.CODES`, a span inside the text, and must render (`render_all`, `to_json`);
  3. parsed with `recipec.syntax.parse`; when it parses, `format_recipe` must be idempotent, keep the
     AST and every comment, and give text that parses again and encodes as UTF-8.

Inputs depend only on --seed and --n; they run on --jobs worker processes (default: every CPU), each
with a 10 s limit (a slower input is reported as a timeout). Bugs are bucketed by exception type and
innermost recipec frame (a RecursionError by where the recursion was entered); each bucket shows its
shortest inputs, shrunk further by a small delta-debugging pass (`--minimize N` buckets, 0 to skip).
Exits 1 if any bug was found.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import functools
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

# Keep the hub cache lookups away from the real cache: results must not depend on the machine.
# A tmpfs when there is one: each input is written to disk twice per run, and disk writes dominate otherwise.
_SCRATCH = Path(tempfile.mkdtemp(prefix="recipec-fuzz-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
_OWNER = os.getpid()  # pool workers are forked: only the process that made the directory removes it
atexit.register(lambda: os.getpid() == _OWNER and shutil.rmtree(_SCRATCH, ignore_errors=True))
os.environ["HF_HUB_CACHE"] = str(_SCRATCH / "hub-cache")
os.environ.pop("RECIPEC_DEBUG", None)
os.environ["NO_COLOR"] = "1"

from recipec import cli  # noqa: E402
from recipec.codes import CODES  # noqa: E402
from recipec.diagnostics import RecipeError, render_all, to_json  # noqa: E402
from recipec.check import lower_file  # noqa: E402
from recipec.syntax import parse  # noqa: E402
from recipec.syntax.format import format_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# cli.main builds its argparse parser on every call, ~20% of the time per input here (argparse looks up
# gettext catalogues on disk). A parser is reusable, so build it once: main itself runs unchanged.
cli.build_parser = functools.lru_cache(maxsize=1)(cli.build_parser)
PER_INPUT_TIMEOUT_S = 10
SLOW_S = 1.0

# --- seeds and token pools -----------------------------------------------------------------------------

HAND_WRITTEN = [
    # calls, kwargs, lists, `use`, comments, a multi-line parenthesized expression
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
    'sft = chat("data/*.jsonl")\n'
    'export model to "out/m"  # trailing\n'
    'export shared to "out/shared" as hf\n',
    # unicode in strings and comments, escapes, numbers of every shape
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
    # local models, hub ids, references by string, nested lists and arithmetic
    'recipec 1\n'
    'x = load("models/tiny")\n'
    'y = "models/tiny"\n'
    'h = hf("org/name", revision="main")\n'
    'z = combine(x - y + (x), dtype="float16")\n'
    'w = -(-x) + 2*(x - x/1) - 0*x\n'
    'deep = [[1, [2, [3]]], [], ["a", true, false]]\n'
    'export z to "out/z"\n'
    'export w to "out/w.onnx"\n',
    # merges, and comments inside a multi-line call
    'recipec 1\n'
    'base = init("llama", size="tiny", seed=1)\n'
    'math = init("llama", size="tiny", seed=2)\n'
    'code = init("llama", size="tiny", seed=3)\n'
    'm = merge(\n'
    '    math, code,      # the fine-tunes\n'
    '    base=base,       # their base\n'
    '    method="ties",\n'
    '    weights=[0.5, 0.5], density=0.3, normalize=true,\n'
    ')  # trailing\n'
    'export m to "out/m"\n'
    'export combine(0.5*math + 0.5*code, dtype="bfloat16") to "out/avg"\n',
    # errors on purpose: the compiler must still just report them
    'recipec 1\n'
    'a = init("llama", size="huge")\n'
    'b = init("bert", config="models/badcfg/config.json")\n'
    'c = a + b\n'
    'c = a * b\n'
    'd = f(1, x=2)\n'
    'e = init("llama", "tiny", 3, 4)\n'
    'export a - a to "o"\n'
    'export 2*a to "o"\n'
    'export "../nope" to "o" as onnx\n',
]

LIB = 'recipec 1\nshared = init("llama", size="tiny", seed=7)\nother = shared\n'

KEYWORDS = ["recipec", "export", "to", "as", "use", "true", "false"]
NAMES = ["a", "b", "base", "chat", "cp", "model", "x", "_", "shared", "delta", "init", "combine", "load", "merge",
         "method", "weights", "density", "drop_rate", "t", "normalize",
         "hf", "text", "size", "seed", "dtype", "embeddings", "norms", "field", "revision", "config", "arch"]
NUMBERS = ["0", "1", "2", "0.8", ".5", "1.", "1e9", "1E-5", "1e+3", "100M", "2B", "1.5T", "500K", "7G",
           "1_000", "1__", "0.0", "1e400", "1e-400", "3.14159", "99999999999999999999", "1e308", "00", "0_0",
           "(1e400 + 0.5)", "1e300", "1e-300", "(1e300*1e300 + 0.5)", "(1e-300*1e-300)"]
STRINGS = ['"llama"', '"gpt2"', '"bert"', '"tiny"', '"small"', '"1b"', '"out/m"', '"lib.rcp"', '"bad.rcp"',
           '"cyc_a.rcp"', '"models/tiny"', '"models/badcfg"', '"models/arch_int"', '"models/trunc"',
           '"models/badindex"', '"models/nocfg"', '"data/*.txt"', '"data/*.jsonl"', '"org/name"', '"overlap"',
           '"keep"', '"float16"', '""', '"\\u00e9"', '"\\ud800"', '"\\u0000"', '"a\\"b"', '"\\\\"', '"\\q"',
           '"λ🦙"', '"fuzz.rcp"', '"."', '"/"', '"x.onnx"']
PUNCT = ["(", ")", "[", "]", ",", "=", "+", "-", "*", "/", "#", '"', "\n", " ", "\t", "\r\n", "."]
ODD = ["\x00", "\ufeff", "\u200b", "\u2028", "\u2029", "\u0085", "\u202e", "\xa0", "\u3000", "\x0b", "\x0c",
       "\x1b", "\x7f", "\ufffd", "\u0301", "é", "λ", "中", "🦙", "\u0661", "\uff11", "²", "\U0010ffff", "\r"]
TOKENS = KEYWORDS + NAMES + NUMBERS + STRINGS + PUNCT + ["recipec 1"]
TOKEN_RE = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|\d[\d_]*(?:\.\d*)?(?:[eE][+-]?\d+)?[KMGBT]?|\.\d+|[A-Za-z_]\w*'
                      r'|\r?\n|[ \t]+|.', re.S)


def seeds() -> list[str]:
    out = list(HAND_WRITTEN)
    for path in sorted((ROOT / "examples").glob("*.rcp")) + sorted((ROOT / "recipes").glob("*.rcp")):
        out.append(path.read_text(encoding="utf-8", errors="replace"))
    return out


# --- input generators ----------------------------------------------------------------------------------


def random_text(rng: random.Random) -> str:
    n = rng.choice([0, 1, 2, 5, 20, 80, 300])
    alphabet = rng.choice([
        "abcxyz_019 =+-*/()[],.\"#\n\t",
        "".join(chr(c) for c in range(32, 127)) + "\n",
        "".join(ODD) + "ab1 (\"#\n",
    ])
    body = "".join(rng.choice(alphabet) for _ in range(n))
    return ("recipec 1\n" + body) if rng.random() < 0.6 else body


def random_bytes(rng: random.Random) -> bytes:
    n = rng.choice([1, 4, 16, 64, 256])
    body = bytes(rng.randrange(256) for _ in range(n))
    return (b"recipec 1\n" + body) if rng.random() < 0.6 else body


def mutate_chars(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.choice([1, 1, 2, 3, 5, 10])):
        i = rng.randrange(len(chars) + 1)
        op = rng.randrange(5)
        if op == 0 or not chars:  # insert
            chars[i:i] = rng.choice([rng.choice(PUNCT), rng.choice(ODD), chr(rng.randrange(32, 127))])
        elif op == 1:  # delete a run
            del chars[i:i + rng.choice([1, 1, 2, 5])]
        elif op == 2:  # replace
            chars[min(i, len(chars) - 1)] = rng.choice(PUNCT + ODD + list("az09_"))
        elif op == 3:  # duplicate a slice
            j = rng.randrange(len(chars) + 1)
            a, b = sorted((i, j))
            chars[i:i] = chars[a:b][:200]
        else:  # swap two characters
            j = rng.randrange(len(chars))
            k = min(i, len(chars) - 1)
            chars[j], chars[k] = chars[k], chars[j]
    return "".join(chars)


def mutate_tokens(rng: random.Random, text: str) -> str:
    toks = TOKEN_RE.findall(text)
    for _ in range(rng.choice([1, 1, 2, 3, 6])):
        i = rng.randrange(len(toks) + 1)
        op = rng.randrange(5)
        if op == 0 or not toks:
            toks[i:i] = [rng.choice(TOKENS)]
        elif op == 1:
            del toks[i:i + 1]
        elif op == 2:
            toks[min(i, len(toks) - 1)] = rng.choice(TOKENS)
        elif op == 3:  # duplicate a run of tokens (a line, a bracket...)
            j = min(len(toks), i + rng.randrange(1, 12))
            toks[i:i] = toks[i:j]
        else:  # swap two lines
            lines = "".join(toks).split("\n")
            if len(lines) > 2:
                a, b = rng.randrange(1, len(lines)), rng.randrange(1, len(lines))
                lines[a], lines[b] = lines[b], lines[a]
            toks = TOKEN_RE.findall("\n".join(lines))
    return "".join(toks)


def token_soup(rng: random.Random) -> str:
    n = rng.choice([1, 3, 8, 20, 60])
    sep = rng.choice(["", " ", " "])
    body = sep.join(rng.choice(TOKENS) for _ in range(n))
    return ("recipec 1\n" + body) if rng.random() < 0.8 else body


# well-formed programs over the real ops: these get past the parser and exercise lowering

def _expr(rng: random.Random, names: list[str], depth: int = 0) -> str:
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice(names + NUMBERS + STRINGS + ["true", "false"]) if names else rng.choice(NUMBERS)
    if r < 0.55:
        op = rng.choice("+-*/")
        return f"{_expr(rng, names, depth + 1)} {op} {_expr(rng, names, depth + 1)}"
    if r < 0.65:
        return f"-({_expr(rng, names, depth + 1)})"
    if r < 0.75:
        return f"({_expr(rng, names, depth + 1)})"
    if r < 0.82:
        return "[" + ", ".join(_expr(rng, names, depth + 1) for _ in range(rng.randrange(4))) + "]"
    return _call(rng, names, depth + 1)


SIZES = ['"tiny"', '"small"', '"1b"', '"huge"', "1"]
DTYPES = ['"float16"', '"bfloat16"', '"int8"', "1e400+0.5"]
MERGE_KEYS = ["weights", "density", "drop_rate", "t", "seed", "normalize", "dtype", "shard_size", "bogus"]
USES = ['"lib.rcp"', '"bad.rcp"', '"cyc_a.rcp"', '"fuzz.rcp"']
CONFIGS = ['"models/tiny"', '"models/badcfg"', '"models/arch_int"', '"models/arch_int/config.json"', '"data/a.txt"']


def _call(rng: random.Random, names: list[str], depth: int) -> str:
    op = rng.choice(["init", "init", "load", "hf", "text", "chat", "combine", "merge", "merge", "nope"])
    args: list[str] = []
    if op == "merge":
        models = [n for n in names if n.startswith("v")] or ['init("llama", size="tiny")']
        args += [rng.choice(models) for _ in range(rng.choice([0, 1, 2, 2, 3]))]
        if rng.random() < 0.5:
            args.append(f"base={rng.choice(models)}")
        args.append("method=" + rng.choice(['"linear"', '"task_arithmetic"', '"ties"', '"dare"', '"slerp"', '"nope"']))
        for key in rng.sample(MERGE_KEYS, rng.choice([0, 1, 2])):
            value = rng.choice(NUMBERS + ["[1, 2]", "[0.5, (1e300*1e300 + 0.5)]", "[]", "true", '"x"'])
            args.append(f"{key}={value}")
        return f"merge({', '.join(args)})"
    if op == "init":
        args.append(rng.choice(['"llama"', '"gpt2"', '"bert"', '"nope"', "1", '"\\u0000"']))
        args += ["size=" + rng.choice(SIZES), "seed=" + rng.choice(NUMBERS + ["-1", "1e400 + 0.5", "1/3"])]
        if rng.random() < 0.3:
            args.append("dtype=" + rng.choice(DTYPES))
        if rng.random() < 0.2:
            args.append(f"config={rng.choice(STRINGS + CONFIGS * 3)}")
    elif op in ("load", "hf", "text", "chat"):
        args.append(rng.choice(STRINGS))
        if rng.random() < 0.3:
            args.append(f"{rng.choice(['revision', 'field', 'path', 'glob'])}={rng.choice(STRINGS + NUMBERS)}")
    else:
        args.append(_expr(rng, names, depth + 1))
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        key = rng.choice(["embeddings", "norms", "dtype", "special_tokens", "seed", "size", "zzz"])
        args.append(f"{key}={_expr(rng, names, depth + 1)}")
    rng.shuffle(args) if rng.random() < 0.1 else None
    return f"{op}({', '.join(args)})"


def program(rng: random.Random) -> str:
    lines = ["recipec 1"]
    names: list[str] = []
    if rng.random() < 0.2:
        lines.append("use " + rng.choice(USES))
        names.append("shared")
    models: list[str] = []
    for i in range(rng.randrange(1, 6)):
        name = f"v{i}"
        r = 0.0 if i < 2 and rng.random() < 0.6 else rng.random()  # often start with two models
        if r < 0.3:  # a good model, or nearly
            arch = rng.choice(['"llama"', '"llama"', '"gpt2"', '"bert"'])
            value = f"init({arch}, size=\"tiny\", seed={rng.choice(['1', '2', '3', '-1'] + NUMBERS)})"
            if rng.random() < 0.2:
                value = f"init({arch}, config={rng.choice(CONFIGS)})"
            models.append(name)
        elif r < 0.55 and len(models) >= 2:  # weights summing to 1 whatever the number
            c = rng.choice(NUMBERS + ["(1e300*1e300 + 0.5)", "1/3"])
            value = f"{c}*{rng.choice(models)} + (1 - {c})*{rng.choice(models)}"
            if rng.random() < 0.3:
                value = f"combine({value}, {rng.choice(['embeddings', 'norms', 'dtype'])}={_expr(rng, [])})"
        elif r < 0.75 or not names:
            value = _call(rng, names, 0)
        else:
            value = _expr(rng, names)
        lines.append(f"{name} = {value}")
        names.append(name)
    for _ in range(rng.randrange(0, 3)):
        fmt = rng.choice(["", "", " as hf", " as onnx", " as zzz"])
        r = rng.random()
        value = names[-1] if names and r < 0.3 else rng.choice(names) if names and r < 0.6 else _expr(rng, names)
        lines.append(f"export {value} to {rng.choice(STRINGS)}{fmt}")
    return "\n".join(lines) + "\n"


def deep_nesting(rng: random.Random) -> str:
    n = rng.choice([10, 50, 100, 200, 250, 300, 400, 450, 500, 1000])
    kind = rng.randrange(7)
    if kind == 0:
        e = "(" * n + "1" + ")" * n
    elif kind == 1:
        e = "[" * n + "1" + "]" * n
    elif kind == 2:
        e = " + ".join(["1"] * n)
    elif kind == 3:
        e = "-" * n + "1"
    elif kind == 4:
        e = "init(" * n + ")" * n
    elif kind == 5:  # unclosed
        e = "(" * n + "1"
    else:  # right-nested arithmetic
        e = "1 - (" * n + "1" + ")" * n
    if rng.random() < 0.5:  # lowered inside an export rather than a binding
        return f"recipec 1\nexport {e} to \"out/x\"\n"
    return f"recipec 1\nx = {e}\nexport x to \"out/x\"\n"


def long_line(rng: random.Random) -> str:
    n = rng.choice([1_000, 3_000, 10_000])
    kind = rng.randrange(6)
    if kind == 4:  # numbers that are expensive to build exactly: a huge exponent, a huge mantissa
        number = rng.choice(["1e9999999", "1e-9999999", "9" * n, "0." + "0" * n + "1e" + "9" * 7])
        return f"recipec 1\nx = {number}\n"
    if kind == 5:
        return "recipec 1\nx = f(" + ", ".join(f"k{i}={i}" for i in range(n // 8)) + ")\n"
    if kind == 0:
        return "recipec 1\nx = " + "a" * n + "\n"
    if kind == 1:
        return 'recipec 1\nx = "' + "é" * n + '"\n'
    if kind == 2:
        return "recipec 1\n# " + "#" * n + "\nx = 1\n"
    return "recipec 1\nx = [" + ", ".join(str(i) for i in range(n // 6)) + "]\n"


def odd_unicode(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randrange(1, 6)):
        chars.insert(rng.randrange(len(chars) + 1), rng.choice(ODD))
    return "".join(chars)


@dataclass
class Case:
    kind: str
    data: bytes


def post_process(rng: random.Random, text: str) -> str:
    r = rng.random()
    if r < 0.08:
        text = text.replace("\n", "\r\n")
    elif r < 0.11:
        text = "\ufeff" + text
    elif r < 0.15:
        i = rng.randrange(len(text) + 1)
        text = text[:i] + "\x00" + text[i:]
    elif r < 0.18:
        text = text.rstrip("\n")  # no final newline
    return text


def generate(rng: random.Random, seed_texts: list[str]) -> Case:
    r = rng.random()
    if r < 0.12:
        kind, text = "random-text", random_text(rng)
    elif r < 0.17:
        return Case("random-bytes", random_bytes(rng))
    elif r < 0.42:
        kind, text = "mutated-chars", mutate_chars(rng, rng.choice(seed_texts))
    elif r < 0.62:
        kind, text = "mutated-tokens", mutate_tokens(rng, rng.choice(seed_texts))
    elif r < 0.74:
        kind, text = "token-soup", token_soup(rng)
    elif r < 0.89:
        kind, text = "program", program(rng)
    elif r < 0.91:
        kind, text = "deep-nesting", deep_nesting(rng)
    elif r < 0.92:
        kind, text = "long-line", long_line(rng)
    else:
        kind, text = "odd-unicode", odd_unicode(rng, rng.choice(seed_texts))
    text = post_process(rng, text)
    # Lone surrogates (none are generated raw, but be safe) go out as UTF-8 with surrogatepass: bytes a
    # file could really hold.
    return Case(kind, text.encode("utf-8", errors="surrogatepass"))


# --- the workspace ------------------------------------------------------------------------------------


def _safetensors(tensors: dict[str, tuple[str, list[int]]], truncate: int = 0) -> bytes:
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = 4
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    data = struct.pack("<Q", len(blob)) + blob + b"\0" * offset
    return data[:len(data) - truncate] if truncate else data


def make_workspace(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "data" / "a.txt").write_text("hello\n")
    (root / "data" / "b.jsonl").write_text('{"messages": []}\n')
    (root / "lib.rcp").write_text(LIB)
    (root / "bad.rcp").write_text("recipec 1\nx = (\n")
    (root / "cyc_a.rcp").write_text('recipec 1\nuse "cyc_b.rcp"\n')
    (root / "cyc_b.rcp").write_text('recipec 1\nuse "cyc_a.rcp"\n')
    tiny = {"model.embed_tokens.weight": ("F32", [4, 2]), "lm_head.weight": ("F32", [4, 2])}
    models = {
        "tiny": ({"model_type": "llama", "vocab_size": 4}, _safetensors(tiny), None),
        "badcfg": ('{"model_type": 1', _safetensors(tiny), None),
        "arch_int": ({"model_type": "llama", "architectures": 5, "hidden_size": "x"}, _safetensors(tiny), None),
        "trunc": ({"model_type": "llama"}, _safetensors(tiny, truncate=3), None),
        "badindex": ({"model_type": "llama"}, None, {"weight_map": {"w": "../etc/passwd"}}),
        "nocfg": (None, _safetensors(tiny), None),
    }
    for name, (config, weights, index) in models.items():
        d = root / "models" / name
        d.mkdir(parents=True)
        if config is not None:
            (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if weights is not None:
            (d / "model.safetensors").write_bytes(weights)
        if index is not None:
            (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return root / "fuzz.rcp"


# --- running one input -----------------------------------------------------------------------------------


class InputTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so the CLI's `except Exception` cannot swallow it."""


def _on_alarm(signum, frame):
    raise InputTimeout()


CRASH_KINDS = ("lower_file", "cli-internal-error", "cli-escaped", "parse")


@dataclass
class Bug:
    kind: str  # "lower_file", "cli-internal-error", "cli-escaped", "diagnostic", "fmt", "timeout"
    exc: str  # exception type and message
    where: str  # innermost recipec frame (file:line), or what was violated
    tb: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        # One crash, whichever way it showed (CLI internal error, lower_file, parse), is one bug.
        group = "crash" if self.kind in CRASH_KINDS else self.kind
        return (group, self.exc.split(":")[0], self.where)


def _where(exc: BaseException) -> str:
    """The innermost recipec frame of a traceback, as `recipec/path.py:line (function)`.

    A RecursionError runs out of stack wherever it happens to, so it is placed instead by where the
    recursion was entered: the last recipec frame before the first function that repeats.
    """
    frames, tb = [], exc.__traceback__
    while tb is not None:  # walk the frames without loading source lines: cheap even for deep recursion
        code = tb.tb_frame.f_code
        frames.append((code.co_filename, tb.tb_lineno, code.co_name))
        tb = tb.tb_next
    ours = [f for f in frames if "/recipec/" in f[0] and "fuzz_recipes" not in f[0]]
    inner = exc.__context__ if isinstance(exc.__context__, RecursionError) else exc
    inner = getattr(exc, "orig_exc", None) or inner
    if isinstance(inner, RecursionError) or isinstance(exc, RecursionError):
        counts = collections.Counter((f[0], f[2]) for f in frames)
        first = next((i for i, f in enumerate(frames) if counts[(f[0], f[2])] > 1), len(frames))
        entry = next((f for f in reversed(frames[:first]) if "/recipec/" in f[0] and "fuzz_recipes" not in f[0]),
                     None)
        if entry is not None:
            return _short(entry) + " -> recursion"
    f = (ours or frames or [None])[-1]
    return "?" if f is None else _short(f)


def _short(f: tuple[str, int, str]) -> str:
    i = f[0].rfind("/recipec/")
    return f"{f[0][i + 1:] if i >= 0 else f[0]}:{f[1]} ({f[2]})"


def _tb(limit: int = 8) -> str:
    return traceback.format_exc(limit=-limit)


def _exc_text(exc: BaseException) -> str:
    inner = getattr(exc, "orig_exc", None)  # lark wraps exceptions from transformer callbacks in VisitError
    if isinstance(inner, BaseException):
        return f"{type(inner).__name__}: {str(inner).splitlines()[0][:160] if str(inner) else ''} " \
               f"(wrapped in {type(exc).__name__})"
    msg = str(exc).replace("\n", " ")
    return f"{type(exc).__name__}: {msg[:160]}"


def _run_cli(argv: list[str]) -> tuple[int | None, str, str, Bug | None]:
    """cli.main in-process: (exit status, stdout, stderr, the exception that escaped main or None)."""
    out_b, err_b = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_b, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(err_b, encoding="utf-8", errors="backslashreplace", write_through=True)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    escaped = None
    status: int | None = None
    try:
        status = cli.main(argv)
    except InputTimeout:
        raise
    except BaseException as exc:  # noqa: BLE001 - anything escaping main is a bug
        escaped = Bug("cli-escaped", _exc_text(exc), _where(exc), _tb())
    finally:
        sys.stdout, sys.stderr = saved
    return status, out_b.getvalue().decode("utf-8", "replace"), err_b.getvalue().decode("utf-8", "replace"), escaped


def _check_diagnostics(diags) -> list[Bug]:
    bugs = []
    for d in diags:
        if d.code not in CODES:
            bugs.append(Bug("diagnostic", f"unknown code {d.code}", "codes"))
        spans = [d.span] + [n.span for n in d.notes]
        for s in spans:
            if s is None:
                continue
            n = len(s.source.text)
            if not (0 <= s.start <= s.end <= n):
                bugs.append(Bug("diagnostic", f"span [{s.start}, {s.end}) outside text of {n} chars "
                                f"({d.code}: {d.message[:60]})", f"span {d.code}"))
    try:
        render_all(diags)
        to_json(diags)
    except Exception as exc:  # noqa: BLE001
        bugs.append(Bug("diagnostic", _exc_text(exc), _where(exc), _tb()))
    return bugs


ALL_STAGES = frozenset({"cli", "lower", "fmt"})
STAGES_FOR = {"crash": {"lower", "fmt"}, "fmt": {"fmt"}, "diagnostic": {"lower", "fmt"}, "timeout": ALL_STAGES,
              "harness": ALL_STAGES}


def check_input(path: Path, data: bytes, json_flag: bool, stages=ALL_STAGES) -> tuple[int | str, list[Bug]]:
    path.write_bytes(data)
    bugs: list[Bug] = []
    status: int | str = "-"
    if "cli" in stages:
        status = _cli_stage(path, json_flag, bugs)
    if "lower" in stages:
        _lower_stage(path, bugs)
    if "fmt" in stages:
        _fmt_stage(data, bugs)
    return status, bugs


def _cli_stage(path: Path, json_flag: bool, bugs: list[Bug]) -> int | str:
    """1. the CLI, in-process"""
    argv = ["check", "--json", str(path)] if json_flag else ["check", str(path)]
    status, _out, err, escaped = _run_cli(argv)
    if escaped is not None:
        bugs.append(escaped)
        return "exception"
    if "internal error" in err:
        line = next(ln for ln in err.splitlines() if "internal error" in ln)
        # Run again with RECIPEC_DEBUG=1, which makes the CLI re-raise, to learn where it failed.
        os.environ["RECIPEC_DEBUG"] = "1"
        try:
            _, _, _, again = _run_cli(argv)
        finally:
            os.environ.pop("RECIPEC_DEBUG", None)
        if again is not None:
            bugs.append(Bug("cli-internal-error", again.exc, again.where, again.tb))
        else:
            bugs.append(Bug("cli-internal-error", line.split("internal error: ", 1)[-1], "?"))
    return status


def _lower_stage(path: Path, bugs: list[Bug]) -> None:
    """2. lower_file directly"""
    try:
        program_ = lower_file(path)
        bugs += _check_diagnostics(program_.diagnostics)
    except RecipeError as err_:
        bugs += _check_diagnostics(err_.diagnostics)
    except InputTimeout:
        raise
    except Exception as exc:  # noqa: BLE001
        bugs.append(Bug("lower_file", _exc_text(exc), _where(exc), _tb()))


def _fmt_stage(data: bytes, bugs: list[Bug]) -> None:
    """3. parse, and when the text parses, format it and parse the result: all at one Python stack depth,
    so a recipe nested close to the recursion limit cannot pass once and fail the second time."""
    text = data.decode("utf-8", errors="replace")
    recipe = once = reparsed = twice = None
    try:
        recipe = parse(text)
        once = format_recipe(recipe)
        reparsed = parse(once)
        twice = format_recipe(reparsed)
    except InputTimeout:
        raise
    except RecipeError as err:
        if recipe is None:  # the input itself was refused: fine, if the diagnostics are
            bugs += _check_diagnostics(err.diagnostics)
        else:
            bugs.append(Bug("fmt", "formatted text does not parse: " + str(err)[:100].replace("\n", " "),
                            "fmt-reparse"))
        return
    except Exception as exc:  # noqa: BLE001
        stage = "parse" if recipe is None else "fmt"
        bugs.append(Bug(stage, _exc_text(exc), _where(exc), _tb()))
        return
    try:
        changed = reparsed != recipe
    except RecursionError:  # dataclass __eq__ recurses too: a recipe this deep cannot be compared here
        changed = False
    if changed:
        bugs.append(Bug("fmt", "format changed the AST", "fmt-ast"))
    if twice != once:
        bugs.append(Bug("fmt", "format is not idempotent", "fmt-idempotence"))
    if sorted(c.text for c in reparsed.comments) != sorted(c.text for c in recipe.comments):
        bugs.append(Bug("fmt", "format lost or changed a comment", "fmt-comments"))
    try:
        once.encode("utf-8")
    except UnicodeEncodeError as exc:
        bugs.append(Bug("fmt", f"formatted text is not UTF-8-encodable: {exc.reason}", "fmt-utf8"))


def run_one(path: Path, data: bytes, json_flag: bool, stages=ALL_STAGES) -> tuple[int | str, list[Bug], float]:
    t0 = time.perf_counter()
    signal.alarm(PER_INPUT_TIMEOUT_S)
    try:
        status, bugs = check_input(path, data, json_flag, stages)
    except InputTimeout:
        status, bugs = "timeout", [Bug("timeout", f"no result in {PER_INPUT_TIMEOUT_S} s", "timeout")]
    except Exception as exc:  # noqa: BLE001 - a bug in this script: report it, keep going
        status, bugs = "harness-error", [Bug("harness", _exc_text(exc), _where(exc), _tb())]
    finally:
        signal.alarm(0)
    return status, bugs, time.perf_counter() - t0


# --- shrinking -----------------------------------------------------------------------------------------


def minimize(path: Path, data: bytes, key, json_flag: bool, budget_s: float = 8.0) -> bytes:
    """Greedy delta debugging over lines, then characters: the shortest input found that keeps the same bug."""
    text = data.decode("utf-8", errors="surrogatepass")
    deadline = time.perf_counter() + budget_s
    stages = frozenset(STAGES_FOR.get(key[0], ALL_STAGES))
    if key[0] == "crash" and key[2].startswith(("?", "recipec/cli")):
        stages = ALL_STAGES

    def still_fails(candidate: str) -> bool:
        _, bugs, _ = run_one(path, candidate.encode("utf-8", errors="surrogatepass"), json_flag, stages)
        return any(b.key == key for b in bugs)

    # lines first, then runs of characters of shrinking length
    lines = text.split("\n")
    i = 1
    while i < len(lines) and time.perf_counter() < deadline:
        candidate = lines[:i] + lines[i + 1:]
        if still_fails("\n".join(candidate)):
            lines = candidate
        else:
            i += 1
    text = "\n".join(lines)
    chunk = max(1, len(text) // 2)
    while chunk >= 1 and time.perf_counter() < deadline:
        i, changed = 0, False
        while i < len(text) and time.perf_counter() < deadline:
            candidate = text[:i] + text[i + chunk:]
            if candidate and still_fails(candidate):
                text, changed = candidate, True
            else:
                i += chunk
        if not changed:
            chunk //= 2
    return text.encode("utf-8", errors="surrogatepass")


# --- main -----------------------------------------------------------------------------------------------

_WORKER_PATH: Path | None = None


def _worker_init() -> None:
    global _WORKER_PATH
    signal.signal(signal.SIGALRM, _on_alarm)
    _WORKER_PATH = make_workspace(_SCRATCH / f"ws-{os.getpid()}")


def _worker_run(batch: list[tuple[int, str, bytes, bool]]) -> list[tuple[int, int | str, list[Bug], float]]:
    assert _WORKER_PATH is not None
    out = []
    for index, _kind, data, json_flag in batch:
        status, bugs, dt = run_one(_WORKER_PATH, data, json_flag)
        out.append((index, status, bugs, dt))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="inputs to run (default 10000)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: all CPUs)")
    ap.add_argument("--show", type=int, default=3, help="failing inputs to show per bug (default 3)")
    ap.add_argument("--minimize", type=int, default=10, help="bugs to shrink to a small input (default 10; 0 skips)")
    ap.add_argument("--json-every", type=int, default=4,
                    help="run every Nth input as `check --json` instead of plain `check` (default 4; 0 never)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGALRM, _on_alarm)

    # Inputs depend only on --seed and --n, never on --jobs.
    rng = random.Random(args.seed)
    seed_texts = seeds()
    cases = []
    for i in range(args.n):
        case = generate(rng, seed_texts)
        json_flag = bool(args.json_every) and i % args.json_every == args.json_every - 1
        cases.append((i, case.kind, case.data, json_flag))
    batches = [cases[i:i + 25] for i in range(0, len(cases), 25)]

    t0 = time.perf_counter()
    results = []
    if args.jobs > 1:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(args.jobs, initializer=_worker_init) as pool:
            for chunk in pool.imap_unordered(_worker_run, batches):
                results.extend(chunk)
    else:
        _worker_init()
        for batch in batches:
            results.extend(_worker_run(batch))
    elapsed = time.perf_counter() - t0

    statuses: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter(c[1] for c in cases)
    buckets: dict[tuple, list[tuple[bytes, Bug, bool]]] = {}
    slow: list[tuple[float, str, bytes]] = []
    n_bad_inputs = 0
    all_bugs: list[Bug] = []
    for index, status, bugs, dt in sorted(results, key=lambda r: r[0]):
        _, kind, data, json_flag = cases[index]
        statuses[status] += 1
        if dt > SLOW_S:
            slow.append((dt, kind, data))
        n_bad_inputs += bool(bugs)
        all_bugs += bugs
        for bug in bugs:
            buckets.setdefault(bug.key, []).append((data, bug, json_flag))

    tracebacks = sum(1 for b in all_bugs if b.kind in CRASH_KINDS)
    by_kind = collections.Counter(b.kind for b in all_bugs)
    print(f"inputs run: {args.n} (seed {args.seed}, {args.jobs} jobs) in {elapsed:.1f} s "
          f"({args.n / elapsed:.0f} inputs/s)")
    print("input kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    print("cli exit statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=str)))
    print(f"tracebacks: {tracebacks}  (" + ", ".join(f"{k} {by_kind[k]}" for k in CRASH_KINDS) + ")")
    print("other violations: " + ", ".join(f"{k} {by_kind[k]}" for k in ("diagnostic", "fmt", "timeout", "harness")))
    print(f"inputs with any bug: {n_bad_inputs}; distinct bugs: {len(buckets)}")
    if slow:
        slow.sort(key=lambda s: -s[0])
        print(f"slow inputs (> {SLOW_S:.0f} s each, under --jobs {args.jobs}): {len(slow)}; slowest: "
              + "; ".join(f"{dt:.1f}s {kind} {ascii(data[:50])}" for dt, kind, data in slow[:3]))
    path = make_workspace(_SCRATCH / "ws-main") if buckets else None
    for n, (key, hits) in enumerate(sorted(buckets.items(), key=lambda kv: (kv[0][0] != "crash", -len(kv[1])))):
        hits.sort(key=lambda h: len(h[0]))
        data, bug, json_flag = hits[0]
        seen_as = collections.Counter(b.kind for _, b, _ in hits)
        inputs = len({d for d, _, _ in hits})
        print(f"\n=== bug {n + 1}: [{key[0]}] {bug.exc}\n    at {bug.where}\n    {inputs} inputs; seen as "
              + ", ".join(f"{k} {v}" for k, v in seen_as.items()))
        for d in list(dict.fromkeys(d for d, _, _ in hits))[:args.show]:
            print(f"    input: {ascii(d.decode('utf-8', 'surrogatepass'))[:240]}")
        if n < args.minimize and path is not None:
            small = minimize(path, data, key, json_flag)
            print(f"    minimized: {ascii(small.decode('utf-8', 'surrogatepass'))[:240]}")
        tb = next((b.tb for _, b, _ in hits if b.tb), "")
        if tb:
            tail = tb.rstrip().splitlines()[-6:]
            print("    traceback (tail):\n      " + "\n      ".join(tail))
    return 1 if buckets else 0


if __name__ == "__main__":
    sys.exit(main())
