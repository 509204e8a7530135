"""Releases: an `export` written as a directory, atomically, never over anything else.

What a release holds is its artifact kind's to say (recipec/artifacts: a model's data files and card,
a report's pages); this module writes it. The directory is assembled in a temporary sibling — those
files, the marker `.recipec-release`, and `SHA256SUMS` — each file fsynced, then swapped into place. A
run killed at any point leaves the previous complete output or none; the next run removes the stale
temporary. Runs writing into the same parent directory take turns through a lock on that directory
itself, which leaves no file behind.

What is at the target decides what may happen to it: nothing, or an empty directory, is simply
replaced; a release recipec wrote (it has the marker), as it wrote it, is replaced and then removed; a
release someone added files to or edited since, or anything else, is refused unless the user forces it,
and then it is moved aside and kept, never deleted. A file is never replaced. Small files users edit
are copied; weights may be hard links shared with the cache, so they are made read-only.

A release whose kind says some files hold measurements (a report's times) is compared by the reproducible
part of those files (`reproducible_hashes`); `SHA256SUMS` then holds one such part too, its other lines.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import locks
from .atomic import TMP_PREFIX, alive_elsewhere, fsync_dir, remove_stale_temporaries
from .filehash import hash_file

MARKER = ".recipec-release"
SUMS = "SHA256SUMS"
MARKER_FORMAT = 1
EDITABLE_MODE, SHARED_MODE = 0o644, 0o444  # copies are the user's to edit; shared weights are not
# How the kernel says it cannot copy between these two files (across filesystems, a filesystem without the
# call): the next way of copying is tried.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


@dataclass(frozen=True)
class ReleaseFile:
    """One file of a release: copied from `source`, or written from `text`."""

    name: str
    source: Path | None = None
    text: str | None = None
    shared: bool = False  # a read-only hard link to `source` where possible (a committed cache object's file)
    read_only: bool = False  # weights: an edit in place would change the cache and every release
    sha256: str | None = None  # of `source`'s bytes, when already known


class TargetRefused(Exception):
    """An export target that holds something recipec may not replace; carries a code and a hint."""

    def __init__(self, code: str, message: str, hint: str):
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint


def marker_text(recipe_name: str, digest: str) -> str:
    """The marker that makes a directory recognizable as a release recipec wrote (deterministic)."""
    marker = {"format": MARKER_FORMAT, "recipe": recipe_name, "model_digest": digest}
    return json.dumps(marker, indent=2, sort_keys=True) + "\n"


def release_recipe(path: Path) -> str | None:
    """The name of the recipe whose release is at `path` (its marker says), or None if none is there."""
    if not is_release(path):
        return None
    recipe = json.loads((path / MARKER).read_text(encoding="utf-8")).get("recipe")
    return recipe if isinstance(recipe, str) else None


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


def release_changes(release: Path, sources: dict[str, Path] | None = None) -> list[str]:
    """What was done to a release since recipec wrote it, as "NAME added" / "NAME changed": files its
    SHA256SUMS does not list (a missing SHA256SUMS says nothing is known), and listed files whose bytes
    differ from it. A writable file (configs, tokenizer, card: small) is hashed. A read-only one (weights)
    is hashed only when it may have changed, since hashing gigabytes on every rerun would cost more than
    it protects: with `sources` (name -> the cache file the new release takes it from), not when it is that
    very file (a hard link); and not when its inode changed no later than SHA256SUMS, which recipec writes
    last (a write, a chmod or a file moved in all change an inode's ctime, which no one can set back). A
    file removed is not a change that loses anyone's work."""
    try:
        sums = (release / SUMS).read_text(encoding="utf-8")
        listed = {name: digest for name, digest, _ in _sums_lines(sums)}
        written = (release / SUMS).stat().st_ctime_ns
    except (OSError, UnicodeDecodeError, ValueError):
        return [f"{SUMS} missing or unreadable"]
    changes = []
    for entry in sorted(os.scandir(release), key=lambda e: e.name):
        if entry.name == SUMS:
            continue
        if entry.name not in listed:
            changes.append(f"{entry.name} added")
        elif entry.is_symlink() or not entry.is_file():
            changes.append(f"{entry.name} changed")
        elif _may_differ(entry, written, (sources or {}).get(entry.name), deep=sources is not None) and \
                hash_file(Path(entry.path)) != listed[entry.name]:
            changes.append(f"{entry.name} changed")
    return changes


def _may_differ(entry: os.DirEntry, written: int, source: Path | None, deep: bool) -> bool:
    """Whether a listed release file must be hashed to know it is as released (see `release_changes`);
    read-only files only when `deep`, as writing the release does (check time takes them as written)."""
    st = entry.stat()
    if st.st_mode & 0o222:
        return True
    if not deep:
        return False
    if source is not None:
        try:
            theirs = source.stat()
            if (theirs.st_dev, theirs.st_ino) == (st.st_dev, st.st_ino):
                return False
        except OSError:
            pass
    return st.st_ctime_ns > written


def _sums_lines(text: str) -> Iterator[tuple[str, str, str]]:
    """(name, sha256, the line itself) for each line of a SHA256SUMS file; ValueError on a line of
    another shape."""
    for line in text.splitlines(keepends=True):
        digest, sep, name = line.rstrip("\n").partition("  ")
        if not sep:
            raise ValueError(f"{SUMS}: a line is not `SHA256  NAME`")
        yield name, digest, line


def target_state(target: Path, sources: dict[str, Path] | None = None) -> str:
    """What is at an export target: absent, empty, release (as recipec wrote it), changed (a release
    with files added or edited since; `sources` as for `release_changes`), file, or other (anything recipec
    did not write). Raises OSError when the target cannot be inspected."""
    blocking_file = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking_file is not None or (target.exists() and not target.is_dir() and not target.is_symlink()):
        return "file"
    if not os.path.lexists(target):
        return "absent"
    if is_release(target):
        return "changed" if release_changes(target, sources) else "release"
    if not target.is_symlink() and not any(target.iterdir()):
        return "empty"
    return "other"


def check_target(target: Path, force: bool, sources: dict[str, Path] | None = None) -> str:
    """What is at `target` (see `target_state`); raises TargetRefused when recipec may not replace it."""
    try:
        state = target_state(target, sources)
    except OSError as err:
        raise TargetRefused("E504", f"cannot export to {target}: {os.strerror(err.errno or 0)} "
                            f"({err.filename or target})",
                            "check the permissions of the export path and the folders above it") from None
    if state == "file":
        raise TargetRefused("E511", f"cannot export to {target}: a file is in the way",
                            "recipec never turns a file into a folder: move or remove the file, "
                            "or export to another path")
    if state == "other" and not force:
        raise TargetRefused("E510", f"{target} already exists and is not a release recipec wrote",
                            f"recipec replaces only its own releases (those holding `{MARKER}`): export to "
                            "another path, move it away, or run with --force to move it aside (it is kept)")
    if state == "changed" and not force:
        changes = release_changes(target, sources)
        shown = ", ".join(changes[:4]) + (f" and {len(changes) - 4} more" if len(changes) > 4 else "")
        raise TargetRefused("E512", f"{target} is a release recipec wrote, but changed since: {shown}",
                            "recipec replaces only its releases as it wrote them: move your files out of it, "
                            "or run with --force to move it aside (it is kept)")
    return state


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Exclusive right to write outputs in `target`'s parent directory: a lock on the directory
    itself, so that nothing is left behind in it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        locks.lock(fd, fcntl.LOCK_EX, target.parent, f"waiting for another run exporting to {target.parent}")
        _recover_interrupted_swaps(target)
        remove_stale_temporaries(target.parent, target.name)
        yield
    finally:
        os.close(fd)


def _copy(source: Path, dest: Path, mode: int = EDITABLE_MODE) -> None:
    """A durable copy: in the kernel where it can (copy_file_range, which may share blocks and works within
    a filesystem; sendfile, which works across them on Linux), else through a buffer (macOS)."""
    with open(source, "rb") as src, open(dest, "wb") as dst:
        size, offset = os.fstat(src.fileno()).st_size, 0
        for copy in _KERNEL_COPIES:
            try:
                while offset < size and (sent := copy(src.fileno(), dst.fileno(), offset, size - offset)):
                    offset += sent
                break
            except OSError as err:
                if err.errno not in _NO_KERNEL_COPY:
                    raise
        if offset < size:
            src.seek(offset)
            dst.seek(offset)
            shutil.copyfileobj(src, dst, 16 << 20)
        os.fsync(dst.fileno())
    os.chmod(dest, mode)


def _copy_range(src: int, dst: int, offset: int, count: int) -> int:
    return os.copy_file_range(src, dst, count, offset, offset)


def _send(src: int, dst: int, offset: int, count: int) -> int:
    os.lseek(dst, offset, os.SEEK_SET)  # sendfile writes at the file's position, copy_file_range did not move
    return os.sendfile(dst, src, offset, count)


_KERNEL_COPIES = [copy for copy, call in ((_copy_range, "copy_file_range"), (_send, "sendfile"))
                  if hasattr(os, call) and (call != "sendfile" or sys.platform.startswith("linux"))]


def _place(source: Path, dest: Path) -> None:
    """A weight file: a read-only hard link to the cache's copy where possible (no data written twice),
    else a read-only copy. Read-only, because an edit in place would change the cache and every release."""
    try:
        os.link(source, dest)
    except OSError:  # another filesystem, or links not allowed
        _copy(source, dest, SHARED_MODE)
        return
    try:
        os.chmod(dest, SHARED_MODE)
    except OSError:  # not the file's owner (root squashed, someone else's cache): a copy of our own instead,
        dest.unlink()  # never written through the link, which is the cache's file
        _copy(source, dest, SHARED_MODE)


def _write(dest: Path, text: str) -> None:
    with open(dest, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(dest, EDITABLE_MODE)


def _put(file: ReleaseFile, dest: Path) -> str:
    """Write one release file; returns its sha256 (known, when its bytes are the source's)."""
    if file.text is not None:
        _write(dest, file.text)
        return hash_file(dest)
    mode = SHARED_MODE if file.read_only or file.shared else EDITABLE_MODE
    if file.shared:
        _place(file.source, dest)
    else:
        _copy(file.source, dest, mode)
    return file.sha256 or hash_file(dest)


def write_release(files: list[ReleaseFile], target: Path, recipe_name: str, digest: str, force: bool = False,
                  accept: Callable[[Path, dict[str, str]], None] | None = None) -> tuple[dict[str, str], Path | None]:
    """Write `files` to `target` as a release of the artifact with `digest`; returns (file -> sha256,
    where the target's previous content was moved aside, if it was). Raises TargetRefused. `accept(release,
    sums)` sees the finished release before it replaces anything: what it raises leaves the target as it was."""
    with output_lock(target):
        sources = {f.name: f.source for f in files if f.source is not None}
        state = check_target(target, force, sources)  # again, under the lock, weights too: it may have changed
        tmp = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            sums = {}
            for file in [*files, ReleaseFile(MARKER, text=marker_text(recipe_name, digest))]:
                sums[file.name] = _put(file, tmp / file.name)
            _write(tmp / SUMS, "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())))
            sums[SUMS] = hash_file(tmp / SUMS)
            os.chmod(tmp, 0o755)
            fsync_dir(tmp)
            if accept is not None:
                accept(tmp, sums)
            aside = _move_aside(target) if state in ("other", "changed") else None
            aside = _swap_into_place(tmp, target, sources) or aside
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return sums, aside


def reproducible_hashes(release: Path, views: dict[str, bytes]) -> dict[str, str]:
    """The sha256 of the reproducible part of each release file that holds measurements (`views`, from its
    kind) and of SHA256SUMS (its lines for the other files). ValueError when SHA256SUMS does not list those
    files with their present sha256: measured bytes are not compared, but they must be the ones released."""
    if not views:
        return {}
    sums = (release / SUMS).read_text(encoding="utf-8")
    listed = {name: (digest, line) for name, digest, line in _sums_lines(sums)}
    for name in views:
        if name not in listed or listed[name][0] != hash_file(release / name):
            raise ValueError(f"{SUMS} does not list {name} as it is")
    kept = "".join(line for name, (_, line) in listed.items() if name not in views)
    hashes = {name: hashlib.sha256(view).hexdigest() for name, view in views.items()}
    return hashes | {SUMS: hashlib.sha256(kept.encode("utf-8")).hexdigest()}


def _move_aside(target: Path) -> Path:
    """Rename what is at `target` to a sibling that says what happened; it is kept, never deleted."""
    aside = _aside_name(target)
    os.rename(target, aside)
    return aside


def _aside_name(target: Path) -> Path:
    """A free sibling name for what was at `target`: NAME.replaced-TIME."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = target.with_name(f"{target.name}.replaced-{stamp}")
    n = 1
    while os.path.lexists(aside):
        n += 1
        aside = target.with_name(f"{target.name}.replaced-{stamp}-{n}")
    return aside


def _swap_into_place(new: Path, target: Path, sources: dict[str, Path]) -> Path | None:
    """Rename the finished release to `target`. Only recipec's own previous release, as it wrote it, is
    removed: looked at again once renamed away, so a file added to it meanwhile moves it aside instead
    (returned: where it is kept). An empty directory is replaced by the rename itself, and anything else
    makes the rename fail. Should the second rename fail or be interrupted, the previous release goes back;
    should the process be killed between the renames, the next export to `target` puts it back
    (`_recover_interrupted_swaps`)."""
    old = None
    if is_release(target):
        old = _old_release_name(target, os.getpid())
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    fsync_dir(target.parent)
    return _retire(old, target, sources) if old is not None else None


def _retire(old: Path, target: Path, sources: dict[str, Path] | None = None) -> Path | None:
    """A release renamed away from `target` once its replacement is in place: removed when it is a release
    as recipec wrote it, else moved aside and kept (returned: where)."""
    if is_release(old) and not release_changes(old, sources):
        shutil.rmtree(old, ignore_errors=True)
        return None
    aside = _aside_name(target)
    os.rename(old, aside)
    return aside


# A release being replaced lies under this prefix while the new one is swapped in: not TMP_PREFIX, so that no
# cleanup of temporaries ever takes it for one, and with the pid first, so that its name is unambiguous
# (`.recipec-old-PID-NAME`: the pid is the first run of digits, the rest is the target's name).
OLD_PREFIX = ".recipec-old-"


def _old_release_name(target: Path, pid: int) -> Path:
    """Where process `pid` keeps the release it replaces while it swaps the new one in."""
    return target.parent / f"{OLD_PREFIX}{pid}-{target.name}"


def _recover_interrupted_swaps(target: Path) -> None:
    """A previous release that an export killed between its two renames (or before it could look at it
    again) left under its temporary name: put back at `target` when nothing took its place; else kept
    aside (said on stderr) when it is not a release as recipec wrote it, as a finished swap would have
    done; else, replaced as it was meant to be, removed."""
    pattern = re.compile(rf"{re.escape(OLD_PREFIX)}(\d+)-{re.escape(target.name)}")
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or alive_elsewhere(int(match.group(1))):
            continue
        if not os.path.lexists(target) and is_release(entry):
            os.rename(entry, target)
        elif (aside := _retire(entry, target)) is not None:
            sys.stderr.write(f"recipec: an export to {target} was interrupted; the release it was replacing, "
                             f"changed since recipec wrote it, is kept as {aside}\n")
