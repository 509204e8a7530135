"""sha256 of whole files, in parallel where there are several (hashlib releases the GIL on big blocks)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_BLOCK = 16 << 20


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def hash_files(paths: list[Path], threads: int) -> dict[Path, str]:
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return dict(zip(paths, pool.map(hash_file, paths)))


def named_file_hashes(root: Path, names: tuple[str, ...]) -> dict[str, str]:
    """sha256 of each of `names` that is a file in `root` (small files: read every time, never memoized)."""
    return {name: hash_file(root / name) for name in names if (root / name).is_file()}
