"""The `recipec cache` verbs: `ls`, `gc`, `verify` and `rm`, printed for people.

Listings go to stdout, summaries and warnings to stderr. What is live and what is garbage is decided
in `store/gc.py`; this module only locates the cache, takes its lock where it changes something, and
reports. Sizes are in binary units (KiB, MiB, GiB), as everywhere in recipec.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from pathlib import Path

from .diagnostics import Diagnostic, RecipeError
from .units import human_bytes
from .store.cache import OBJECT_META, Cache, default_cache_dir
from .store.gc import MISSING_GRACE_SECONDS, Collection, apparent_size, collect, freeable_size, read_references, sweep
from .store.lockfile import lock_path


def run_cache_action(args) -> int:
    recipe = Path(args.file) if getattr(args, "file", None) else None
    if recipe is not None and not recipe.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such file", str(recipe))
    cache = Cache(default_cache_dir(recipe, args.cache))
    if args.action != "ls" and not cache.root.exists():  # nothing to do, and nothing to create
        sys.stderr.write(f"recipec: there is no cache at {cache.root}: name a recipe, or --cache DIR "
                         "(the default is .recipec/cache beside the recipe, or $RECIPEC_CACHE)\n")
        return 2 if args.action == "rm" else 0
    if args.action == "ls":
        return list_recipe(cache, recipe) if recipe else list_all(cache)
    if args.action == "verify":
        return verify_cache(cache, args.threads or os.cpu_count() or 1)
    try:
        if args.action == "gc":
            return collect_garbage(cache, recipe, args.dry_run, args.checkpoints, args.forget_missing)
        return remove_objects(cache, args.keys)
    except OSError as err:  # a read-only cache (permissions, a read-only mount) can be listed and used, not pruned
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        sys.stderr.write(f"recipec: cannot change the cache {cache.root}: {err.strerror}: {err.filename}\n")
        return 1


def _shown(lock: Path) -> str:
    """The recipe a lockfile belongs to, relative to the working directory where it lies below it."""
    recipe = lock.with_name(lock.name.removesuffix(".lock"))
    try:
        return str(recipe.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(recipe)


def _op(path: Path) -> str:
    try:
        return str(json.loads((path / OBJECT_META).read_text())["op"])
    except (OSError, ValueError, KeyError, TypeError):
        return "incomplete"


def _row(path: Path, size: int, note: str) -> str:
    return f"{path.name[:16]}  {_op(path):<10} {human_bytes(size):>10}  {note}\n"


def _plural(n: int, word: str) -> str:
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


def list_recipe(cache: Cache, recipe: Path) -> int:
    """The objects the recipe's lockfile references, with the node that each one is."""
    lock = lock_path(recipe)
    if not lock.is_file():
        raise RecipeError([Diagnostic("E508", f"no lockfile {lock}", path=str(recipe),
                                      hint=f"`recipec run {recipe}` or `recipec lock {recipe}` writes it")])
    try:
        used = read_references(lock)
    except ValueError as err:
        raise RecipeError([Diagnostic("E506", f"{lock} cannot be read: {err}", path=str(lock))]) from None
    present = {key: cache.objects / key for key in used if (cache.objects / key).is_dir()}
    total = sum(apparent_size(p) for p in present.values())
    missing = len(used) - len(present)
    sys.stdout.write(f"{_shown(lock)}: {_plural(len(used), 'object')} in {cache.root} ({human_bytes(total)}), "
                     f"{f'{missing} missing' if missing else 'all present'}\n")
    for key in sorted(used, key=lambda k: used[k]):
        labels = ", ".join(used[key])
        if key in present:
            sys.stdout.write(_row(present[key], apparent_size(present[key]), labels))
        else:
            sys.stdout.write(f"{key[:16]}  {'missing':<10} {'':>10}  {labels} (a run builds it again)\n")
    return 0


def _warn_unreadable(found: Collection) -> None:
    for root, why in found.unreadable:
        sys.stderr.write(f"recipec: warning: cannot read {root.lock} ({why}); "
                         "every object is kept until it is fixed or removed\n")


def list_all(cache: Cache) -> int:
    """Every object in the cache and which recipes (registered lockfiles) use it."""
    found = collect(cache)
    _warn_unreadable(found)
    objects = cache.object_dirs()
    total = sum(apparent_size(p) for p in objects)
    sys.stdout.write(f"{cache.root}: {_plural(len(objects), 'object')} ({human_bytes(total)}), "
                     f"used by {_plural(len(found.live_roots), 'lockfile')}\n")
    for path in objects:
        users = found.users.get(path.name)
        missing = found.kept_for_missing.get(path.name)
        unfinished = found.kept_unfinished.get(path.name)
        note = (", ".join(sorted(f"{_shown(lock)} ({label})" for lock, label in users)) if users
                else f"kept for {', '.join(sorted(map(str, missing)))}, which is not there" if missing
                else f"built by a run of {', '.join(sorted(_shown(r.lock) for r in unfinished))} that did not "
                     "finish: kept until one does" if unfinished
                else "unused: `recipec cache gc` removes it")
        sys.stdout.write(_row(path, apparent_size(path), note))
    stale = set(found.stale_work)
    for path in cache.work_dirs():
        note = ("checkpoints of an unfinished build no lockfile uses yet: the next run resumes from them; "
                "`recipec cache gc --checkpoints` removes them" if path in stale
                else "checkpoints of an unfinished build: the next run resumes from them")
        sys.stdout.write(f"{path.name[:16]}  {'work':<10} {human_bytes(_tree_size(path)):>10}  {note}\n")
    return 0


def _tree_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def collect_garbage(cache: Cache, recipe: Path | None, dry_run: bool, checkpoints: bool = False,
                    forget_missing: bool = False) -> int:
    """Remove what no lockfile uses; with `dry_run`, only say what that would be. Checkpoints of unfinished
    builds go only with `checkpoints`; what lockfiles that are gone used, only with `forget_missing`."""
    own_lock = lock_path(recipe) if recipe else None
    extra = (own_lock,) if own_lock and own_lock.is_file() else ()
    with cache.locked(tidy=False):  # no run may commit an object between deciding and removing
        found = collect(cache, extra, forget_missing)
        _warn_unreadable(found)
        objects = cache.object_dirs()
        # per lockfile that is gone, the objects kept for it alone (no live lockfile uses them)
        kept_for = {root.lock: [p for p in objects if p.name in root.references and p.name not in found.users]
                    for root in found.missing_roots}
        unfinished = {p for p in objects if p.name in found.kept_unfinished and p.name not in found.users}
        kept = len(objects) - len(found.garbage) - len(set().union(*kept_for.values(), unfinished))  # by live locks
        freed = sum(freeable_size(p) for p in found.garbage)
        linked = sum(apparent_size(p) for p in found.garbage) - freed
        work_sizes = {p: _tree_size(p) for p in found.stale_work}
        verb = "would remove" if dry_run else "removed"
        report = ([f"{verb} " + _row(p, apparent_size(p), "unused") for p in found.garbage]
                  + [f"{'would forget' if dry_run else 'forgot'} {r.lock or r.entry}: the lockfile is not there\n"
                     for r in found.dead_roots]
                  + [f"{verb} {p}: left by a killed run\n" for p in found.temporaries])
        dropped = found.stale_work if checkpoints else []
        if not dry_run:
            sweep(cache, found, checkpoints)
            for lock in extra:
                with contextlib.suppress(ValueError):  # an unreadable lock was reported, and keeps everything
                    # building: what an unfinished run of it built stays remembered (and kept) beside the lock's
                    cache.register_root(lock, read_references(lock), building=True, ran=False)
    report += [f"{verb} work directory {p.name[:16]} ({human_bytes(work_sizes[p])}): checkpoints no lockfile "
               "uses\n" for p in dropped]
    sys.stdout.write("".join(report))
    shared = f" ({human_bytes(linked)} more stays on disk: releases hard-link it)" if linked else ""
    sys.stderr.write(f"{verb} {_plural(len(found.garbage), 'object')}, {human_bytes(freed)} "
                     f"{'to free' if dry_run else 'freed'}{shared}; kept {kept} used by "
                     f"{_plural(len(found.live_roots), 'lockfile')}\n")
    for root in found.missing_roots:
        alone = kept_for[root.lock]
        until = time.strftime("%Y-%m-%d", time.localtime(root.registered + MISSING_GRACE_SECONDS))
        sys.stderr.write(f"kept {_plural(len(alone), 'object')} ({human_bytes(sum(map(apparent_size, alone)))}) for "
                         f"{root.lock}, which is not there: moved, deleted, or its run did not finish? Run its recipe "
                         f"where it now is to keep them; gc removes them from {until}, or now with "
                         "`--forget-missing`\n")
    if unfinished:
        roots = {r.lock: r for p in unfinished for r in found.kept_unfinished[p.name]}
        until = time.strftime("%Y-%m-%d", time.localtime(max(r.registered for r in roots.values())
                                                         + MISSING_GRACE_SECONDS))
        size = human_bytes(sum(map(apparent_size, unfinished)))
        sys.stderr.write(f"kept {_plural(len(unfinished), 'object')} ({size}) built by a run of "
                         f"{', '.join(sorted(map(_shown, roots)))} that did not finish (its lock still names the "
                         "results before): a run that finishes records them, or lets gc remove them; else gc "
                         f"removes them from {until}\n")
    left = [p for p in found.stale_work if p not in dropped]
    if left:
        sys.stderr.write(f"kept {_plural(len(left), 'work directory')} ({human_bytes(sum(work_sizes[p] for p in left))}): "
                         "checkpoints of unfinished builds, which the next run resumes from"
                         "; `recipec cache gc --checkpoints` removes them\n")
    return 0


def verify_cache(cache: Cache, threads: int) -> int:
    """Re-hash every file of every object; each damaged object is an E530 with the command that removes it."""
    objects = cache.object_dirs()
    problems = []
    for path in objects:
        damage = cache.damage(path, threads)
        if damage and path.is_dir():  # one that gc removed meanwhile is not damaged
            problems.append(Diagnostic("E530", f"cache object {path.name[:16]} ({_op(path)}) is damaged: {damage}",
                                       path=str(path), hint=cache.repair_hint(path.name)))
    if problems:
        raise RecipeError(problems)
    sys.stderr.write(f"verified {_plural(len(objects), 'object')} in {cache.root}: "
                     "every file has the sha256 recorded when it was built\n")
    return 0


def remove_objects(cache: Cache, prefixes: list[str]) -> int:
    """Remove the objects named by key or unique key prefix; nothing at all if any name is wrong."""
    keys = [p.name for p in cache.object_dirs()]
    chosen = []
    for prefix in prefixes:
        matches = [k for k in keys if k.startswith(prefix)]
        if len(matches) != 1:
            what = "no object" if not matches else f"{len(matches)} objects; give more of the key"
            sys.stderr.write(f"recipec: {prefix!r} names {what} in {cache.root}; `recipec cache ls` lists them\n")
            return 2
        chosen.append(matches[0])
    with cache.locked():
        users = collect(cache).users
        for key in chosen:
            built = cache.lookup(key)
            cache.remove(key)
            used = sorted(f"{_shown(lock)} ({label})" for lock, label in users.get(key, []))
            rebuilt = f"  used by {', '.join(used)}: its next run builds it again" if used else ""
            sys.stdout.write(f"removed {key[:16]}  {built.meta.get('op', '?') if built else '(incomplete)'}{rebuilt}\n")
    sys.stderr.write(f"removed {_plural(len(chosen), 'object')} from {cache.root}\n")
    return 0
