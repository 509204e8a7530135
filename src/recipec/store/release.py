"""Releases: an `export` written as a Hugging Face directory, atomically.

The directory is assembled in a temporary sibling — the model's files, a model card (`README.md`) whose
front matter names the base models and whose body carries the recipe and its lock digest, and
`SHA256SUMS` — each file fsynced, then swapped into place. A run killed at any point leaves the previous
complete output or none; the next run removes the stale temporary. Runs writing into the same parent
directory take turns through a lock file there.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .atomic import TMP_PREFIX, fsync_dir, remove_stale_temporaries
from .cache import OBJECT_META
from .filehash import hash_file

LOCK_NAME = ".recipec-lock"


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
        "Built by [recipec](https://pypi.org/project/recipec/) from this recipe:", "",
        "```", card.recipe_text.rstrip("\n"), "```", "",
        f"- lock digest: `{card.lock_digest}`",
        f"- model digest: `{card.model_digest}` (sha256 over sorted tensor names, dtypes, shapes and data hashes)",
        "", "`recipec verify` rebuilds this model from the recipe and its lockfile and compares it byte for byte.", "",
    ]
    return "\n".join(front + body)


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Exclusive right to write outputs in `target`'s parent directory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / LOCK_NAME, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        remove_stale_temporaries(target.parent)
        yield


def _copy(source: Path, dest: Path) -> None:
    """A durable copy, in the kernel (no user-space buffer)."""
    with open(source, "rb") as src, open(dest, "wb") as dst:
        remaining = os.fstat(src.fileno()).st_size
        while remaining > 0:
            sent = os.copy_file_range(src.fileno(), dst.fileno(), remaining)
            if sent == 0:
                break
            remaining -= sent
        os.fsync(dst.fileno())
    os.chmod(dest, 0o644)


def _place(source: Path, dest: Path) -> None:
    """A release file: a hard link to the cache's copy where possible (no data written twice), else a copy."""
    try:
        os.link(source, dest)
    except OSError:  # another filesystem, or links not allowed
        _copy(source, dest)


def _write(dest: Path, text: str) -> None:
    with open(dest, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(dest, 0o644)


def write_release(source: Path, target: Path, card: Card, known: dict[str, str] | None = None) -> dict[str, str]:
    """Write the model in `source` to `target` as a release; returns file -> sha256.

    `known` gives the sha256 of source files already hashed (a cache object's); files of a committed
    cache object are linked, others copied and hashed.
    """
    with output_lock(target):
        tmp = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            sums = {}
            for entry in sorted(source.iterdir()):
                if not entry.is_file() or entry.name == OBJECT_META:
                    continue
                if known and entry.name in known:
                    _place(entry, tmp / entry.name)
                    sums[entry.name] = known[entry.name]
                else:
                    _copy(entry, tmp / entry.name)
                    sums[entry.name] = hash_file(tmp / entry.name)
            _write(tmp / "README.md", card_text(card))
            sums["README.md"] = hash_file(tmp / "README.md")
            _write(tmp / "SHA256SUMS", "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())))
            sums["SHA256SUMS"] = hash_file(tmp / "SHA256SUMS")
            os.chmod(tmp, 0o755)
            fsync_dir(tmp)
            _swap_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return sums


def _swap_into_place(new: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.parent / f"{TMP_PREFIX}old-{target.name}-{os.getpid()}"
        os.rename(target, old)
    os.rename(new, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
