"""File locks (flock) for the cache, its keys and export folders: one place that waits visibly and that
refuses clearly where the filesystem has no locks.

Some shared filesystems answer flock with an error instead of a lock (Lustre mounted without `flock`,
NFS mounted `nolock`, some FUSE filesystems). recipec never goes on unlocked there: two runs on one
cache, or a `cache gc` beside a run, would then lose work without a word. The command stops with E532
and says where a cache can live instead.
"""

from __future__ import annotations

import errno
import fcntl
import sys
import time
from pathlib import Path

from ..diagnostics import Diagnostic, RecipeError

# ENOTSUP is EOPNOTSUPP on Linux, another number on macOS (where SMB and NFS mounts answer with it).
NO_LOCKS = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
                      errno.EINVAL})


def try_lock(handle, mode: int, where: Path) -> bool:
    """Take `mode` (fcntl.LOCK_SH or LOCK_EX) on an open file or descriptor if no one holds a conflicting
    lock; False when someone does. `where` names the place in the error where locks are missing."""
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        _refuse_unlocked(err, where)
        raise


def lock(handle, mode: int, where: Path, waiting: str) -> None:
    """Take `mode`, saying `waiting` on stderr, and then for how long, when another process holds it."""
    if try_lock(handle, mode, where):
        return
    sys.stderr.write(f"recipec: {waiting}\n")
    started = time.monotonic()
    try:
        fcntl.flock(handle, mode)
    except OSError as err:
        _refuse_unlocked(err, where)
        raise
    sys.stderr.write(f"recipec: went on after {time.monotonic() - started:.1f} s\n")


def _refuse_unlocked(err: OSError, where: Path) -> None:
    if err.errno in NO_LOCKS:
        raise RecipeError([Diagnostic(
            "E532", f"{where} is on a filesystem without file locks ({err.strerror or err})", path=str(where),
            hint="recipec never shares a cache or an export folder unlocked: keep the cache on a local disk "
                 "(--cache DIR or $RECIPEC_CACHE), export to one, or mount the filesystem with locks "
                 "(Lustre: -o flock)")]) from None
