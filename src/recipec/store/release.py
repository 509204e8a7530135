"""Releases: an `export` written as a Hugging Face directory, atomically, never over anything else.

The directory is assembled in a temporary sibling — the model's data files (only those a release may
hold, see `release_files`), a model card (`README.md`) whose front matter names the base models and
whose body carries the recipe and its lock digest, the marker `.recipec-release`, and `SHA256SUMS` —
each file fsynced, then swapped into place. A run killed at any point leaves the previous complete
output or none; the next run removes the stale temporary. Runs writing into the same parent directory
take turns through a lock on that directory itself, which leaves no file behind.

What is at the target decides what may happen to it: nothing, or an empty directory, is simply
replaced; a release recipec wrote (it has the marker) is replaced and then removed; anything else is
refused, unless the user forces it, and then it is moved aside and kept, never deleted. A file is
never replaced. Small files users edit are copied; weights may be hard links shared with the cache,
so they are made read-only.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .atomic import TMP_PREFIX, fsync_dir, remove_stale_temporaries
from . import release_files
from .filehash import hash_file

MARKER = ".recipec-release"
MARKER_FORMAT = 1
EDITABLE_MODE, SHARED_MODE = 0o644, 0o444  # copies are the user's to edit; shared weights are not


@dataclass(frozen=True)
class Card:
    base_models: tuple[str, ...]
    relation: str  # "merge", "finetune", "quantized", "adapter" (the hub's base_model_relation)
    recipe_name: str
    recipe_text: str
    lock_digest: str
    model_digest: str


def card_text(card: Card) -> str:
    front = ["---"]
    if card.base_models:
        front.append("base_model:")
        front += [f"- {m}" for m in card.base_models]
        front.append(f"base_model_relation: {card.relation}")
    front += ["tags:", "- recipec", "---", ""]
    body = [
        f"# {card.recipe_name}", "",
        "Built by recipec from this recipe:", "",
        "```", card.recipe_text.rstrip("\n"), "```", "",
        f"- lock digest: `{card.lock_digest}`",
        f"- model digest: `{card.model_digest}` (covers every tensor and every data file: config, tokenizer, chat template)",
        "", "`recipec verify` rebuilds this model from the recipe and its lockfile and compares it byte for byte.", "",
    ]
    return "\n".join(front + body)


class TargetRefused(Exception):
    """An export target that holds something recipec may not replace; carries a code and a hint."""

    def __init__(self, code: str, message: str, hint: str):
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint


def marker_text(card: Card) -> str:
    """The marker that makes a directory recognizable as a release recipec wrote (deterministic)."""
    marker = {"format": MARKER_FORMAT, "recipe": card.recipe_name, "model_digest": card.model_digest}
    return json.dumps(marker, indent=2, sort_keys=True) + "\n"


def is_release(path: Path) -> bool:
    """Whether `path` is a directory holding recipec's release marker (never guessed from other files)."""
    marker = path / MARKER
    if path.is_symlink() or not path.is_dir() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == MARKER_FORMAT


def target_state(target: Path) -> str:
    """What is at an export target: absent, empty, release, file, or other (anything recipec did not write)."""
    blocking_file = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking_file is not None or (target.exists() and not target.is_dir() and not target.is_symlink()):
        return "file"
    if not os.path.lexists(target):
        return "absent"
    if is_release(target):
        return "release"
    if not target.is_symlink() and not any(target.iterdir()):
        return "empty"
    return "other"


def check_target(target: Path, force: bool) -> None:
    """Refuse (TargetRefused) a target whose content recipec may not replace."""
    state = target_state(target)
    if state == "file":
        raise TargetRefused("E511", f"cannot export to {target}: a file is in the way",
                            "recipec never turns a file into a folder: move or remove the file, "
                            "or export to another path")
    if state == "other" and not force:
        raise TargetRefused("E510", f"{target} already exists and is not a release recipec wrote",
                            f"recipec replaces only its own releases (those holding `{MARKER}`): export to "
                            "another path, move it away, or run with --force to move it aside (it is kept)")


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Exclusive right to write outputs in `target`'s parent directory: a lock on the directory
    itself, so that nothing is left behind in it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        remove_stale_temporaries(target.parent, target.name)
        yield
    finally:
        os.close(fd)


def _copy(source: Path, dest: Path, mode: int = EDITABLE_MODE) -> None:
    """A durable copy, in the kernel (no user-space buffer)."""
    with open(source, "rb") as src, open(dest, "wb") as dst:
        remaining = os.fstat(src.fileno()).st_size
        while remaining > 0:
            sent = os.copy_file_range(src.fileno(), dst.fileno(), remaining)
            if sent == 0:
                break
            remaining -= sent
        os.fsync(dst.fileno())
    os.chmod(dest, mode)


def _place(source: Path, dest: Path) -> None:
    """A weight file: a read-only hard link to the cache's copy where possible (no data written twice),
    else a read-only copy. Read-only, because an edit in place would change the cache and every release."""
    try:
        os.link(source, dest)
        os.chmod(dest, SHARED_MODE)
    except OSError:  # another filesystem, or links not allowed
        _copy(source, dest, SHARED_MODE)


def _write(dest: Path, text: str) -> None:
    with open(dest, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(dest, EDITABLE_MODE)


def _without_code(source: Path) -> str | None:
    """A config file's text with its code references removed, or None when it has none."""
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not release_files.code_references(data):
        return None
    return json.dumps(release_files.without_code_references(data), indent=2, ensure_ascii=False) + "\n"


def _release_file(entry: Path, dest: Path, shared: bool, keep_code: bool) -> bool:
    """Put one data file into the release; returns whether its bytes are the source's."""
    if release_files.is_weight_file(entry.name):
        if shared:
            _place(entry, dest)
        else:
            _copy(entry, dest, SHARED_MODE)
        return True
    stripped = None if keep_code or entry.name not in release_files.CODE_FILES else _without_code(entry)
    if stripped is not None:
        _write(dest, stripped)
        return False
    _copy(entry, dest)
    return True


def write_release(source: Path, target: Path, card: Card, known: dict[str, str] | None = None,
                  keep_code: bool = False, force: bool = False) -> tuple[dict[str, str], Path | None]:
    """Write the model in `source` to `target` as a release; returns (file -> sha256, where the target's
    previous content was moved aside, if it was).

    `known` gives the sha256 of source files already hashed (a cache object's); weights of a committed
    cache object are linked, other files copied. Only release data files are taken from `source`, and
    code references are removed from configs unless `keep_code`. Raises TargetRefused.
    """
    with output_lock(target):
        check_target(target, force)  # again, under the lock: the target may have changed since the plan
        tmp = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            sums = {}
            for entry in sorted(source.iterdir()):
                if not entry.is_file() or not release_files.is_release_file(entry.name):
                    continue
                same = _release_file(entry, tmp / entry.name, bool(known and entry.name in known), keep_code)
                sums[entry.name] = known[entry.name] if same and known and entry.name in known else hash_file(
                    tmp / entry.name)
            for name, text in (("README.md", card_text(card)), (MARKER, marker_text(card))):
                _write(tmp / name, text)
                sums[name] = hash_file(tmp / name)
            _write(tmp / "SHA256SUMS", "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())))
            sums["SHA256SUMS"] = hash_file(tmp / "SHA256SUMS")
            os.chmod(tmp, 0o755)
            fsync_dir(tmp)
            aside = _move_aside(target) if target_state(target) == "other" else None
            _swap_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return sums, aside


def _move_aside(target: Path) -> Path:
    """Rename what is at `target` to a sibling that says what happened; it is kept, never deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = target.with_name(f"{target.name}.replaced-{stamp}")
    n = 1
    while os.path.lexists(aside):
        n += 1
        aside = target.with_name(f"{target.name}.replaced-{stamp}-{n}")
    os.rename(target, aside)
    return aside


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename the finished release to `target`. Only recipec's own previous release is removed; an
    empty directory is replaced by the rename itself, and anything else makes the rename fail."""
    old = None
    if is_release(target):
        old = target.parent / f"{TMP_PREFIX}old-{target.name}-{os.getpid()}"
        os.rename(target, old)
    os.rename(new, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
