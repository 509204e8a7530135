"""Content digests of model directories: one definition for inputs and built cache objects alike.

A model directory's digest covers every file that can reach an output: the weights by content (sorted
tensor names, dtypes, shapes and data hashes, so sharding does not matter) and the data files beside
them (config, generation config, tokenizer files, chat template) by their bytes. Two directories with
the same weights and another config have different digests. Hashing the weights is the expensive part,
so their digest is remembered by file identity; the data files are small and hashed every time. Every
digest here is a content digest (BLAKE3, see filehash.py); a file's SHA-256 is for people, not for this.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .cache import file_identity
from .filehash import content_digest, content_hash, named_content_hashes
from .model_dir import TOKENIZER_FILES, MappedWeights, ModelFiles, weight_files

DATA_FILES = ("config.json",) + TOKENIZER_FILES  # every non-weight file that can reach an output


def model_dir_digest(root: Path, weights_digest: str) -> str:
    """The digest of a model directory whose weights have `weights_digest` (see `hash_weights`)."""
    return content_digest({"weights": weights_digest, "files": named_content_hashes(root, DATA_FILES)})


def covered_files(root: Path) -> list[Path]:
    """The files a model directory's digest covers: its weights and the data files present."""
    return weight_files(root) + [root / name for name in DATA_FILES if (root / name).is_file()]


def weights_identity(root: Path) -> str:
    """What the weights-digest memo is keyed by: every weight file's path, size, mtime and inode."""
    return "|".join(file_identity(p) for p in weight_files(root))


def remembered_model_dir_digest(root: Path, known: dict[str, str]) -> str | None:
    """A model directory's digest without reading a weight, when its weights' digest is remembered."""
    weights = known.get(weights_identity(root))
    return model_dir_digest(root, weights) if weights else None


def hash_weights(files: ModelFiles, threads: int) -> str:
    """The content digest of a model's weights (see `model_digest`), a tensor per thread at a time."""
    reader = MappedWeights(files)  # torch-free: hashing may run while another thread imports torch
    try:
        def one(name: str) -> tuple:
            t = files.tensors[name]
            return tensor_digest(name, t.dtype, t.shape, reader.raw(name))

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            entries = list(pool.map(one, sorted(files.tensors)))
    finally:
        reader.close()
    return model_digest(entries)


def digest_entry(name: str, dtype: str, shape: tuple[int, ...], content_hex: str) -> tuple:
    """One tensor's entry in a model digest: (name, dtype, shape, content hash of its bytes)."""
    return (name, dtype, list(shape), content_hex)


def tensor_digest(name: str, dtype: str, shape: tuple[int, ...], data: memoryview | bytes) -> tuple:
    """One tensor's entry in a model digest, hashing its bytes."""
    return digest_entry(name, dtype, shape, content_hash(data))


def model_digest(entries: list[tuple]) -> str:
    """A model's content digest: over sorted (name, dtype, shape, content hash of bytes), so it does not
    depend on how the model is sharded."""
    return content_digest(sorted(entries))
