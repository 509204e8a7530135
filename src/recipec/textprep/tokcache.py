"""Token arrays cached by content: a second run with the same tokenizer, data and wrapping does not tokenize.

The key covers the bytes of every file that decides tokenization (not the generation config), the data's
content digest, the wrapping mode with its parameters (template, system prompt, loss) and the versions of
tokenizers and transformers. An entry is a directory of three flat arrays (ids int32, loss mask uint8,
document offsets int64) read back memory-mapped; it appears complete, by an atomic rename, or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..store.atomic import TMP_PREFIX, fsync_dir, remove_stale_temporaries, write_text_atomic
from ..store.filehash import named_file_hashes
from ..store.model_dir import TOKENIZER_FILES

if TYPE_CHECKING:  # only the type: the cache itself never needs transformers
    from .encode import Encoded

FORMAT = 1  # bump when the layout of an entry changes
TOKENIZATION_FILES = tuple(name for name in TOKENIZER_FILES if name != "generation_config.json")
ARRAYS = ("ids", "loss_mask", "offsets")


@dataclass(frozen=True)
class TokenizedDocs:
    """Documents' token ids and loss masks, concatenated; `offsets[i]:offsets[i+1]` is document i."""

    ids: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def document(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Document `index`'s ids and loss mask."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.ids[start:end], self.loss_mask[start:end]

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])


def tokenization_key(tokenizer_dir: Path, data_digest: str, mode: str, params: dict) -> str:
    """The cache key of tokenizing data with `data_digest` by a tokenizer directory in a wrapping mode.

    `params` holds everything else that changes the tokens, JSON-serializable: for inscp the template text when
    `template=` overrides the tokenizer's, the system prompt and the loss mode.
    """
    pinned = {"format": FORMAT, "tokenizer": named_file_hashes(Path(tokenizer_dir), TOKENIZATION_FILES),
              "data": data_digest, "mode": mode, "params": params,
              "versions": {name: version(name) for name in ("tokenizers", "transformers")}}
    return hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()


def pack(docs: Iterable[Encoded]) -> TokenizedDocs:
    """Concatenate encoded documents into flat arrays (compact buffers, not Python lists of ints)."""
    ids, mask, offsets = array("i"), array("B"), array("q", [0])
    for doc in docs:
        ids.extend(doc.ids)
        mask.extend(doc.loss_mask)
        offsets.append(len(ids))
    return TokenizedDocs(np.frombuffer(ids, np.int32), np.frombuffer(mask, np.uint8), np.frombuffer(offsets, np.int64))


def save_tokenized(directory: Path, docs: TokenizedDocs) -> None:
    """Write an entry's arrays and a meta.json with its counts, each file synced to disk."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ARRAYS:
        with open(directory / f"{name}.npy", "wb") as f:
            np.save(f, getattr(docs, name))
            f.flush()
            os.fsync(f.fileno())  # the rename that publishes the entry must not outrun its contents
    write_text_atomic(directory / "meta.json", json.dumps({"documents": len(docs), "tokens": docs.tokens}) + "\n")


def load_tokenized(directory: Path) -> TokenizedDocs:
    """A cached entry, memory-mapped (nothing is read until used)."""
    return TokenizedDocs(*(np.load(directory / f"{name}.npy", mmap_mode="r") for name in ARRAYS))


def cached_tokenization(root: Path, key: str, tokenize: Callable[[], Iterable[Encoded]]) -> TokenizedDocs:
    """The entry `key` under `root`, from the cache or, the first time, by calling `tokenize` and storing it."""
    entry = Path(root) / key
    if entry.is_dir():
        return load_tokenized(entry)
    remove_stale_temporaries(Path(root), owner=key)
    temporary = Path(root) / f"{TMP_PREFIX}{key}-{os.getpid()}"
    save_tokenized(temporary, pack(tokenize()))
    try:
        os.replace(temporary, entry)
    except OSError:  # another process stored the same entry first: same key, same content
        shutil.rmtree(temporary, ignore_errors=True)
    fsync_dir(Path(root))
    return load_tokenized(entry)
