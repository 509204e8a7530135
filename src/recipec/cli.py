"""The `recipec` command line: wires verbs to the compiler and prints results.

Data goes to stdout, messages to stderr, colour only on a terminal (and never with NO_COLOR). A bad
recipe or input is reported as diagnostics with exit status 65/66, never a traceback. The light verbs
(check, plan, graph, fmt, explain) import neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from pathlib import Path

# pydantic scans every installed package's entry points for plugins when the first model is built
# (~30 ms, more in a large environment); recipec uses none.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from . import __version__  # noqa: E402
from .diagnostics import RecipeError, render_all, to_data, to_json, use_color  # noqa: E402


def _lower(path: str):
    from .check import lower_file

    return lower_file(Path(path))


def _report(diagnostics, args) -> None:
    if not diagnostics:
        return
    if getattr(args, "json", False):
        sys.stdout.write(to_json(diagnostics) + "\n")
    else:
        sys.stderr.write(render_all(diagnostics, use_color(sys.stderr)))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def cmd_check(args) -> int:
    program = _lower(args.file)
    nodes, exports = len(program.graph.reachable()), len(program.graph.exports)
    if args.json:  # one document whatever the outcome, so a tool never has to parse silence
        sys.stdout.write(to_json(program.diagnostics, nodes=nodes, exports=exports) + "\n")
        return 0
    _report(program.diagnostics, args)
    sys.stderr.write(f"{args.file}: ok ({_count(nodes, 'node')}, {_count(exports, 'export')})\n")
    return 0


def cmd_plan(args) -> int:
    from .plan import make_plan
    from .plan.render import render_json, render_text

    from .plan.cache_status import cached_nodes
    from .store.cache import Cache, default_cache_dir

    program = _lower(args.file)
    cache = Cache(default_cache_dir(Path(args.file), args.cache))
    cached = cached_nodes(program.graph, cache)
    plan = make_plan(program.graph, args.file, lambda node: node.id in cached, args.threads, cache.known_speeds())
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
    formatted = format_recipe(parse_file(path, args.file))  # first: it reports a file that is not UTF-8
    original = path.read_text(encoding="utf-8")
    if args.check:
        if formatted != original:
            sys.stderr.write(f"{args.file}: would be reformatted\n")
            return 1
        return 0
    if args.stdout:
        sys.stdout.write(formatted)
    elif formatted != original:
        from .store.atomic import write_text_atomic

        write_text_atomic(path, formatted, follow_links=True)
        sys.stderr.write(f"{args.file}: reformatted\n")
    return 0


def cmd_explain(args) -> int:
    from .codes import CODES, codes_markdown

    key = args.code.upper()
    if key == "OPS":
        from .ops import REGISTRY, ops_markdown

        sys.stdout.write(ops_markdown() if args.markdown else
                         "\n".join(_describe_op(op) for _, op in sorted(REGISTRY.items())))
        return 0
    if key == "CODES":
        sys.stdout.write(codes_markdown() if args.markdown else
                         "".join(f"{c.code}  {c.title}\n" for c in sorted(CODES.values(), key=lambda c: c.code)))
        return 0
    code = CODES.get(key)
    if code is None:
        from .ops import REGISTRY

        if args.code in REGISTRY:  # `recipec explain merge`: one op
            sys.stdout.write(_describe_op(REGISTRY[args.code]) + "\n")
            return 0
        import difflib

        close = difflib.get_close_matches(args.code, [*REGISTRY, *CODES], n=1)
        guess = f"did you mean `{close[0]}`? " if close else ""
        sys.stderr.write(f"recipec: {args.code!r} is neither a diagnostic code nor an op; {guess}"
                         "`recipec explain codes` lists the codes, `recipec explain ops` the ops\n")
        return 2
    sys.stdout.write(f"{code.code}: {code.title} ({code.consequence})\n\n{code.explanation}\n")
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


def _progress(args):
    """On a terminal, a rich progress display with one bar per node being built, in that job's own
    units (bytes, steps, tokens, ...) with its ETA, and the callable the engine reports through; the
    engine supplies each total, so nothing is computed twice."""
    if args.json or not sys.stderr.isatty():
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn
    from rich.text import Text

    from .units import human_amount, human_seconds

    class Amount(ProgressColumn):
        def render(self, task) -> Text:
            meter = task.fields["meter"]
            total = human_amount(meter.total, meter.unit) if meter.total is not None else "?"
            return Text(f"{human_amount(meter.done, meter.unit)} / {total}", style="progress.download")

    class Eta(ProgressColumn):
        def render(self, task) -> Text:
            eta = task.fields["meter"].eta
            return Text("eta ?" if eta is None else f"eta {human_seconds(eta)}", style="progress.remaining")

    progress = Progress("[progress.description]{task.description}", BarColumn(), Amount(), Eta(),
                        transient=True, console=Console(stderr=True))
    tasks: dict[int, int] = {}

    def show(meter) -> None:
        task = tasks.get(id(meter))
        if task is None:
            task = tasks[id(meter)] = progress.add_task(f"building {meter.label}", total=meter.total, meter=meter)
        if meter.finished:
            progress.remove_task(tasks.pop(id(meter)))
        else:
            progress.update(task, completed=meter.done, total=meter.total, meter=meter)

    return progress, show


@contextlib.contextmanager
def _tracking(log_with: str | None, recipe: Path):
    """`--log-with`: for the run, the environment through which training rules (launched ones too) learn
    which accelerate trackers to log to; local ones write under `runs/` beside the recipe."""
    if not log_with:
        yield
        return
    from .backends.train.metrics import tracking_environment

    settings = tracking_environment(log_with, recipe.parent / "runs")
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cmd_run(args) -> int:
    import json
    import shlex

    from .artifacts.report import page_of
    from .engine import Engine
    from .store.lockfile import lock_path
    from .verify import check_locked

    recipe = Path(args.file)
    program = _lower(args.file)
    _report(program.diagnostics, args)
    progress, show = _progress(args)
    options = _run_options(args, progress=show, force=args.force, verify_cache=args.locked,
                           launch=shlex.split(args.launch or ""))
    engine = Engine(program, recipe, options)
    if args.locked:  # checked before anything is built; the engine then checks each node's key and digest
        options.locked = check_locked(engine)

    def record(result) -> None:
        """The cache's root and the lock (never under --locked: the engine held every node and release to
        it), written while the run still holds the cache, so `cache gc` cannot come between."""
        _register_root(engine, recipe, result.lock)
        if not args.locked:
            _update_lock(recipe, result.lock)

    try:
        with _tracking(args.log_with, recipe):
            with progress or contextlib.nullcontext():
                result = engine.run(then=record)
    finally:
        for notice in engine.notices:
            sys.stderr.write(f"recipec: {notice}\n")
    built = sum(r.status == "built" for r in result.results)
    cached = sum(r.status == "cached" for r in result.results)
    warnings = [w for r in result.results for w in r.warnings]
    nonfinite = sum(r.nonfinite for r in result.results)
    if args.json:
        sys.stdout.write(json.dumps({
            "format_version": 1, "seconds": round(result.seconds, 3), "built": built, "cached": cached,
            "nodes": [{"label": r.node.label, "op": r.node.op, "status": r.status, "key": r.key,
                       "digest": r.artifact.digest if r.artifact else None, "seconds": round(r.seconds, 3)}
                      for r in result.results],
            "exports": [{"path": e["path"], "digest": e["digest"]} for e in result.exports],
            "reports": {r.node.label: r.artifact.files for r in result.shown},  # each report's data
            "nonfinite": nonfinite, "warnings": [to_data(w) for w in warnings],
        }, indent=2) + "\n")
    else:
        _report(warnings, args)
        for e in result.exports:
            sys.stdout.write(f"{e['resolved']}\n")
        for r in result.shown:  # the reports the recipe binds, as their pages
            sys.stdout.write(f"\n{page_of(r.artifact.path)}")
        flagged = f"; {nonfinite} NaN or infinite value{'s' if nonfinite != 1 else ''} written" if nonfinite else ""
        sys.stderr.write(f"Built {built}, {cached} cached, {len(result.exports)} exported in "
                         f"{result.seconds:.1f} s{flagged}; lock: {lock_path(recipe)}{' (matches)' if args.locked else ''}\n")
    return 0


def _register_root(engine, recipe: Path, lock: dict) -> None:
    """The recipe's lockfile as a root of the cache the run used, with what `lock` references."""
    from .store.gc import references
    from .store.lockfile import lock_path

    engine.cache.register_root(lock_path(recipe), references(lock))


def _update_lock(recipe: Path, data: dict) -> None:
    """Write the lock `run` made, keeping the input file hashes an earlier `lock` recorded; a previous
    lockfile that cannot be read (another format, damaged) is simply replaced."""
    from .store.lockfile import LockError, carry_file_hashes, lock_path, read_lock

    try:
        previous = read_lock(lock_path(recipe))
    except LockError:
        previous = None
    _write_lock(recipe, carry_file_hashes(previous, data))


def _write_lock(recipe: Path, data: dict) -> None:
    from .diagnostics import Diagnostic
    from .store.lockfile import lock_path, write_lock

    try:
        write_lock(lock_path(recipe), data)
    except OSError as err:
        raise RecipeError([Diagnostic(
            "E504", f"cannot write the lockfile {lock_path(recipe)}: {os.strerror(err.errno or 0)}", path=str(recipe),
            hint="everything else is done and cached: make the recipe's folder writable and run again")]) from None


def cmd_lock(args) -> int:
    from .engine import Engine
    from .store.lockfile import LockError, carry_outputs, lock_path, read_lock

    recipe = Path(args.file)
    program = _lower(args.file)
    engine = Engine(program, recipe, _run_options(args, write_exports=False, hash_input_files=True))

    try:
        previous = read_lock(lock_path(recipe))
    except LockError:
        previous = None
    carried = []

    def record(result) -> None:  # while the run holds the cache (see cmd_run)
        carried.append(carry_outputs(previous, result.lock))
        _register_root(engine, recipe, result.lock)
        _write_lock(recipe, result.lock)

    engine.run(then=record)
    sys.stderr.write(f"wrote {lock_path(recipe)}\n")
    if previous and previous.get("outputs") and not carried[0]:
        sys.stderr.write("recipec: the lock records no outputs now: the results changed since they were written; "
                         "`recipec run` writes the releases and records them\n")
    return 0


def cmd_verify(args) -> int:
    from .verify import verify

    return verify(Path(args.file), _lower(args.file), _run_options(args))


def cmd_inspect(args) -> int:
    """The `stats` report of one model folder: counts, MACs, measured latency and memory."""
    import json

    from .backends import RunFailure
    from .backends.analysis import inspect_dir
    from .diagnostics import Diagnostic
    from .ops.analysis import StatsParams

    given = {name: getattr(args, name) for name in ("seq_len", "batch", "threads", "repeats", "decode_tokens")}
    params = StatsParams(**{name: value for name, value in given.items() if value is not None})
    try:
        report = inspect_dir(Path(args.dir), params)
    except RunFailure as err:
        raise RecipeError([Diagnostic(err.code, err.message, hint=err.hint, path=args.dir)]) from None
    sys.stdout.write(json.dumps(report.data, indent=2, sort_keys=True) + "\n" if args.json else report.page())
    return 0


def cmd_cache(args) -> int:
    from .cache_commands import run_cache_action

    return run_cache_action(args)


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
        kinds = inp.kind if isinstance(inp.kind, tuple) else (inp.kind,)
        kind = " or ".join(k.value if hasattr(k, "value") else k for k in kinds)
        extra = ", several" if inp.variadic else ", optional" if inp.optional else ""
        lines.append(f"  {inp.name} ({kind}{extra}): {inp.doc}")
    for name, field in op.Params.model_fields.items():
        if name in getattr(op, "internal", ()):
            continue
        annotation = _type_text(field.annotation)
        default = "required" if field.is_required() else f"default {field.default!r}"
        lines.append(f"  {name}: {annotation}, {default}" + (f" — {field.description}" if field.description else ""))
    return "\n".join(lines) + "\n"


def _thread_count(text: str) -> int:
    """--threads: a positive whole number."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


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
    p.add_argument("--threads", type=_thread_count, default=0, help="plan for this many worker threads (default: as `run`)")
    p = verb("graph", cmd_graph, "print the op graph", json_flag=False)
    p.add_argument("file")
    p.add_argument("--format", choices=("dot", "mermaid"), default="dot")
    p = verb("fmt", cmd_fmt, "rewrite a recipe in canonical layout, keeping comments", json_flag=False)
    p.add_argument("file")
    p.add_argument("--check", action="store_true", help="exit 1 if the file is not formatted; change nothing")
    p.add_argument("--stdout", action="store_true", help="print the formatted recipe instead of rewriting it")
    p = verb("explain", cmd_explain, "explain a diagnostic code or an op (or list `ops` or `codes`)", json_flag=False)
    p.add_argument("code")
    p.add_argument("--markdown", action="store_true", help="with `ops` or `codes`: the README's table")

    def running(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("file")
        p.add_argument("--cache", help="cache directory (default: $RECIPEC_CACHE or .recipec/cache beside the recipe)")
        p.add_argument("--offline", action="store_true", help="never touch the network; hub inputs must be cached")
        p.add_argument("--threads", type=_thread_count, default=0, help="worker threads (default: all cores)")
        return p

    p = running(verb("run", cmd_run, "build the recipe's exports, through the cache, and update the lockfile"))
    p.add_argument("--locked", action="store_true", help="refuse to run if anything pinned in the lockfile drifted")
    p.add_argument("--force", action="store_true",
                   help="export even where a folder recipec did not write is in the way: it is moved aside to "
                        "NAME.replaced-TIME and kept")
    p.add_argument("--launch", metavar="PREFIX",
                   help="run launchable ops (training) under this launcher, e.g. \"accelerate launch "
                        "--num_processes 2\"; it is followed by `-m recipec.backends.worker SPEC`")
    p.add_argument("--log-with", metavar="TRACKERS",
                   help="also log training metrics to accelerate trackers, e.g. tensorboard or wandb,tensorboard "
                        "(TensorBoard writes under runs/ beside the recipe)")
    running(verb("lock", cmd_lock, "resolve inputs, build into the cache and write FILE.lock", json_flag=False))
    running(verb("verify", cmd_verify, "rebuild from scratch and compare byte for byte with the lock and outputs",
                 json_flag=False))
    _inspect_parser(verb("inspect", cmd_inspect, "count, run and time a model folder: the `stats` report, no recipe "
                                                 "needed"))
    _cache_parser(verb("cache", cmd_cache, "list, check and prune the cache", json_flag=False))
    return parser


def _count_at_least(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {least}, got {text!r}")
        return value
    return parse


def _inspect_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a model folder (config.json and safetensors weights)")
    # Defaults are the `stats` op's (`recipec explain ops`), filled in by cmd_inspect, so they live in one place.
    for name, least, what in (("seq_len", 1, "tokens of each measured prefill"),
                              ("batch", 1, "sequences run together"),
                              ("threads", 1, "torch threads latency is measured with"),
                              ("repeats", 1, "timed runs after one warm-up (the median is reported)"),
                              ("decode_tokens", 0, "tokens decoded one at a time after each prefill")):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_count_at_least(least), help=what)


def _cache_parser(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_: str, file_help: str | None) -> argparse.ArgumentParser:
        q = actions.add_parser(name, help=help_, description=help_)
        if file_help:
            q.add_argument("file", nargs="?", help=file_help)
        q.add_argument("--cache", help="cache directory (default: $RECIPEC_CACHE, else .recipec/cache beside "
                                       "FILE, or in the working directory without FILE)")
        return q

    action("ls", "list the objects FILE's lockfile uses, or without FILE every object and the recipes using it",
           "a recipe; its lockfile says which objects it uses")
    q = action("gc", "remove every object that no registered lockfile uses, and leftovers of killed runs",
               "a recipe whose lockfile is kept as a root too (and whose directory locates the cache)")
    q.add_argument("--dry-run", action="store_true", help="show what would be removed; change nothing")
    q.add_argument("--checkpoints", action="store_true",
                   help="also remove checkpoints of unfinished builds no lockfile uses (never a running one's)")
    q.add_argument("--forget-missing", action="store_true",
                   help="also remove, at once, what registered lockfiles that are not there used (kept 30 days "
                        "after their last run otherwise: a project may have moved, or its first run been killed)")
    q = action("verify", "re-hash every file of every object against the sha256 recorded when it was built",
               "a recipe (locates the cache)")
    q.add_argument("--threads", type=_thread_count, default=0, help="hashing threads (default: all cores)")
    action("rm", "remove objects by key (or a unique prefix, as `cache ls` shows)", None).add_argument(
        "keys", nargs="+", metavar="KEY")


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
    except BrokenPipeError:  # `recipec cache ls | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush has nowhere to fail
        return 141
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
    code = main()
    # The interpreter's last collections would walk every object torch and transformers made, a second
    # of one core on a 2-core machine, to find nothing: what a command wrote is durable by now, and no
    # finalizer of ours waits on a collection (a frozen object still goes when its last reference does).
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
