"""Reproducibility checks against the lockfile: `run --locked` (refuse on drift) and `recipec verify`
(rebuild from scratch and compare byte for byte)."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from .diagnostics import Diagnostic, RecipeError
from .engine import Engine, RunOptions
from .ir.lower import Program
from .store.filehash import hash_file
from .store.lockfile import lock_path, read_lock
from .store.safetensors_header import HeaderError, read_header


def _load(recipe: Path) -> dict:
    try:
        lock = read_lock(lock_path(recipe))
    except ValueError as err:
        raise RecipeError([Diagnostic("E506", str(err), path=str(lock_path(recipe)))]) from None
    if lock is None:
        raise RecipeError([Diagnostic("E508", f"no lockfile {lock_path(recipe)}", path=str(recipe),
                                      hint=f"create it with `recipec lock {recipe}`")])
    return lock


def _drift(recipe: Path, what: str, hint: str = "run `recipec lock` to accept the change, or restore it") -> Diagnostic:
    return Diagnostic("E506", f"{what} differs from {lock_path(recipe).name}", path=str(recipe), hint=hint)


def check_locked(engine: Engine) -> None:
    """Refuse (E506) when the recipe, the toolchain or any input no longer matches the lockfile."""
    recipe = engine.recipe
    lock = _load(recipe)
    current = engine.lock_data([], [])
    problems = []
    if lock.get("recipe", {}).get("sha256") != current["recipe"]["sha256"]:
        problems.append(_drift(recipe, "the recipe text"))
    for package, version in sorted(lock.get("toolchain", {}).items()):
        if current["toolchain"].get(package) != version:
            problems.append(_drift(recipe, f"the toolchain: {package} {current['toolchain'].get(package)} "
                                           f"(locked {version})", "install the locked versions, or re-lock"))
    hashing = Engine(engine.program, recipe, replace(engine.options, hash_input_files=True))
    with engine.cache.locked():
        for node in engine.program.graph.reachable():
            locked = lock.get("inputs", {}).get(node.label)
            if node.op not in ("load", "hf"):
                continue
            if locked is None:
                problems.append(_drift(recipe, f"input `{node.label}` (not in the lock)"))
                continue
            result = hashing._resolve_input(node)
            files = {f["name"]: f for f in result.resolved.get("files", [])}
            for entry in locked.get("files", []):
                now = files.get(entry["name"])
                if now is None or now["size"] != entry["size"] or now["sha256"] != entry["sha256"]:
                    problems.append(_drift(recipe, f"input `{node.label}` file {entry['name']}"))
                    break
            else:
                if result.artifact.digest != locked.get("digest"):
                    problems.append(_drift(recipe, f"input `{node.label}` content"))
    if problems:
        raise RecipeError(problems)


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


def compare_dirs(expected: Path, actual: Path) -> str | None:
    """None when two release directories are byte-identical; else the first difference, named."""
    names = sorted({p.name for p in expected.iterdir()} | {p.name for p in actual.iterdir()})
    for name in names:
        a, b = expected / name, actual / name
        if not a.exists() or not b.exists():
            return f"{name} is only in {'the rebuild' if b.exists() else 'the existing output'}"
        if hash_file(a) != hash_file(b):
            tensor = _first_tensor_difference(a, b) if name.endswith(".safetensors") else None
            return f"{name} differs" + (f", first at tensor `{tensor}`" if tensor else "")
    return None


def verify(recipe: Path, program: Program, options: RunOptions) -> int:
    """Rebuild everything in a fresh cache and compare with the lockfile and the existing outputs."""
    lock = _load(recipe)
    problems = []
    with tempfile.TemporaryDirectory(prefix="recipec-verify-") as scratch:
        rebuilt_outputs = Path(scratch) / "outputs"
        graph = program.graph
        originals = list(graph.exports)
        graph.exports = [replace(e, path=rebuilt_outputs / f"{k}-{e.path.name}") for k, e in enumerate(originals)]
        try:
            engine = Engine(program, recipe, replace(options, cache_dir=Path(scratch) / "cache"))
            result = engine.run()
        finally:
            graph.exports = originals
        for r in result.results:
            locked = (lock.get("nodes", {}).get(r.node.label) or lock.get("inputs", {}).get(r.node.label) or {})
            if r.artifact is not None and locked.get("digest") not in (None, r.artifact.digest):
                problems.append(f"`{r.node.label}` rebuilt to {r.artifact.digest}, the lock says {locked['digest']}")
        for export, rebuilt in zip(originals, result.exports):
            if export.path.is_dir():
                difference = compare_dirs(export.path, Path(rebuilt["resolved"]))
                if difference:
                    problems.append(f"{export.display}: {difference}")
            else:
                sys.stderr.write(f"recipec: {export.display} does not exist; compared with the lock only\n")
    if problems:
        raise RecipeError([Diagnostic("E507", p, path=str(recipe)) for p in problems])
    sys.stderr.write(f"verified: {len(result.results)} nodes and {len(originals)} exports match, byte for byte\n")
    return 0
