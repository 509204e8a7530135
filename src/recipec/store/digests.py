"""Content digests of model directories and files, computed in parallel and remembered by file identity."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from .model_dir import ModelFiles
from .tensors import ModelReader, model_digest, tensor_digest

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
