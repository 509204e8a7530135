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

# pydantic scans every installed package's entry points for plugins when the first model is built
# (~30 ms, more in a large environment); recipec uses none.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from . import __version__  # noqa: E402
from .diagnostics import RecipeError, render_all, to_json, use_color  # noqa: E402


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

    from .plan.cache_status import cached_nodes
    from .store.cache import Cache, default_cache_dir

    program = _lower(args.file)
    cached = cached_nodes(program.graph, Cache(default_cache_dir(Path(args.file), args.cache)))
    plan = make_plan(program.graph, args.file, lambda node: node.id in cached, args.threads)
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

        sys.stdout.write("\n".join(_describe_op(op) for _, op in sorted(REGISTRY.items())))
        return 0
    code = CODES.get(key)
    if code is None:
        sys.stderr.write(f"recipec: no diagnostic code {args.code!r}; codes are "
                         + ", ".join(CODES) + "\n")
        return 2
    sys.stdout.write(f"{code.code}: {code.title} (exit status {code.exit_status})\n\n{code.explanation}\n")
    return 0


def _run_options(args, **overrides):
    from .engine import RunOptions
    from .store.cache import default_cache_dir

    options = RunOptions(cache_dir=default_cache_dir(Path(args.file), args.cache), offline=args.offline)
    if args.threads:
        options.threads = args.threads
    for key, value in overrides.items():
        setattr(options, key, value)
    return options


def _progress(args, program):
    """A rich progress bar on a terminal (bytes written, rate, ETA over what the plan will build)."""
    if args.json or not sys.stderr.isatty():
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    from .plan import make_plan
    from .plan.cache_status import cached_nodes
    from .store.cache import Cache, default_cache_dir

    cached = cached_nodes(program.graph, Cache(default_cache_dir(Path(args.file), args.cache)))
    plan = make_plan(program.graph, args.file, lambda node: node.id in cached)
    total = sum(s.cost.bytes_written for s in plan.steps if s.status == "build") or None
    progress = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(), transient=True, console=Console(stderr=True))
    return progress, progress.add_task(f"building {plan.to_build} node(s)", total=total)


def cmd_run(args) -> int:
    import json

    from .engine import Engine
    from .store.lockfile import carry_file_hashes, lock_path, read_lock, write_lock

    recipe = Path(args.file)
    program = _lower(args.file)
    _report(program.diagnostics, args)
    progress, task = _progress(args, program)
    options = _run_options(args, progress=(lambda n: progress.advance(task, n)) if progress else None)
    engine = Engine(program, recipe, options)
    if args.locked:
        from .verify import check_locked

        check_locked(engine)
    if progress:
        with progress:
            result = engine.run()
    else:
        result = engine.run()
    previous = read_lock(lock_path(recipe)) if lock_path(recipe).exists() else None
    write_lock(lock_path(recipe), carry_file_hashes(previous, result.lock))
    built = sum(r.status == "built" for r in result.results)
    cached = sum(r.status == "cached" for r in result.results)
    if args.json:
        sys.stdout.write(json.dumps({
            "format_version": 1, "seconds": round(result.seconds, 3), "built": built, "cached": cached,
            "nodes": [{"label": r.node.label, "op": r.node.op, "status": r.status, "key": r.key,
                       "digest": r.artifact.digest if r.artifact else None, "seconds": round(r.seconds, 3)}
                      for r in result.results],
            "exports": [{"path": e["path"], "digest": e["digest"]} for e in result.exports],
        }, indent=2) + "\n")
    else:
        for e in result.exports:
            sys.stdout.write(f"{e['resolved']}\n")
        sys.stderr.write(f"Built {built}, {cached} cached, {len(result.exports)} exported in "
                         f"{result.seconds:.1f} s; lock: {lock_path(recipe)}\n")
    return 0


def cmd_lock(args) -> int:
    from .engine import Engine
    from .store.lockfile import lock_path, write_lock

    recipe = Path(args.file)
    program = _lower(args.file)
    engine = Engine(program, recipe, _run_options(args, write_exports=False, hash_input_files=True))
    result = engine.run()
    write_lock(lock_path(recipe), result.lock)
    sys.stderr.write(f"wrote {lock_path(recipe)}\n")
    return 0


def cmd_verify(args) -> int:
    from .verify import verify

    return verify(Path(args.file), _lower(args.file), _run_options(args))


def cmd_cache(args) -> int:
    from .plan.render import human_bytes
    from .store.cache import Cache, default_cache_dir

    cache = Cache(default_cache_dir(Path(args.file), args.cache))
    entries = cache.entries()
    if args.action == "ls":
        for entry in entries:
            size = sum(p.stat().st_size for p in entry.path.iterdir())
            sys.stdout.write(f"{entry.key[:16]}  {entry.meta.get('op', '?'):<8} {human_bytes(size):>10}  "
                             f"{entry.digest}\n")
        return 0
    # gc: keep what the recipe's current plan finds in the cache, remove the rest; never build anything
    from .plan.cache_status import cached_keys

    keep = set(cached_keys(_lower(args.file).graph, cache).values())
    removed = [e for e in entries if e.key not in keep]
    with cache.locked():
        for entry in removed:
            cache.remove(entry.key)
    sys.stderr.write(f"removed {len(removed)} of {len(entries)} cache entries\n")
    return 0


def _type_text(annotation) -> str:
    from typing import Literal, get_args, get_origin

    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if get_origin(annotation) is None and hasattr(annotation, "__name__"):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _describe_op(op) -> str:
    """An op's one-line summary, then its inputs and parameters with types, defaults and meaning."""
    lines = [f"{op.name}: {' '.join((op.__doc__ or '').split())}"]
    for inp in op.inputs:
        kind = inp.kind.value if hasattr(inp.kind, "value") else inp.kind
        extra = ", several" if inp.variadic else ", optional" if inp.optional else ""
        lines.append(f"  {inp.name} ({kind}{extra}): {inp.doc}")
    for name, field in op.Params.model_fields.items():
        if name in getattr(op, "internal", ()):
            continue
        annotation = _type_text(field.annotation)
        default = "required" if field.is_required() else f"default {field.default!r}"
        lines.append(f"  {name}: {annotation}, {default}" + (f" — {field.description}" if field.description else ""))
    return "\n".join(lines) + "\n"


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
    p = verb("plan", cmd_plan, "show what a run would build and what it costs, reading no weight")
    p.add_argument("file")
    p.add_argument("--cache", help="cache directory to look up (default: as `run`)")
    p.add_argument("--threads", type=int, default=0, help="plan for this many worker threads (default: as `run`)")
    p = verb("graph", cmd_graph, "print the op graph", json_flag=False)
    p.add_argument("file")
    p.add_argument("--format", choices=("dot", "mermaid"), default="dot")
    p = verb("fmt", cmd_fmt, "rewrite a recipe in canonical layout, keeping comments", json_flag=False)
    p.add_argument("file")
    p.add_argument("--check", action="store_true", help="exit 1 if the file is not formatted; change nothing")
    p.add_argument("--stdout", action="store_true", help="print the formatted recipe instead of rewriting it")
    verb("explain", cmd_explain, "explain a diagnostic code (or `ops`)", json_flag=False).add_argument("code")

    def running(p: argparse.ArgumentParser, actions: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        if actions:  # `recipec cache ls FILE`: the action comes before the file
            p.add_argument("action", choices=actions)
        p.add_argument("file")
        p.add_argument("--cache", help="cache directory (default: $RECIPEC_CACHE or .recipec/cache beside the recipe)")
        p.add_argument("--offline", action="store_true", help="never touch the network; hub inputs must be cached")
        p.add_argument("--threads", type=int, default=0, help="worker threads (default: all cores)")
        return p

    p = running(verb("run", cmd_run, "build the recipe's exports, through the cache, and update the lockfile"))
    p.add_argument("--locked", action="store_true", help="refuse to run if anything pinned in the lockfile drifted")
    running(verb("lock", cmd_lock, "resolve inputs, build into the cache and write FILE.lock", json_flag=False))
    running(verb("verify", cmd_verify, "rebuild from scratch and compare byte for byte with the lock and outputs",
                 json_flag=False))
    running(verb("cache", cmd_cache, "list the cache (ls), or remove what the recipe no longer needs (gc)",
                 json_flag=False), actions=("ls", "gc"))
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
