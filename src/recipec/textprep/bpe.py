"""Byte-level BPE training with the `tokenizers` library, written as a directory `AutoTokenizer` loads.

The same corpus (same texts, same order) and settings give the same bytes: training is deterministic, and
every file is written from sorted or ordered data. Byte-level means any text encodes (no unknown token) and
decodes back to itself. Special tokens take the first ids: BOS, EOS, PAD, the caller's extras, then any
marker the chat template writes (`<|im_start|>`), so a template never meets a tokenizer lacking its tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..store.atomic import write_text_atomic
from .errors import TextPrepError
from .templates import DEFAULT_CHAT_TEMPLATE, template_markers

BYTE_ALPHABET = 256
# Large enough that transformers never truncates or warns; the model's positions are the real limit.
MODEL_MAX_LENGTH = 1 << 30


def special_token_list(bos: str, eos: str, pad: str, extra: Iterable[str], chat_template: str | None) -> list[str]:
    """Every special token of a trained tokenizer, in id order, each once."""
    markers = template_markers(chat_template) if chat_template else []
    return list(dict.fromkeys([bos, eos, pad, *extra, *markers]))


def _non_empty(texts: Iterable[str], seen: list[int]) -> Iterator[str]:
    """The texts with content, counting them in `seen[0]` as the trainer consumes them."""
    for text in texts:
        if text.strip():
            seen[0] += 1
            yield text


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    """A byte-level BPE trained on `texts`, with `specials` at ids 0.. and BOS (the first) added to every text."""
    smallest = BYTE_ALPHABET + len(specials) + 1
    if vocab_size < smallest:
        raise TextPrepError(f"vocab_size {vocab_size} is too small for a byte-level BPE with {len(specials)} "
                            f"special tokens", f"use vocab_size >= {smallest}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = [0]
    tokenizer.train_from_iterator(_non_empty(texts, seen), trainer)
    if not seen[0]:
        raise TextPrepError("the corpus has no text to train a tokenizer on", "give a corpus with non-empty documents")
    bos = specials[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_tokenizer_dir(out_dir: Path, tokenizer: Tokenizer, bos: str, eos: str, pad: str,
                        chat_template: str | None) -> Path:
    """Write tokenizer.json, tokenizer_config.json, generation_config.json and chat_template.jinja."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "tokenizer.json", tokenizer.to_str(pretty=True) + "\n")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "pad_token": pad, "model_max_length": MODEL_MAX_LENGTH,
              "clean_up_tokenization_spaces": False}  # byte-level decoding is exact; never "clean" it
    write_text_atomic(out_dir / "tokenizer_config.json", _json(config))
    ids = {role: tokenizer.token_to_id(token) for role, token in (("bos", bos), ("eos", eos), ("pad", pad))}
    generation = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
    write_text_atomic(out_dir / "generation_config.json", _json(generation))
    if chat_template is not None:
        write_text_atomic(out_dir / "chat_template.jinja", chat_template)
    return out_dir


def train_bpe(texts: Iterable[str], out_dir: Path, vocab_size: int, special_tokens: Iterable[str] = (),
              chat_template: str | None = DEFAULT_CHAT_TEMPLATE, bos: str = "<s>", eos: str = "</s>",
              pad: str = "<pad>") -> Path:
    """Train a byte-level BPE on `texts` and write it to `out_dir` (loadable with AutoTokenizer); returns out_dir."""
    specials = special_token_list(bos, eos, pad, special_tokens, chat_template)
    tokenizer = train_bpe_tokenizer(texts, vocab_size, specials)
    return write_tokenizer_dir(Path(out_dir), tokenizer, bos, eos, pad, chat_template)
