"""The content-addressed cache: every built node's result, stored under its cache key.

Everything lives in `<cache>/v2/` (`LAYOUT`): a recipec whose stored things mean something else (other
digests, other keys) uses another directory, so no recipec misreads another's cache; what another layout
left in the cache directory is ignored, with a note. Inside, `objects/<key>/` holds a complete model
directory plus `recipec-object.json` (key, op, content digest). An object appears by renaming a
finished temporary directory, so a key present means a complete result. `digests.json` remembers input
models' content digests by file identity (path, size, mtime, inode), so `plan` can tell what is cached
without reading a weight and a rerun does not re-hash unchanged inputs. `roots/` names the lockfiles
that use the cache (one small file each, named by the hash of the lock's absolute path): `cache gc`
keeps what any of them references, as Nix keeps what its gc roots reach.

`work/<key>/` is a node's work directory: checkpoints of a long job, kept through a failure, Ctrl-C or
SIGKILL so that the next build of the same key resumes from them, and removed when the result is
committed (or by `cache gc` when no lock references the key). Locking is two-level: a run holds the
cache's `.lock` shared for its whole length and `locks/<key>.lock` exclusively while it builds that key,
so runs sharing a cache wait for each other only on the same node; `cache gc` and `cache rm` hold
`.lock` exclusively, so nothing is removed under a running build.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..diagnostics import Diagnostic, RecipeError
from . import locks
from .atomic import TMP_PREFIX, fsync_dir, remove_stale_temporaries, write_bytes_atomic
from .filehash import hash_files

OBJECT_META = "recipec-object.json"
# The directory of this cache layout inside a cache. A new one whenever what is stored changes meaning:
# v2 has BLAKE3 content digests (v1 had SHA-256 ones, in objects/, roots/ and digests.json at the top).
LAYOUT = "v2"
_OLDER_LAYOUT = re.compile(r"objects|roots|digests\.json|v\d+")
CACHE_ENV = "RECIPEC_CACHE"
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
# op -> this machine's measured / modelled time of its work. Named for the model it calibrates: the
# ratios of `speeds.json` included start-up, which the plan now models apart, and are not read.
SPEEDS = "work-speeds.json"


def default_cache_dir(recipe: Path | None, override: str | None = None) -> Path:
    """--cache, else $RECIPEC_CACHE, else `.recipec/cache` beside the recipe (or in the working directory)."""
    chosen = override or os.environ.get(CACHE_ENV)
    if chosen:
        where = Path(chosen).resolve()
    else:
        where = (recipe.resolve().parent if recipe else Path.cwd()) / ".recipec" / "cache"
    _require_directory(where)
    return where


def _require_directory(where: Path) -> None:
    """A cache path that is, or lies under, an existing file is refused before anything tries to use it."""
    existing = next(p for p in (where, *where.parents) if p.exists())
    if not existing.is_dir():
        raise RecipeError([Diagnostic(
            "E531", f"the cache {where} cannot be used: {existing} is a file, not a directory"
            if existing != where else f"the cache {where} is a file, not a directory", path=str(existing),
            hint="name a directory with --cache or $RECIPEC_CACHE; recipec creates it if it does not exist")])


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


@dataclass(frozen=True)
class RegisteredRoot:
    """A lockfile registered as a user of the cache, as its entry under `roots/` records it."""

    entry: Path  # the file under <cache>/roots
    lock: Path | None  # None when the entry names nothing readable
    references: dict[str, list[str]]  # cache key -> labels, when registered (empty: not known)
    registered: float = 0.0  # when a run last registered it (seconds since the epoch; 0: not known)


class Cache:
    def __init__(self, root: Path):
        self.root = root  # the directory the user names, in every message
        self.home = root / LAYOUT  # where this layout keeps everything
        self.objects = self.home / "objects"
        self.roots = self.home / "roots"
        # what each root's lock referenced when registered, beside roots/ (whose entries stay a plain path,
        # as every recipec of this layout reads them)
        self.root_references = self.home / "root-references"
        self.work = self.home / "work"
        self.key_locks = self.home / "locks"
        _note_older_layouts(root)

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
            self._commit(tmp, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _commit(self, tmp: Path, key: str) -> None:
        """Rename a finished temporary to `key`. An object already committed there stays (its key says it
        holds the same result, and another run may be reading it); what fails `lookup` there (a damaged or
        edited object) is renamed away and removed first."""
        final = self.objects / key
        if self.lookup(key) is not None:
            return
        if os.path.lexists(final):
            _remove_renamed(self.objects, key)
        try:
            os.rename(tmp, final)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or self.lookup(key) is None:
                raise
            return  # committed by another run between the look and the rename
        fsync_dir(self.objects)

    def obtain(self, key: str, build: Callable[[Path], None]) -> CachedObject:
        """The object under `key`, built first if the cache lacks it: `build(tmp)` fills a temporary
        directory and records it (`commit_meta`). Under the key's lock, so runs sharing the cache build
        it once and never replace it under each other."""
        with self.building(key):
            if self.lookup(key) is None:
                with self.new_object(key) as tmp:
                    build(tmp)
        cached = self.lookup(key)
        if cached is None:
            raise OSError(errno.ENOENT, f"the cache object {key[:16]} vanished as it was committed", str(self.objects))
        return cached

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

    def object_dirs(self) -> list[Path]:
        """Every object directory, complete or not (an edited or damaged one fails `lookup` but takes space)."""
        if not self.objects.is_dir():
            return []
        return sorted(p for p in self.objects.iterdir() if p.is_dir() and not p.name.startswith("."))

    def remove(self, key: str) -> None:
        """Delete an object; renamed away first, so a killed removal leaves a temporary, not half an object."""
        _remove_renamed(self.objects, key)

    # work directories: what a long job keeps between attempts

    def work_dir(self, key: str) -> Path:
        """Where the job building `key` keeps its checkpoints; created by the job when it needs one."""
        return self.work / key

    def work_dirs(self) -> list[Path]:
        """Every work directory: a build of its key that failed or was killed, resumable by the next run."""
        if not self.work.is_dir():
            return []
        return sorted(p for p in self.work.iterdir() if p.is_dir() and not p.name.startswith("."))

    def drop_work(self, key: str) -> None:
        """Remove a work directory; renamed away first, so a killed removal never leaves half a checkpoint
        where the next run would resume from it."""
        _remove_renamed(self.work, key)

    def drop_work_if_empty(self, key: str) -> None:
        """A job that kept nothing leaves nothing behind."""
        try:
            (self.work / key).rmdir()
        except OSError:  # absent, or holds checkpoints worth resuming from
            pass

    @contextmanager
    def building(self, key: str) -> Iterator[None]:
        """Exclusive right to build `key`: a second run needing the same node waits here, saying so, and
        then finds it cached. A cache where the lock cannot be created is not locked: nothing can be
        built there anyway, and the build reports why."""
        try:
            self.key_locks.mkdir(parents=True, exist_ok=True)
            handle = open(self.key_locks / f"{key}.lock", "a+")
        except OSError as err:
            if err.errno not in _UNWRITABLE:
                raise
            yield
            return
        with handle:
            locks.lock(handle, fcntl.LOCK_EX, self.root, f"waiting for another run building {key[:16]} in {self.root}")
            yield

    def drop_key_locks(self) -> None:
        """Remove the per-key lock files (one per key ever built, otherwise); only while this process
        holds the cache exclusively, when no run holds or waits on any of them."""
        for lock in self.key_locks.glob("*.lock") if self.key_locks.is_dir() else ():
            lock.unlink(missing_ok=True)

    @property
    def _places(self) -> tuple[Path, ...]:
        """The directories recipec writes in, where a killed run may leave a temporary."""
        return self.home, self.objects, self.roots, self.root_references, self.work

    def temporaries(self) -> list[Path]:
        """What killed runs left behind: half-built objects and half-written files."""
        return sorted(p for d in self._places if d.is_dir() for p in d.iterdir() if p.name.startswith(TMP_PREFIX))

    def clean_temporaries(self) -> int:
        return sum(remove_stale_temporaries(d) for d in self._places)

    def damage(self, path: Path, threads: int) -> str | None:
        """What is wrong with the object at `path`, judged by content: None when every file still has the
        sha256 recorded when it was committed (bit rot changes neither size nor mtime)."""
        try:
            files = json.loads((path / OBJECT_META).read_text())["files"]
            recorded = {name: info["sha256"] for name, info in files.items()}
            missing = sorted(name for name in recorded if not (path / name).is_file())
            if missing:
                return f"{missing[0]} is missing"
            sums = hash_files([path / name for name in sorted(recorded)], threads)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            return f"its record {OBJECT_META} or one of its files cannot be read ({err})"
        changed = [p.name for p, digest in sums.items() if digest != recorded[p.name]]
        return f"{changed[0]} does not have the sha256 recorded when it was built" if changed else None

    def repair_hint(self, key: str) -> str:
        return (f"remove the damaged object with `recipec cache rm {key[:16]} --cache {self.root}` "
                "and run again: it is rebuilt")

    # roots: the lockfiles that use this cache

    def register_root(self, lock: Path, references: dict[str, list[str]], building: bool = False,
                      ran: bool = True) -> None:
        """Record `lock` as a user of this cache so that `cache gc` keeps what it references; a read-only
        cache that does not know the lock yet gets a warning instead. `references` (cache key -> the labels
        using it, as the lock has them) are remembered beside it where the cache can be written, so that gc
        can still tell what the lock used once it is gone: moved with its project, or deleted. While a run
        is `building`, each result it commits is added to them: a first run killed before it could write its
        lock leaves results that hours of training made, which gc must not take for garbage. Unless it `ran`
        (gc naming the recipe registers it too), the time of the last registration stays: gc keeps what a
        vanished or unfinished run's lock used for a while after that run, not after the last gc."""
        lock = lock.resolve()
        name = hashlib.sha256(str(lock).encode()).hexdigest()
        entry, text = self.roots / name, f"{lock}\n"
        try:
            if not (entry.is_file() and entry.read_text(encoding="utf-8") == text):  # else known: nothing to write
                write_bytes_atomic(entry, text.encode())
        except OSError as err:
            sys.stderr.write(f"recipec: warning: cannot register {lock} as a user of the cache {self.root} "
                             f"({os.strerror(err.errno) if err.errno else err}); `recipec cache gc` there "
                             "will not keep its objects\n")
            return
        remembered = self.root_references / name
        if building:
            references = {**self._references(name)[0], **references}
        data = json.dumps(references, sort_keys=True).encode()
        try:
            last = remembered.stat().st_mtime_ns if remembered.is_file() else None
            if last is not None and remembered.read_bytes() == data:
                if ran:
                    os.utime(remembered)  # when it was last used: gc keeps a vanished lock's objects for a while after
            else:
                write_bytes_atomic(remembered, data)
                if not ran and last is not None:
                    os.utime(remembered, ns=(last, last))
        except OSError:  # read-only: the lock itself tells gc what it uses while it exists
            pass

    def registered_roots(self) -> list[RegisteredRoot]:
        """Every registered root, whether or not its lock still exists."""
        if not self.roots.is_dir():
            return []
        found: list[RegisteredRoot] = []
        for entry in sorted(self.roots.iterdir()):
            if entry.name.startswith(TMP_PREFIX) or not entry.is_file():
                continue
            try:
                text = entry.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                text = ""
            found.append(RegisteredRoot(entry, Path(text) if text else None, *self._references(entry.name)))
        return found

    def _references(self, name: str) -> tuple[dict[str, list[str]], float]:
        """What a root's lock referenced when last registered, and when; empty when unknown (registered by
        an older recipec, or unreadable)."""
        path = self.root_references / name
        try:
            data = json.loads(path.read_bytes())
            return {str(k): [str(label) for label in v] for k, v in data.items()}, path.stat().st_mtime
        except (OSError, ValueError, AttributeError, TypeError):
            return {}, 0.0

    # small memo tables: input digests by file identity, this machine's speed per op

    def _read_table(self, name: str) -> dict:
        try:
            return json.loads((self.home / name).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _remember(self, name: str, entry: str, value) -> None:
        """Set one entry of a memo table; a cache that cannot be written (read-only) just does without."""
        table = self._read_table(name)
        table[entry] = value
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.home / name, json.dumps(table, indent=1, sort_keys=True).encode())
        except OSError as err:
            if err.errno not in _UNWRITABLE and err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise  # a memo is worth a write, not a failure: a full disk just goes without

    def known_digests(self) -> dict:
        return self._read_table("digests.json")

    def remember_digest(self, identity: str, digest: str) -> None:
        """Memoize an input's digest; a read-only cache re-hashes next time."""
        self._remember("digests.json", identity, digest)

    def known_speeds(self) -> dict[str, float]:
        """op -> measured / modelled time of its work on this machine, for `plan`'s time estimates."""
        return self._read_table(SPEEDS)

    def remember_speed(self, op: str, ratio: float) -> None:
        self._remember(SPEEDS, op, round(ratio, 3))

    @contextmanager
    def locked(self, tidy: bool = True, exclusive: bool = True) -> Iterator[None]:
        """Use of this cache for one command. `exclusive` (gc, rm) waits until no run uses the cache;
        a run takes it shared, so runs proceed together and lock each key they build (`building`).
        `tidy` removes what killed runs left behind, only when no other run is using the cache (their
        temporaries are alive). A read-only cache is locked through a read-only handle (flock needs no
        write access) and left as it is: a run that finds everything cached needs to write nothing."""
        handle, writable = self._open_lock_file()
        if handle is None:  # no lock file and no right to create one: nobody writes here through recipec
            yield
            return
        with handle:
            if exclusive:
                locks.lock(handle, fcntl.LOCK_EX, self.root, f"waiting for the runs using {self.root} to finish")
            alone = exclusive or locks.try_lock(handle, fcntl.LOCK_EX, self.root)
            if tidy and writable and alone:
                self.clean_temporaries()  # nobody else is here: every temporary is a killed run's
            if not exclusive:
                locks.lock(handle, fcntl.LOCK_SH, self.root, f"waiting for a `recipec cache` command on {self.root}")
            yield

    def _open_lock_file(self):
        """(handle, writable): the lock file opened for writing, else read-only, else (None, False)."""
        path = self.home / ".lock"
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            return open(path, "a+"), True
        except OSError as err:
            if err.errno not in _UNWRITABLE:
                raise
        try:
            return open(path, "r"), False
        except OSError:
            return None, False


@functools.cache  # once per cache and process, however often it is opened
def _note_older_layouts(root: Path) -> None:
    """Say that the cache directory holds what another recipec's layout stored: it is never read here."""
    try:
        others = sorted(p.name for p in root.iterdir() if _OLDER_LAYOUT.fullmatch(p.name) and p.name != LAYOUT)
    except OSError:  # no cache yet, or one we may not list: nothing to say
        return
    if others:
        sys.stderr.write(f"recipec: note: ignoring {', '.join(others)} in {root}: left by a recipec with another "
                         f"cache layout (this one uses {LAYOUT}/); delete them to free the space\n")


def file_identity(path: Path) -> str:
    """What makes a file 'unchanged' for the digest memo: path, size, mtime and inode."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _remove_renamed(directory: Path, name: str) -> None:
    """Remove `directory/name` by first renaming it to a temporary that the next run would clean up."""
    doomed = directory / f"{TMP_PREFIX}removed-{name}-{os.getpid()}-{secrets.token_hex(4)}"  # a leftover never blocks
    try:
        os.rename(directory / name, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)
