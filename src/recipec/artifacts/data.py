"""Data inputs by content: files read once into normalized records, one JSON object per line.

A data source (`text`, `chat`) names files; resolving it hashes their bytes (the hash remembered by
file identity, as model weights are, so an unchanged file is not read again), and the records are
normalized once into a cache object keyed by that hash: `records.jsonl`. The artifact's digest is that
of the normalized records, so it changes with every byte an op can read. Malformed input is collected
over every file, each problem naming the file and line, and reported together (E550-E554).

`iter_records` is the reader ops use (training, evaluation): it streams the records, one line at a time,
never loading the whole set into memory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, ClassVar, Iterator

from ..ir.graph import canonical_json
from ..ir.types import Type
from ..store.cache import Cache, file_identity
from ..store.filehash import content_digest, content_file_hash, hash_files
from . import Artifact, ArtifactError, ArtifactKind, Problem

RECORDS = "records.jsonl"
FORMAT = 1  # of the normalized records; a new normalization is a new format and a new cache object
MAX_PROBLEMS = 20  # reported per source; more are counted, not listed

Records = Iterator["dict | Problem"]  # what reading one file yields: records, and problems where it cannot


class DataKind(ArtifactKind):
    """A kind of data held as normalized records; not exportable."""

    record_noun: ClassVar[str]

    @classmethod
    def content_files(cls, path: Path) -> list[Path]:
        return [path / RECORDS]

    @classmethod
    def describe(cls, type_: Type) -> str:
        return f"{type_} · read by content when run"


def lines(path: Path, shown: str) -> Iterator[tuple[int, str | Problem]]:
    """(line number, text) of each line of a file, or a Problem for a line that is not UTF-8."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, Problem("E550", f"{shown}:{number}: invalid UTF-8 (byte {err.start + 1} of the line)",
                                      "re-encode the file as UTF-8")


def json_lines(path: Path, shown: str) -> Iterator[tuple[int, object | Problem]]:
    """(line number, value) of each non-blank line of a JSON-lines file, or a Problem where it is not JSON."""
    for number, text in lines(path, shown):
        if isinstance(text, Problem):
            yield number, text
        elif text.strip():
            line = text.rstrip("\r\n")  # a newline inside a cut-off string is not the problem to name
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:  # where in the line, as file:line:column
                column = err.colno
                yield number, Problem("E551", f"{shown}:{number}:{column}: not JSON: "
                                      f"{err.msg.removesuffix(' at').lower()}",
                                      "each line of a .jsonl file is one JSON object")
            except ValueError as err:
                yield number, Problem("E551", f"{shown}:{number}: not JSON ({err})",
                                      "each line of a .jsonl file is one JSON object")


PLAN_REHASH_BYTES = 64 << 20  # what `plan` reads again when a data file's time changed: well under a second


def raw_digest(files: list[Path], cache: Cache, threads: int, rehash: bool) -> tuple[str, dict[Path, str]]:
    """A content digest of the files' bytes, in order, remembered by the files' identity so that unchanged
    files are not read again; with `rehash` (a lock's file list) each is read anew and its sha256 returned."""
    identity = _identity(files)
    known = cache.known_digests().get(identity)
    if known and not rehash:
        return known, {}
    digest = content_digest([content_file_hash(p) for p in files])
    cache.remember_digest(identity, digest)
    return digest, hash_files(files, threads) if rehash else {}


def _identity(files: list[Path]) -> str:
    return "data|" + "|".join(file_identity(p) for p in files)


def records_key(kind: type[DataKind], options: dict, raw: str) -> str:
    """The cache key of a data source's normalized records: what they are read as, and the bytes read."""
    doc = {"kind": kind.kind.value, "format": FORMAT, "options": options, "content": raw}
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def remembered_records_digest(kind: type[DataKind], files: list[Path], options: dict, cache: Cache) -> str | None:
    """A data source's digest when its records are in the cache: known from the files' identity without
    reading them, or, for small files whose identity changed (a touch, a checkout), by hashing them again,
    so that `plan` does not call a cached node unbuilt."""
    try:
        raw = cache.known_digests().get(_identity(files))
        if raw is None and sum(p.stat().st_size for p in files) <= PLAN_REHASH_BYTES:
            raw, _ = raw_digest(files, cache, 1, rehash=False)
    except OSError:
        return None
    cached = cache.lookup(records_key(kind, options, raw)) if raw else None
    return cached.digest if cached else None


def resolve_records(kind: type[DataKind], op: str, files: list[Path], options: dict, read: Callable[[Path], Records],
                    shown: Callable[[Path], str], cache: Cache, threads: int, rehash: bool
                    ) -> tuple[Artifact, dict[Path, str]]:
    """The artifact of a data source: its records normalized into the cache (once per content), and the
    files' sha256 when they were read. Raises ArtifactError with every problem found."""
    try:
        raw, sums = raw_digest(files, cache, threads, rehash)
    except FileNotFoundError as err:
        raise ArtifactError([Problem("E554", f"{err.filename} no longer exists",
                                     "the data changed since the recipe was checked: run again")]) from None
    key = records_key(kind, options, raw)

    def build(tmp: Path) -> None:
        _write_records(tmp / RECORDS, files, read, shown)
        cache.commit_meta(tmp, key, op, kind.digest(tmp), threads)

    cached = cache.lookup(key) or cache.obtain(key, build)
    return Artifact(kind.kind, cached.path, cached.digest, {"key": key}), sums


def _write_records(dest: Path, files: list[Path], read: Callable[[Path], Records], shown: Callable[[Path], str]) -> None:
    problems: list[Problem] = []
    with open(dest, "w", encoding="utf-8") as out:
        for path in files:
            for item in read(path):
                if isinstance(item, Problem):
                    problems.append(item)
                elif not problems:  # once anything is wrong, only look for more problems
                    out.write(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n")
    if problems:
        raise ArtifactError(_capped(problems))


def _capped(problems: list[Problem]) -> list[Problem]:
    if len(problems) <= MAX_PROBLEMS:
        return problems
    last = problems[MAX_PROBLEMS - 1]
    more = len(problems) - MAX_PROBLEMS
    return problems[:MAX_PROBLEMS - 1] + [Problem(last.code, f"{last.message} (and {more} more problems)", last.hint)]


def iter_records(artifact: Artifact) -> Iterator[dict]:
    """Every normalized record of a data artifact, streamed line by line."""
    with open(artifact.path / RECORDS, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
