"""Reproducibility checks against the lockfile: `run --locked` refuses on any drift (E506), and
`recipec verify` rebuilds from scratch and compares with the lock and the files on disk (E507).

Both compare the same things in the same order, so the first difference named is the cause, not a
consequence: the recipe text and the toolchain, then the inputs (by file), every node's key and
digest in plan order, and every output's files (the card and SHA256SUMS last, since they change
whenever anything else does). A file that holds measurements (a report's times; its kind says which and
where) is compared by its reproducible part, the measured values masked; the measured values themselves
are only checked to be there and well formed, and `verify` says so.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from .artifacts import ArtifactError, ArtifactKind, artifact_kind
from .diagnostics import Diagnostic, RecipeError
from .engine import Engine, RunOptions
from .check import Program
from .ops import REGISTRY
from .store.filehash import hash_file
from .store.lockfile import LockError, input_drift, lock_path, node_drift, output_drift, read_lock, release_order
from .store.release import SUMS, reproducible_hashes
from .store.safetensors_header import HeaderError, read_header

_RELOCK = "run `recipec lock` to accept the change, or restore it"


def load_lock(recipe: Path) -> dict:
    """The recipe's lockfile, validated; E520 when it cannot be used, E508 when there is none."""
    try:
        lock = read_lock(lock_path(recipe))
    except LockError as err:
        raise RecipeError([Diagnostic("E520", str(err), path=str(lock_path(recipe)),
                                      hint=f"recreate it with `recipec lock {recipe}`")]) from None
    if lock is None:
        raise RecipeError([Diagnostic("E508", f"no lockfile {lock_path(recipe)}", path=str(recipe),
                                      hint=f"create it with `recipec lock {recipe}`")])
    return lock


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def pinned_drift(lock: dict, current: dict) -> list[tuple[str, str]]:
    """(what, hint) for the recipe text and each toolchain package that differ from the lock."""
    found = []
    if lock["recipe"]["sha256"] != current["recipe"]["sha256"]:
        found.append(("the recipe text", _RELOCK))
    for package in sorted(set(lock["toolchain"]) | set(current["toolchain"])):
        locked, now = lock["toolchain"].get(package), current["toolchain"].get(package)
        if locked != now:
            found.append((f"the toolchain: {package} {now} (locked {locked})",
                          "install the locked versions, or re-lock"))
    return found


def inputs_drift(lock: dict, current: dict, shown: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(label, what) for each input that differs from the lock, in plan order, then inputs only the lock
    has; an input is named as `shown` says (an unbound one by its call, not its plan id)."""
    shown = shown or {}
    found = []
    for label, entry in current.items():
        locked = lock.get(label)
        name = shown.get(label, label)
        drift = f"input `{name}` (not in the lock)" if locked is None else input_drift(name, locked, entry)
        if drift:
            found.append((label, drift))
    return found + [(label, f"input `{label}` (in the lock, not in the recipe)") for label in sorted(set(lock) - set(current))]


def check_locked(engine: Engine) -> dict:
    """Before anything is built, refuse (E506) when the recipe, the toolchain, any input or the set of
    nodes no longer matches the lockfile. Returns the lock; the engine checks every node's key before
    building it and its digest after (`RunOptions.locked`)."""
    recipe = engine.recipe
    lock = load_lock(recipe)
    current = engine.lock_data([], [])
    problems = [_drift(recipe, what, hint) for what, hint in pinned_drift(lock, current)]
    hashing = Engine(engine.program, recipe, replace(engine.options, hash_input_files=True))
    reachable = engine.program.graph.reachable()
    with engine.cache.locked(exclusive=False):  # resolving inputs may add a data object, as a run does
        hashing.hub_snapshots = hashing._resolve_hub_inputs()
        resolved = [hashing._resolve_input(n) for n in reachable if not REGISTRY[n.op].builds]
    now = hashing.lock_data(resolved, [])["inputs"]
    inputs = {n.label: n for n in reachable if not REGISTRY[n.op].builds}
    shown = {label: n.written_as for label, n in inputs.items()}
    problems += [_drift(recipe, what, span=inputs[label].spans[0] if label in inputs and inputs[label].spans else None)
                 for label, what in inputs_drift(lock["inputs"], now, shown)]
    built = {n.label for n in reachable if REGISTRY[n.op].builds}
    problems += [_drift(recipe, f"node `{label}` (in the lock, not in the recipe)")
                 for label in sorted(set(lock["nodes"]) - built)]
    if problems:
        raise RecipeError(problems)
    return lock


def _drift(recipe: Path, what: str, hint: str = _RELOCK, span=None) -> Diagnostic:
    """E506: `what` differs from the lock; at `span` (the input's call) where there is one."""
    return Diagnostic("E506", f"{what} differs from {lock_path(recipe).name}", span, hint,
                      path=None if span is not None else str(recipe))


def _first_tensor_difference(a: Path, b: Path) -> str | None:
    try:
        ha, hb = read_header(a), read_header(b)
    except HeaderError:
        return None
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for name in sorted(set(ha.tensors) | set(hb.tensors)):
            ta, tb = ha.tensors.get(name), hb.tensors.get(name)
            if ta is None or tb is None or (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
                return name
            fa.seek(ta.begin)
            fb.seek(tb.begin)
            if fa.read(ta.nbytes) != fb.read(tb.nbytes):
                return name
    return None


def _reproducible(kind: type[ArtifactKind], release: Path) -> dict[str, str]:
    """sha256 of the reproducible part of each file of a release that holds measurements."""
    return reproducible_hashes(release, kind.reproducible_views(release))


def compare_dirs(expected: Path, actual: Path, kind: type[ArtifactKind] = ArtifactKind) -> str | None:
    """None when two release directories are byte-identical, files that hold measurements (the rebuild's
    kind says which) compared by their reproducible part; else the first difference, named (the files that
    cause differences before the card and SHA256SUMS, which follow from them)."""
    names = sorted({p.name for p in expected.iterdir()} | {p.name for p in actual.iterdir()}, key=release_order)
    rebuilt = _reproducible(kind, actual)
    try:
        existing = _reproducible(kind, expected) if rebuilt else {}
    except (ArtifactError, ValueError, OSError) as err:
        return f"its measured values are malformed: {err}"
    for name in names:
        a, b = expected / name, actual / name
        if not a.exists() or not b.exists():
            return f"{name} is only in {'the rebuild' if b.exists() else 'the existing output'}"
        if name in rebuilt:
            if existing.get(name) != rebuilt[name]:
                return f"{name} differs besides its measured values"
        elif hash_file(a) != hash_file(b):
            tensor = _first_tensor_difference(a, b) if name.endswith(".safetensors") else None
            return f"{name} differs" + (f", first at tensor `{tensor}`" if tensor else "")
    return None


def _lock_differences(lock: dict, current: dict) -> list[str]:
    """Everything the rebuild's record disagrees with the lock on, in the order that names causes first."""
    name = "the lock"
    found = [f"{what} differs from {name}" for what, _ in pinned_drift(lock, current)]
    found += [f"{what} differs from {name}" for _, what in inputs_drift(lock["inputs"], current["inputs"])]
    for label, node in current["nodes"].items():
        drift = (node_drift(lock, label, node["key"], None, node.get("params"))
                 or node_drift(lock, label, None, node["digest"]))
        if drift:
            found.append(f"{drift} differs from {name}")
    found += [f"node `{label}` is in the lock, not in the rebuild"
              for label in sorted(set(lock["nodes"]) - set(current["nodes"]))]
    if lock["outputs"]:
        for path, output in current["outputs"].items():
            locked = lock["outputs"].get(path)
            files = {f["name"]: f["sha256"] for f in output["files"]}
            parts = {f["name"]: f["reproducible"] for f in output["files"] if "reproducible" in f}
            drift = (f"output {path} (not in the lock)" if locked is None
                     else output_drift(path, locked, files, parts))
            if drift:
                found.append(f"{drift} differs from {name}")
    return found


def measured_lines(export: dict) -> list[str]:
    """What `verify` did not compare in an export, in words: its files' measured values."""
    held = [name for name in export["reproducible"] if name != SUMS]
    if not held:
        return []
    line = (f"measured, not compared: {export['path']}: the {export['measured']} in {', '.join(sorted(held))} "
            "(checked present and well formed; everything else in them compared byte for byte)")
    return [line]


def verify(recipe: Path, program: Program, options: RunOptions) -> int:
    """Rebuild everything in a fresh cache; compare every node key, node digest and output file hash
    with the lock, and the rebuilt releases with the files on disk. Exits non-zero on any difference."""
    lock = load_lock(recipe)
    graph = program.graph
    originals = list(graph.exports)
    with tempfile.TemporaryDirectory(prefix="recipec-verify-") as scratch:
        rebuilt_outputs = Path(scratch) / "outputs"
        graph.exports = [replace(e, path=rebuilt_outputs / f"{k}-{e.path.name}") for k, e in enumerate(originals)]
        try:
            engine = Engine(program, recipe, replace(options, cache_dir=Path(scratch) / "cache", hash_input_files=True))
            result = engine.run()
        finally:
            graph.exports = originals
        problems = _lock_differences(lock, result.lock)
        on_disk, files = 0, 0
        for export, rebuilt in zip(originals, result.exports):
            if export.path.is_dir():
                on_disk += 1
                kind = artifact_kind(export.node.type.kind)
                difference = compare_dirs(export.path, Path(rebuilt["resolved"]), kind)
                if difference:
                    problems.append(f"{export.display}: {difference}")
            else:
                sys.stderr.write(f"recipec: {export.display} does not exist; compared with the lock only\n")
            if export.path.is_dir() or lock["outputs"]:
                files += len(rebuilt["files"])
    if problems:
        more = len(problems) - 1
        raise RecipeError([Diagnostic("E507", problems[0], path=str(recipe),
                                      hint=f"{_plural(more, 'more difference')} follow from it" if more else None)])
    compared = on_disk if not lock["outputs"] else len(originals)
    against = "the lock" + (" and the files on disk" if on_disk else "")
    exports = f", {_plural(compared, 'export')} ({_plural(files, 'file')})" if compared else ""
    inputs = f", {_plural(len(result.lock['inputs']), 'input')}" if result.lock["inputs"] else ""
    sys.stderr.write(f"verified: {_plural(len(result.lock['nodes']), 'node')}{inputs}{exports} match {against}, "
                     "byte for byte\n")
    for export in result.exports:
        for line in measured_lines(export):
            sys.stderr.write(line + "\n")
    if not lock["outputs"]:
        sys.stderr.write(f"recipec: {lock_path(recipe).name} records no outputs (`recipec run` records them); "
                         + ("exports were compared with the files on disk only\n" if on_disk
                            else "no export was compared\n"))
    return 0
