"""Atomic writes: a file or a directory appears complete at its final path, or not at all.

Everything is written to a temporary sibling (same filesystem, so the rename is atomic), fsynced, then
renamed into place, and the parent directory is fsynced so the rename itself survives a crash. A
killed process leaves only a `.recipec-tmp-*` sibling, which the next run removes.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

TMP_PREFIX = ".recipec-tmp-"


def fsync_dir(path: Path) -> None:
    """Make the renames in a directory durable. Some filesystems (certain FUSE and SMB mounts) refuse to
    fsync a directory (EINVAL, EBADF): they commit renames themselves, and the write has happened."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes, follow_links: bool = False) -> None:
    """Write a file so that readers see the old content or the new, never a mix. A file already there
    keeps its permissions (a new one is 0644). With `follow_links` (a user's file: a recipe, a lockfile,
    perhaps kept elsewhere and linked into a project), a symbolic link stays one and the file it points to
    is rewritten; without (recipec's own files), a link put in their place is replaced, never followed."""
    path = Path(os.path.realpath(path)) if follow_links and path.is_symlink() else path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.lstat().st_mode) if not path.is_symlink() else 0o644
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str, follow_links: bool = False) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), follow_links)


def remove_stale_temporaries(directory: Path, owner: str | None = None) -> int:
    """Delete temporaries a killed run left in a directory; returns how many.

    With `owner`, only the temporaries recipec names after that entry (`.recipec-tmp-NAME-PID`, and
    `.recipec-tmp-old-NAME-PID`, as older recipecs named a release being replaced): a directory shared
    with the user's files loses nothing else; and of those, only the ones whose process is gone. Another
    live process may be writing the same entry (two ranks of a launched job tokenizing the same data, two
    runs exporting to one place): removing its temporary from under it would let it publish an entry with
    files missing.
    """
    removed = 0
    if not directory.is_dir():
        return 0
    pattern = re.compile(rf"{re.escape(TMP_PREFIX)}(?:old-)?{re.escape(owner)}-(\d+)") if owner else None
    for entry in directory.iterdir():
        if pattern is not None:
            match = pattern.fullmatch(entry.name)
            stale = match is not None and not alive_elsewhere(int(match.group(1)))
        else:
            stale = entry.name.startswith(TMP_PREFIX)
        if not stale:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed


def alive_elsewhere(pid: int) -> bool:
    """Whether `pid` is another process that is running (this machine's: temporaries are made beside
    their entry, and an entry is written by processes of one run)."""
    return pid != os.getpid() and pid_exists(pid)  # our own leftover is from an attempt that failed


def pid_exists(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (someone else's included; a zombie too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        return True
    return True


def death_signal() -> Callable[[], None] | None:
    """What a child process runs to be killed (SIGKILL) when the thread that started it, in its parent,
    ends (the parent's death included), Linux only; None elsewhere. Looked up here, in the parent: a child
    between fork and exec may not import or dlopen, as another thread may have held those locks at the fork."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    set_death_signal, kill = 1, int(signal.SIGKILL)  # PR_SET_PDEATHSIG
    return lambda: prctl(set_death_signal, kill)
