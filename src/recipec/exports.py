"""The rules of exports: where a release may be written, and what a release may contain.

An export target is a directory that recipec owns entirely: every run may replace it. So it must be
disjoint from every place the build reads or keeps — not equal to, inside or above a recipe file, an
input, the cache or another export. The recipe's directory is the one place a target may lie inside
(that is where `out/` lives) but never be, nor be above. A relative path means a place inside the
recipe's directory; a recipe that means a place outside it says so with an absolute path. Paths are
judged after resolving symlinks, by where they point, and by identity where they exist (one folder under
two names: a bind mount, a case-insensitive filesystem).

What a release may contain is `recipec.store.release_files`'s to say.

Functions over paths (a stat at most) and small JSON files; no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePath

from .ops import REGISTRY
from .store.lockfile import lock_path



@dataclass(frozen=True)
class Place:
    """Somewhere an export must not destroy: `path` resolved, `what` as a message names it."""

    path: Path
    what: str
    may_contain_exports: bool = False  # only the recipe's directory


@dataclass(frozen=True)
class Problem:
    code: str
    message: str
    hint: str


def is_within(path: Path, other: Path) -> bool:
    """Whether `path` is `other` or lies inside it (both resolved): by name, and where they exist by
    identity, as a bind mount or a case-insensitive filesystem gives one folder two names."""
    if path == other or other in path.parents:
        return True
    try:
        wanted = other.stat()
    except OSError:
        return False
    for candidate in (path, *path.parents):
        try:
            found = candidate.stat()
        except OSError:
            continue
        if (found.st_dev, found.st_ino) == (wanted.st_dev, wanted.st_ino):
            return True
    return False


def same_place(path: Path, other: Path) -> bool:
    """Whether two resolved paths are one place: by name, or where both exist, by identity."""
    try:
        return path == other or (path.exists() and other.exists() and os.path.samefile(path, other))
    except OSError:
        return False


def written_problem(written: str) -> Problem | None:
    """What is wrong with an export path as the recipe wrote it, before it means any place."""
    if not written.strip():
        return Problem("E312", "an export path is empty",
                       "name a directory for the release, e.g. \"out/model\"")
    parts = PurePath(os.path.normpath(written)).parts
    if not PurePath(written).is_absolute() and parts and parts[0] == "..":
        return Problem("E312", f"export path {written!r} leaves the recipe's directory",
                       "relative paths stay inside the recipe's directory; to mean a place outside it, "
                       "write an absolute path")
    return None


# Suffixes of single-file model formats recipec does not write. A target ending in one is a mistake (the
# user expects that format), not the name of a directory; `.onnx` names the ONNX format.
SUFFIX_FORMATS = {".onnx": "onnx"}
FOREIGN_SUFFIXES = (".gguf", ".ggml", ".bin", ".pt", ".pth", ".ckpt", ".safetensors", ".tflite", ".ort",
                    ".mlmodel", ".mlpackage", ".h5", ".keras", ".pb", ".engine", ".trt")


def suffix_format(written: str) -> str | None:
    """The format an export path's suffix names (`out/m.onnx` -> "onnx"), or None."""
    return SUFFIX_FORMATS.get(PurePath(written).suffix.lower())


def format_problem(written: str, asked: str | None, known: list[str]) -> Problem | None:
    """What is wrong with the format an export asks for (`as NAME`) or its path's suffix implies."""
    if asked is not None and asked not in known:
        return Problem("E468", f"unknown export format `{asked}`",
                       "recipec exports as " + ", ".join(f"`{f}`" for f in known))
    suffix = PurePath(written).suffix.lower()
    if asked is None and suffix in FOREIGN_SUFFIXES:
        return Problem("E468", f"recipec cannot write `{suffix}` files: export path {written!r} names a format "
                       "it does not know",
                       "export to a directory (\"out/name\", a Hugging Face model) or to \"out/name.onnx\" "
                       "(ONNX); other formats are converted from those by their own tools")
    return None


def place_problem(target: Path, written: str, place: Place) -> Problem | None:
    """What an export to `target` would destroy of `place`, if anything."""
    if is_within(place.path, target):
        whole = "" if same_place(place.path, target) else ", which is inside it"
        return Problem("E310", f"export to {written!r} would replace {place.what}{whole}", _hint(place))
    if is_within(target, place.path) and not place.may_contain_exports:
        return Problem("E310", f"export to {written!r} writes inside {place.what}", _hint(place))
    return None


def _hint(place: Place) -> str:
    if place.may_contain_exports:
        return "export into a directory of its own inside it, e.g. \"out/model\""
    return "export to a directory of its own, e.g. \"out/model\"; recipec never writes over what a build reads"


def overlap_problem(written: str, target: Path, other_written: str, other: Path) -> Problem | None:
    """Two exports whose targets are one inside the other (the same path is E306)."""
    if target != other and (is_within(target, other) or is_within(other, target)):
        inner, outer = (written, other_written) if is_within(target, other) else (other_written, written)
        where = "is the same folder as" if same_place(target, other) else "is inside"
        return Problem("E311", f"exports overlap: {inner!r} {where} {outer!r}",
                       "give each export a directory of its own, side by side: \"out/a\", \"out/b\"")
    return None


def recipe_places(recipe: Path, used: list[Path], cache: Path) -> list[Place]:
    """The recipe's directory, every recipe file it reads, its lockfile, and the cache."""
    places = [Place(recipe.resolve().parent, "the recipe's directory", may_contain_exports=True)]
    places += [Place(p.resolve(), f"the recipe {p.name}") for p in [recipe, *used]]
    places.append(Place(lock_path(recipe).resolve(), f"the lockfile {lock_path(recipe).name}"))
    return places + [cache_place(cache)]


def cache_place(cache: Path) -> Place:
    return Place(cache.resolve(), f"the cache ({cache})")


def input_dir(op: str, params: dict, recipe_dir: Path) -> Path | None:
    """The model directory an input op reads (`load`, `hf` found in the hub cache), from its own hook."""
    return REGISTRY[op].source_dir(params, recipe_dir)


def input_places(op: str, label: str, params: dict, recipe_dir: Path) -> list[Path]:
    """The files and directories a node reads, from its parameters."""
    paths = REGISTRY[op].read_places(params, recipe_dir)
    for value in params.values():
        if isinstance(value, dict) and isinstance(value.get("path"), str):  # a tokenizer, a chat template
            paths.append(recipe_dir / value["path"])
    paths += [recipe_dir / f for f in params.get("files") or () if isinstance(f, str)]  # a corpus's files
    return [Place(p.resolve(), f"an input of `{label}` ({shown(p.resolve(), recipe_dir)})") for p in paths]


def shown(path: Path, recipe_dir: Path) -> str:
    try:
        return str(path.relative_to(recipe_dir.resolve()))
    except ValueError:
        return str(path)


def leaves(node) -> list:
    """The source nodes (those without inputs) a graph node is built from, each once, in id order."""
    found = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if not n.inputs:
            found[n.id] = n
        stack.extend(n.inputs)
    return [found[i] for i in sorted(found)]


def keeps_code_references(node) -> bool:
    """Whether a release of `node` keeps code references: when the recipe asked, on one of its inputs."""
    return any(leaf.params.get("remote_code") for leaf in leaves(node))


