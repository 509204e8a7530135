"""The `recipec` command line: wires verbs to the compiler and prints results.

Data goes to stdout, messages to stderr, colour only on a terminal (and never with NO_COLOR). A bad
recipe or input is reported as diagnostics with exit status 65/66, never a traceback. The light verbs
(check, plan, graph, fmt, explain) import neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .diagnostics import RecipeError, render_all, to_json, use_color


def _lower(path: str):
    from .ir.lower import lower_file

    return lower_file(Path(path))


def _report(diagnostics, args) -> None:
    if not diagnostics:
        return
    if getattr(args, "json", False):
        sys.stdout.write(to_json(diagnostics) + "\n")
    else:
        sys.stderr.write(render_all(diagnostics, use_color(sys.stderr)))


def cmd_check(args) -> int:
    program = _lower(args.file)
    _report(program.diagnostics, args)
    if not args.json:
        n = len(program.graph.reachable())
        sys.stderr.write(f"{args.file}: ok ({n} node{'s' if n != 1 else ''}, "
                         f"{len(program.graph.exports)} export{'s' if len(program.graph.exports) != 1 else ''})\n")
    return 0


def cmd_plan(args) -> int:
    from .plan import make_plan
    from .plan.render import render_json, render_text

    program = _lower(args.file)
    plan = make_plan(program.graph, args.file)
    if args.json:
        sys.stdout.write(render_json(plan))
    else:
        _report(program.diagnostics, args)
        sys.stdout.write(render_text(plan, use_color(sys.stdout)))
    return 0


def cmd_graph(args) -> int:
    from .plan.graphviz import to_dot, to_mermaid

    program = _lower(args.file)
    sys.stdout.write(to_dot(program.graph) if args.format == "dot" else to_mermaid(program.graph))
    return 0


def cmd_fmt(args) -> int:
    from .syntax import parse_file
    from .syntax.format import format_recipe

    path = Path(args.file)
    original = path.read_text(encoding="utf-8")
    formatted = format_recipe(parse_file(path, args.file))
    if args.check:
        if formatted != original:
            sys.stderr.write(f"{args.file}: would be reformatted\n")
            return 1
        return 0
    if args.stdout:
        sys.stdout.write(formatted)
    elif formatted != original:
        from .store.atomic import write_text_atomic

        write_text_atomic(path, formatted)
        sys.stderr.write(f"{args.file}: reformatted\n")
    return 0


def cmd_explain(args) -> int:
    from .codes import CODES

    key = args.code.upper()
    if key == "OPS":
        from .ops import REGISTRY

        for name, op in sorted(REGISTRY.items()):
            sys.stdout.write(f"{name}: {op.summary()}\n")
        return 0
    code = CODES.get(key)
    if code is None:
        sys.stderr.write(f"recipec: no diagnostic code {args.code!r}; codes are "
                         + ", ".join(CODES) + "\n")
        return 2
    sys.stdout.write(f"{code.code}: {code.title} (exit status {code.exit_status})\n\n{code.explanation}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recipec", description="Compile model recipes into weights.")
    parser.add_argument("--version", action="version", version=f"recipec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def verb(name: str, func, help_: str, json_flag: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        return p

    verb("check", cmd_check, "parse and type-check a recipe").add_argument("file")
    verb("plan", cmd_plan, "show what a run would build and what it costs, reading no weight").add_argument("file")
    p = verb("graph", cmd_graph, "print the op graph", json_flag=False)
    p.add_argument("file")
    p.add_argument("--format", choices=("dot", "mermaid"), default="dot")
    p = verb("fmt", cmd_fmt, "rewrite a recipe in canonical layout, keeping comments", json_flag=False)
    p.add_argument("file")
    p.add_argument("--check", action="store_true", help="exit 1 if the file is not formatted; change nothing")
    p.add_argument("--stdout", action="store_true", help="print the formatted recipe instead of rewriting it")
    verb("explain", cmd_explain, "explain a diagnostic code (or `ops`)", json_flag=False).add_argument("code")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as err:
        _report(err.diagnostics, args)
        return err.exit_status
    except KeyboardInterrupt:
        sys.stderr.write("recipec: interrupted\n")
        return 130
    except FileNotFoundError as err:
        sys.stderr.write(f"recipec: {err.filename}: no such file\n")
        return 66
    except Exception as err:  # the last line of defence: a bug, reported as one
        if os.environ.get("RECIPEC_DEBUG"):
            raise
        sys.stderr.write(f"recipec: internal error: {type(err).__name__}: {err}\n"
                         "  this is a bug in recipec; rerun with RECIPEC_DEBUG=1 for a traceback and report it\n")
        return 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
