"""Garbage collection by roots: the cache keeps whatever a registered lockfile references.

Every `run` and `lock` registers its lockfile as a root of the cache it used (`Cache.register_root`).
An object is live when an existing root's lock names it: a node's `key`, or the object an input's
pickled weights were converted into, or a data source's records normalized into (`converted_key`).
Everything else in `objects/` is garbage, and so are the temporaries of killed runs.

A root whose lockfile is gone may have been moved with its project, not deleted, or never written by a
run that was killed (each result a run commits is registered at once): gc cannot tell, and a rebuild can
cost hours of training. Its entry remembers what the lock referenced when it was last
registered, and gc keeps those objects and says so for `MISSING_GRACE_SECONDS` after that run, unless
asked not to (`forget_missing`); the root is forgotten then, or as soon as every one of its objects is
used by a live root again (the project ran where it now is). A deleted project's objects (a CI checkout,
a temporary directory) so go in time without anyone's help. The same holds for what a rerun of an existing
lock built before it failed or was killed (its lock still names the previous results): the root's entry
remembers those keys too, and gc keeps them for as long, or until a run of that recipe finishes and its
lock says what it uses now.

Work directories (checkpoints of failed or killed jobs) of keys no lock references are garbage only
when asked (`checkpoints=True`): the first build of an hours-long node has no lock yet, and its
checkpoints are what the next run resumes from. No run builds meanwhile: gc holds the cache
exclusively, every run holds it shared. A lock that cannot be read keeps every object: gc never guesses
what a root needs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .cache import Cache, RegisteredRoot as Root
from .lockfile import read_lock

MISSING_GRACE_SECONDS = 30 * 86400  # how long after its last run a vanished lockfile's objects are kept


@dataclass
class Collection:
    """What gc found: the garbage, and who keeps the rest."""

    garbage: list[Path] = field(default_factory=list)  # object directories no root references
    users: dict[str, list[tuple[Path, str]]] = field(default_factory=dict)  # key -> [(lock, label)]
    live_roots: list[Root] = field(default_factory=list)
    dead_roots: list[Root] = field(default_factory=list)  # forgotten: the lockfile is gone, nothing kept for it
    missing_roots: list[Root] = field(default_factory=list)  # the lockfile is gone; its objects are kept
    kept_for_missing: dict[str, list[Path]] = field(default_factory=dict)  # key -> the missing locks using it
    # key -> the locks whose last run built it and did not finish (the lock does not name it yet)
    kept_unfinished: dict[str, list[Root]] = field(default_factory=dict)
    unreadable: list[tuple[Root, str]] = field(default_factory=list)  # (root, why): everything is kept
    temporaries: list[Path] = field(default_factory=list)
    stale_work: list[Path] = field(default_factory=list)  # work directories of keys no root references
    # (removed by `sweep` only with checkpoints=True)


def references(lock: dict) -> dict[str, list[str]]:
    """Cache key -> the labels using it, for every object a parsed lock references; ValueError when
    the lock does not have the shape of one (so that nothing is removed on its account)."""
    nodes, inputs = lock.get("nodes", {}), lock.get("inputs", {})
    if not isinstance(nodes, dict) or not isinstance(inputs, dict):
        raise ValueError("its [nodes] or [inputs] is not a table")
    found: dict[str, list[str]] = {}
    for label, node in nodes.items():
        key = node.get("key") if isinstance(node, dict) else None
        if not isinstance(key, str):
            raise ValueError(f"node `{label}` has no key")
        found.setdefault(key, []).append(label)
    for label, entry in inputs.items():
        key = entry.get("converted_key") if isinstance(entry, dict) else None
        if isinstance(key, str):
            what = "converted pickle" if entry.get("converted_from_pickle") else "normalized records"
            found.setdefault(key, []).append(f"{label} ({what})")
    return found


def read_references(lock: Path) -> dict[str, list[str]]:
    """The references of the lockfile at `lock`; ValueError when it is missing or unreadable."""
    data = read_lock(lock)
    if data is None:
        raise ValueError(f"{lock} does not exist")
    return references(data)


def collect(cache: Cache, extra_locks: tuple[Path, ...] = (), forget_missing: bool = False) -> Collection:
    """Decide, without changing anything, what gc removes. `extra_locks` count as roots too; with
    `forget_missing`, roots whose lockfile is gone keep nothing, and without it only for
    `MISSING_GRACE_SECONDS` after they were last registered."""
    now = time.time()
    found = Collection(temporaries=cache.temporaries())
    registered: dict[Path, Root] = {}
    for root in cache.registered_roots():
        if root.lock is None:
            found.dead_roots.append(root)
        else:
            registered.setdefault(root.lock.resolve(), root)
    for lock in extra_locks:
        registered.setdefault(lock.resolve(), Root(lock, lock, {}))
    for root in registered.values():
        if not root.lock.is_file():  # moved or deleted
            kept = root.references and not forget_missing and now < root.registered + MISSING_GRACE_SECONDS
            (found.missing_roots if kept else found.dead_roots).append(root)
            continue
        found.live_roots.append(root)
        try:
            used = read_references(root.lock)
        except ValueError as err:
            found.unreadable.append((root, str(err)))
            continue
        for key, labels in used.items():
            found.users.setdefault(key, []).extend((root.lock, label) for label in labels)
        if now < root.registered + MISSING_GRACE_SECONDS:
            for key in root.references.keys() - used.keys():
                found.kept_unfinished.setdefault(key, []).append(root)
    objects = cache.object_dirs()
    _keep_for_missing({p.name for p in objects}, found)
    if not found.unreadable:
        kept = found.users.keys() | found.kept_for_missing.keys() | found.kept_unfinished.keys()
        found.garbage = [p for p in objects if p.name not in kept]
        found.stale_work = [p for p in cache.work_dirs() if p.name not in kept]
    return found


def _keep_for_missing(present: set[str], found: Collection) -> None:
    """Keep the objects of roots whose lockfile is gone; forget a root whose every object still `present`
    is used by a live root (a moved project that ran again where it now is)."""
    for root in list(found.missing_roots):
        if all(key in found.users for key in root.references.keys() & present):
            found.missing_roots.remove(root)
            found.dead_roots.append(root)
            continue
        for key in root.references:
            found.kept_for_missing.setdefault(key, []).append(root.lock)


def apparent_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def freeable_size(directory: Path) -> int:
    """Bytes that removing `directory` gives back: files hard-linked elsewhere (releases) stay on disk."""
    return sum(st.st_size for st in (p.stat() for p in directory.iterdir() if p.is_file()) if st.st_nlink == 1)


def sweep(cache: Cache, found: Collection, checkpoints: bool = False) -> None:
    """Remove what `collect` found; the caller holds the cache lock. Work directories go only with
    `checkpoints`."""
    for path in found.garbage:
        cache.remove(path.name)
    for path in found.stale_work if checkpoints else ():
        cache.drop_work(path.name)
    for root in found.dead_roots:
        if root.entry.parent == cache.roots:  # only our own registrations, never a lockfile
            root.entry.unlink(missing_ok=True)
            (cache.root_references / root.entry.name).unlink(missing_ok=True)
    cache.clean_temporaries()
    cache.drop_key_locks()
