"""Hashes of bytes and files, with two algorithms, each for one audience.

SHA-256 is for files a person checks: `SHA256SUMS` in a release and the lock's file hashes, which
`sha256sum -c` verifies. BLAKE3 is for content digests (tensors, model directories, data), which only
recipec reads: on this project's CPUs it hashes faster per core than SHA-256 even with SHA extensions,
and one large buffer can be spread over several threads. A content digest names its algorithm
(`blake3:<hex>`), so a digest made another way is never taken for one of these. Both release the GIL on
large buffers, so callers get parallelism from their own thread pools.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

CONTENT_ALGORITHM = "blake3"
_BLOCK = 16 << 20


# SHA-256 of files this process wrote and hashed while writing them (see store/tensors.py), by path, with
# the file's identity when hashed: a later `hash_file` of the unchanged file takes it instead of reading
# the file again, so each byte written is SHA-256 hashed once.
_WRITTEN: dict[str, tuple[tuple[int, int, int, int], str]] = {}


def _identity(path: Path) -> tuple[int, int, int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def remember_written_hash(path: Path, sha256: str) -> None:
    """Record the SHA-256 of a file just written and no longer to be changed."""
    _WRITTEN[str(path)] = (_identity(path), sha256)


# SHA-256 of large files this process read, by the inode's full identity (a change to the bytes changes
# the mtime or, if that is set back, the ctime, which no one can set): a release's weights looked at
# before and after it is replaced are read once. Small files are read again: they cost little.
_READ: dict[tuple[int, ...], str] = {}
_REMEMBERED_FROM = 16 << 20


def hash_file(path: Path) -> str:
    """The SHA-256 of a file, as `sha256sum` prints it."""
    known = _WRITTEN.pop(str(path), None)
    if known is not None and known[0] == _identity(path):
        return known[1]
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if identity in _READ:
            return _READ[identity]
        digest = hashlib.sha256()
        while block := f.read(_BLOCK):
            digest.update(block)
    if st.st_size >= _REMEMBERED_FROM:
        _READ[identity] = digest.hexdigest()
    return digest.hexdigest()


def hash_files(paths: list[Path], threads: int) -> dict[Path, str]:
    """The SHA-256 of each file, several files at once."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return dict(zip(paths, pool.map(hash_file, paths)))


def named_file_hashes(root: Path, names: tuple[str, ...]) -> dict[str, str]:
    """sha256 of each of `names` that is a file in `root` (small files: read every time, never memoized)."""
    return {name: hash_file(root / name) for name in names if (root / name).is_file()}


def content_hasher() -> blake3.blake3:
    """An incremental content hasher, single-threaded: for pieces that arrive one by one."""
    return blake3.blake3()


def content_hash(data: bytes | memoryview) -> str:
    """The content hash (hex, no prefix) of bytes in memory."""
    return blake3.blake3(data).hexdigest()


def content_file_hash(path: Path, threads: int = 1) -> str:
    """The content hash (hex, no prefix) of a whole file, memory-mapped and hashed on up to `threads` threads."""
    hasher = blake3.blake3(max_threads=max(1, threads))
    if path.stat().st_size:  # an empty file cannot be mapped
        hasher.update_mmap(path)
    return hasher.hexdigest()


def named_content_hashes(root: Path, names: tuple[str, ...]) -> dict[str, str]:
    """The content hash of each of `names` that is a file in `root` (small files: read every time)."""
    return {name: content_file_hash(root / name) for name in names if (root / name).is_file()}


def content_digest(document: object) -> str:
    """A content digest (`blake3:<hex>`) of a JSON-able document, over its canonical JSON."""
    blob = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return f"{CONTENT_ALGORITHM}:{content_hash(blob)}"
