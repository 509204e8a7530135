"""Attention over packed rows, document by document: what the training loop's models attend with.

A packed row holds several documents, each with positions restarting at 0 (packing.py). transformers keeps
them apart by building a block-diagonal mask from the position ids, which takes the scaled-dot-product
attention off its causal fast path: every query is scored against the whole row, and the mask itself is a
batch × row × row tensor. Here each document is attended to on its own instead, with the causal kernel:
the work is the sum of the squares of the documents' lengths rather than the square of the row's, and no
mask exists. The results are those of the masked computation, to float rounding (test_train_loop.py).

Below `PER_DOCUMENT_FROM` tokens a row's attention is cheap and one masked call costs less than a call per
document, so short rows keep transformers' own mask. `packed_attention(model)` switches a transformers model
to this for the duration of a `with` block, where its forward gets `position_ids` with no attention mask
and no cache, as the training loop calls it; any other call (a mask or a cache given) runs transformers'
own SDPA attention unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

NAME = "recipec_packed"
# Below this row length transformers' one masked call beats a call per document (a forward and backward on
# a CPU, rows of 20-400-token documents: 2048 tokens 1.7x faster per document, 512 1.08x, 128 0.94x).
PER_DOCUMENT_FROM = 512
# SDPA groups query heads over key/value heads itself from torch 2.5 on; before, the key/value heads repeat.
_SDPA_GROUPS = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def _segments(position_ids: torch.Tensor, batch: int, length: int) -> list[list[int]]:
    """For each row, the offsets where a document starts (its position does not follow the previous one)."""
    positions = position_ids.expand(batch, -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    rows: list[list[int]] = [[] for _ in range(batch)]
    for row, offset in starts.nonzero().tolist():
        rows[row].append(offset)
    return rows


def _attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (batch, heads, length, head size), key and value
    (batch, kv heads, length, head size); returns (batch, length, heads, head size)."""
    batch, _, length, _ = query.shape
    if attention_mask is not None or position_ids is None or key.shape[2] != length:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    grouping = {}
    if query.shape[1] != key.shape[1]:  # grouped-query attention
        if _SDPA_GROUPS:
            grouping = {"enable_gqa": True}
        else:
            key, value = (t.repeat_interleave(query.shape[1] // t.shape[1], dim=1) for t in (key, value))

    def attend(rows: slice, begin: int, end: int) -> torch.Tensor:
        return F.scaled_dot_product_attention(query[rows, :, begin:end], key[rows, :, begin:end],
                                              value[rows, :, begin:end], dropout_p=dropout, is_causal=True,
                                              scale=scaling, **grouping)

    segments = _segments(position_ids, batch, length)
    if all(row == [0] for row in segments):  # one document per row: the whole batch at once
        out = attend(slice(None), 0, length)
    else:
        out = torch.cat([torch.cat([attend(slice(b, b + 1), begin, end)
                                    for begin, end in zip(row, row[1:] + [length])], dim=2)
                         for b, row in enumerate(segments)], dim=0)
    return out.transpose(1, 2).contiguous(), None


def _mask(*args, attention_mask: torch.Tensor | None = None, q_length: int = 0, **kwargs):
    """The mask function of this implementation: none for rows long enough to attend document by document,
    else transformers' own (its block-diagonal mask for packed rows, or a padding mask), which the
    attention then hands to transformers' SDPA attention."""
    if attention_mask is None and q_length >= PER_DOCUMENT_FROM:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _mask)


@contextlib.contextmanager
def packed_attention(model) -> Iterator[bool]:
    """Attend document by document inside the block, where the model allows choosing its attention
    (yields whether it does); its own implementation is restored afterwards."""
    before = getattr(model.config, "_attn_implementation", None)
    if before not in ("sdpa", "eager", None) or not hasattr(model, "set_attn_implementation"):
        yield False  # flash or flex attention, chosen on purpose: they keep documents apart themselves
        return
    _register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError):
        yield False
        return
    try:
        yield True
    finally:
        model.set_attn_implementation(before or "sdpa")
