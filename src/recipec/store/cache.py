"""The content-addressed cache: every built node's result, stored under its cache key.

`objects/<key>/` holds a complete model directory plus `recipec-object.json` (key, op, content
digest). An object appears by renaming a finished temporary directory, so a key present means a
complete result. `digests.json` remembers input models' content digests by file identity (path,
size, mtime, inode), so `plan` can tell what is cached without reading a weight and a rerun does not
re-hash unchanged inputs. A file lock serializes runs that share a cache: a second run waits.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .atomic import TMP_PREFIX, fsync_dir, remove_stale_temporaries, write_bytes_atomic
from .filehash import hash_files

OBJECT_META = "recipec-object.json"
CACHE_ENV = "RECIPEC_CACHE"


def default_cache_dir(recipe: Path, override: str | None = None) -> Path:
    """--cache, else $RECIPEC_CACHE, else `.recipec/cache` beside the recipe."""
    chosen = override or os.environ.get(CACHE_ENV)
    return Path(chosen).resolve() if chosen else recipe.resolve().parent / ".recipec" / "cache"


@dataclass(frozen=True)
class CachedObject:
    key: str
    path: Path
    meta: dict

    @property
    def digest(self) -> str:
        return self.meta["digest"]

    @property
    def files(self) -> dict[str, dict]:
        """name -> {size, mtime_ns, sha256} of every file, recorded when the object was committed."""
        return self.meta.get("files", {})


class Cache:
    def __init__(self, root: Path):
        self.root = root
        self.objects = root / "objects"

    def lookup(self, key: str) -> CachedObject | None:
        """The object under `key`, if it is there and unchanged since it was committed."""
        path = self.objects / key
        try:
            meta = json.loads((path / OBJECT_META).read_text())
            for name, info in meta.get("files", {}).items():
                # Releases may share these files (hard links): one edited in place has a new mtime, and
                # the object no longer counts as built. A stat per file; no data is read.
                st = (path / name).stat()
                if (st.st_size, st.st_mtime_ns) != (info["size"], info["mtime_ns"]):
                    return None
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return None
        return CachedObject(key, path, meta)

    @contextmanager
    def new_object(self, key: str) -> Iterator[Path]:
        """A temporary directory to build an object in; committed under `key` if the block succeeds."""
        self.objects.mkdir(parents=True, exist_ok=True)
        tmp = self.objects / f"{TMP_PREFIX}{key[:16]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
            fsync_dir(tmp)
            final = self.objects / key
            if final.exists():  # built meanwhile by an earlier, interrupted run's leftovers
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.objects)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit_meta(self, directory: Path, key: str, op: str, digest: str, threads: int = 2) -> None:
        """Record what an object is and every file's size, mtime and sha256 (hashed once, here, so
        releases and lockfiles reuse the hashes); makes every file durable and world-readable."""
        paths = sorted(p for p in directory.iterdir() if p.is_file() and p.name != OBJECT_META)
        for p in paths:
            os.chmod(p, 0o644)
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sums = hash_files(paths, threads)
        files = {p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns, "sha256": sums[p]}
                 for p in paths}
        meta = {"key": key, "op": op, "digest": digest, "files": files}
        write_bytes_atomic(directory / OBJECT_META, json.dumps(meta, indent=2, sort_keys=True).encode() + b"\n")

    def entries(self) -> list[CachedObject]:
        if not self.objects.is_dir():
            return []
        found = (self.lookup(p.name) for p in sorted(self.objects.iterdir()) if not p.name.startswith("."))
        return [o for o in found if o is not None]

    def remove(self, key: str) -> None:
        shutil.rmtree(self.objects / key, ignore_errors=True)

    def clean_temporaries(self) -> int:
        return remove_stale_temporaries(self.objects)

    # input digests by file identity

    def _digests_path(self) -> Path:
        return self.root / "digests.json"

    def known_digests(self) -> dict:
        try:
            return json.loads(self._digests_path().read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def remember_digest(self, identity: str, digest: str) -> None:
        table = self.known_digests()
        table[identity] = digest
        self.root.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self._digests_path(), json.dumps(table, indent=1, sort_keys=True).encode())

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of this cache for one run; a second run waits, saying so."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                sys.stderr.write(f"recipec: waiting for another run using {self.root}\n")
                started = time.monotonic()
                fcntl.flock(handle, fcntl.LOCK_EX)
                sys.stderr.write(f"recipec: got the cache after {time.monotonic() - started:.1f} s\n")
            self.clean_temporaries()
            yield


def file_identity(path: Path) -> str:
    """What makes a file 'unchanged' for the digest memo: path, size, mtime and inode."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
