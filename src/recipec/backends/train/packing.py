"""Documents in, packed fixed-length training sequences out, in a deterministic order.

Documents are concatenated into rows of `seq_len` tokens. Each piece of a document in a row keeps its own
positions, restarting at 0, which is how transformers isolates packed documents (no attention across them,
when the forward gets `position_ids`, no attention mask and no cache). A document that crosses a row's end
goes on in the next row as a new document: nothing is dropped, and the last row is padded.

Only one shuffle buffer of rows is held at a time, so a corpus may be far larger than memory.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ...ops.train_config import TrainingError

IGNORE = -100  # the label cross entropy skips


@dataclass(frozen=True)
class Document:
    """Token ids of one document and, optionally, which of them are targets (1) of the loss."""

    ids: Sequence[int]
    loss_mask: Sequence[int] | None = None


@dataclass(frozen=True)
class Row:
    """One packed sequence: token ids, each token's position in its document, and its target flag."""

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    targets: tuple[int, ...]


DocumentSource = Callable[[], Iterable[Document]]  # a fresh pass over the corpus on each call


def pack(documents: Iterable[Document], seq_len: int) -> Iterator[Row]:
    """Concatenate documents into rows of `seq_len` tokens (the last row may be shorter)."""
    ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    for number, document in enumerate(documents):
        mask = document.loss_mask if document.loss_mask is not None else [1] * len(document.ids)
        if len(mask) != len(document.ids):
            raise TrainingError(f"document {number} has {len(document.ids)} tokens but a loss mask of {len(mask)}",
                                "give one mask value per token")
        start = 0
        while start < len(document.ids):
            piece = document.ids[start:start + seq_len - len(ids)]
            ids.extend(piece)
            positions.extend(range(len(piece)))
            targets.extend(mask[start:start + len(piece)])
            start += len(piece)
            if len(ids) == seq_len:
                yield Row(tuple(ids), tuple(positions), tuple(targets))
                ids, positions, targets = [], [], []
    if ids:
        yield Row(tuple(ids), tuple(positions), tuple(targets))


def shuffled(rows: Iterable[Row], seed: int, epoch: int, buffer: int) -> Iterator[Row]:
    """Rows in an order fixed by (seed, epoch): each block of `buffer` rows is shuffled on its own."""
    block: list[Row] = []
    for number, row in enumerate(rows):
        block.append(row)
        if len(block) == buffer:
            yield from _shuffle_block(block, seed, epoch, number // buffer)
            block = []
    if block:
        yield from _shuffle_block(block, seed, epoch, -1)


def _shuffle_block(block: list[Row], seed: int, epoch: int, index: int) -> list[Row]:
    # A str seed is hashed with SHA-512, so the order does not depend on PYTHONHASHSEED or the platform.
    random.Random(f"recipec:{seed}:{epoch}:{index}").shuffle(block)
    return block


def row_stream(source: DocumentSource, seq_len: int, passes: int, seed: int, buffer: int) -> Iterator[Row]:
    """Every row the run may read, pass after pass, each pass in its own seeded order."""
    for epoch in range(passes):
        yield from shuffled(pack(source(), seq_len), seed, epoch, buffer)


def corpus_tokens(source: DocumentSource) -> int:
    """Tokens in one pass over the corpus (a pass that reads lengths only)."""
    return sum(len(document.ids) for document in source())


@dataclass(frozen=True)
class MicroBatch:
    """Tensors for one forward pass, and how many tokens it holds and predicts."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    tokens: int
    target_tokens: int


def collate(rows: Sequence[Row], pad_id: int = 0) -> MicroBatch:
    """Rows padded to the longest one, with next-token labels that never cross a document boundary."""
    width = max(len(row.ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, row in enumerate(rows):
        n = len(row.ids)
        input_ids[r, :n] = torch.tensor(row.ids)
        # Padding is a document of its own (positions from 0), so real tokens never attend to it.
        position_ids[r] = torch.tensor(row.positions + tuple(range(width - n)))
        labels[r, :n - 1] = torch.tensor(_next_token_labels(row))
    return MicroBatch(input_ids, position_ids, labels, sum(len(row.ids) for row in rows),
                      int((labels != IGNORE).sum()))


def _next_token_labels(row: Row) -> list[int]:
    """Label at t: the token at t+1 when it is a target of the same document, else IGNORE."""
    return [row.ids[t + 1] if row.targets[t + 1] and row.positions[t + 1] != 0 else IGNORE
            for t in range(len(row.ids) - 1)]
