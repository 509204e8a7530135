"""Content digests of model directories and files, computed in parallel and remembered by file identity."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .model_dir import ModelFiles
from .tensors import ModelReader, model_digest, tensor_digest

_BLOCK = 16 << 20


def hash_model(files: ModelFiles, threads: int) -> str:
    """The content digest of a model: sha256 over sorted (name, dtype, shape, sha256 of bytes)."""
    reader = ModelReader(files)
    try:
        def one(name: str) -> tuple:
            t = files.tensors[name]
            return tensor_digest(name, t.dtype, t.shape, reader.raw(name))

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            entries = list(pool.map(one, sorted(files.tensors)))
    finally:
        reader.close()
    return model_digest(entries)


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def hash_files(paths: list[Path], threads: int) -> dict[Path, str]:
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return dict(zip(paths, pool.map(hash_file, paths)))
