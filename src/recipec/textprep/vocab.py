"""Vocabulary extension (the Chinese-LLaMA step): new tokens appended after every existing id, never moving one.

New tokens come from another tokenizer or from a corpus. For a corpus, a tokenizer of the base's kind is
trained with the base's own normalizer and pre-tokenizer, so its tokens are written in the same alphabet
(byte-level, or SentencePiece's `▁`) and combine with the base's. For a BPE the new tokens come with the merges
that build them, appended after the existing merges; a merge is taken only when both its parts are already in
the vocabulary, so every new token is reachable. A WordLevel vocabulary takes new whole words.
`extend_rows` gives an embedding or output matrix the rows for the new ids.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from ..store.atomic import write_text_atomic
from .errors import TextPrepError

EXTENDABLE = ("BPE", "WordLevel")
# Files carried over unchanged; vocab.json, merges.txt and tokenizer.model would describe the old vocabulary.
CARRIED_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                 "chat_template.json", "generation_config.json")
INIT_MODES = ("mean", "zero")


@dataclass(frozen=True)
class NewTokens:
    """Tokens to append, in order, and for a BPE the merges (pairs of existing tokens) that build them."""

    tokens: list[str]
    merges: list[tuple[str, str]]


@dataclass(frozen=True)
class Extension:
    """What an extension did: the old size (first new id), the new size, and the tokens appended."""

    old_size: int
    new_size: int
    added: list[str]


def read_tokenizer_json(directory: Path) -> dict:
    """The parsed tokenizer.json of a directory, refusing kinds whose vocabulary cannot grow."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise TextPrepError(f"no tokenizer.json in {directory}", "extend_vocab needs a fast tokenizer's tokenizer.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        kind = data["model"]["type"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise TextPrepError(f"{path} is not a tokenizer.json ({e})", "repair the file or rebuild the tokenizer") from None
    if kind not in EXTENDABLE:
        raise TextPrepError(f"cannot extend a {kind} tokenizer ({path})", f"extend_vocab supports {', '.join(EXTENDABLE)}")
    return data


def _merge_pair(merge) -> tuple[str, str]:
    return tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)  # old "a b" or new ["a", "b"]


def _specials(data: dict) -> set[str]:
    return {t["content"] for t in data.get("added_tokens", [])}


def new_tokens(base: dict, source: dict, add: int) -> NewTokens:
    """Up to `add` tokens of `source` that `base` lacks, in `source`'s id order (its most useful first)."""
    if base["model"]["type"] != source["model"]["type"]:
        raise TextPrepError(f"cannot take {source['model']['type']} tokens into a {base['model']['type']} tokenizer",
                            "extend with a tokenizer of the same kind, or from a corpus")
    if (base.get("normalizer"), base.get("pre_tokenizer")) != (source.get("normalizer"), source.get("pre_tokenizer")):
        raise TextPrepError("the two tokenizers split text differently (normalizer or pre-tokenizer), so their tokens "
                            "do not combine", "extend from a corpus instead")
    known = set(base["model"]["vocab"]) | _specials(base)
    built_by = {}
    for merge in source["model"].get("merges", []):
        left, right = _merge_pair(merge)
        built_by.setdefault(left + right, (left, right))
    tokens, merges = [], []
    skip = _specials(source)
    for token in sorted(source["model"]["vocab"], key=source["model"]["vocab"].get):
        if len(tokens) >= add:
            break
        if token in known or token in skip:
            continue
        pair = built_by.get(token)
        if pair is not None and not (pair[0] in known and pair[1] in known):
            continue  # its parts are not all there: the token could never be formed
        tokens.append(token)
        known.add(token)
        if pair is not None and base["model"]["type"] == "BPE":
            merges.append(pair)
    return NewTokens(tokens, merges)


def corpus_tokenizer(base: dict, texts: Iterable[str], vocab_size: int) -> dict:
    """A tokenizer of the base's kind trained on `texts` with the base's normalizer and pre-tokenizer."""
    tokenizer = Tokenizer.from_str(json.dumps(base))
    if base["model"]["type"] == "BPE":
        tokenizer.model = models.BPE(byte_fallback=bool(base["model"].get("byte_fallback")))
        byte_level = "ByteLevel" in json.dumps(base.get("pre_tokenizer"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [])
    else:
        tokenizer.model = models.WordLevel({}, unk_token=base["model"].get("unk_token"))
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False)
    tokenizer.train_from_iterator((t for t in texts if t.strip()), trainer)
    return json.loads(tokenizer.to_str())


def vocabulary_size(data: dict) -> int:
    """One past the largest id in use, model vocabulary and added tokens together."""
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids, default=-1) + 1


def extended(base: dict, new: NewTokens) -> dict:
    """`base` with `new` appended: tokens from the first unused id on, merges after the existing ones."""
    data = json.loads(json.dumps(base))
    first = vocabulary_size(base)
    for offset, token in enumerate(new.tokens):
        data["model"]["vocab"][token] = first + offset
    if data["model"]["type"] == "BPE":
        old = data["model"].get("merges", [])
        as_strings = bool(old) and isinstance(old[0], str)
        data["model"]["merges"] = old + [f"{a} {b}" if as_strings else [a, b] for a, b in new.merges]
    return data


def extend_tokenizer(base_dir: Path, out_dir: Path, add: int, other_dir: Path | None = None,
                     corpus: Iterable[str] | None = None) -> Extension:
    """Write to `out_dir` the tokenizer of `base_dir` with up to `add` new tokens from `other_dir` or `corpus`."""
    if (other_dir is None) == (corpus is None):
        raise TextPrepError("extend a vocabulary from another tokenizer or from a corpus, exactly one")
    if add < 1:
        raise TextPrepError(f"`add` must be a positive number of tokens, got {add}")
    base = read_tokenizer_json(base_dir)
    if other_dir is not None:
        source = read_tokenizer_json(other_dir)
    else:
        source = corpus_tokenizer(base, corpus, len(base["model"]["vocab"]) + add)
    new = new_tokens(base, source, add)
    if not new.tokens:
        raise TextPrepError("no new tokens: everything the source has is already in the vocabulary",
                            "extend from a corpus in the new language, or a tokenizer trained on one")
    data = extended(base, new)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Through `tokenizers` so the file is one it wrote and can read back.
    write_text_atomic(out_dir / "tokenizer.json", Tokenizer.from_str(json.dumps(data)).to_str(pretty=True) + "\n")
    for name in CARRIED_FILES:
        if (Path(base_dir) / name).is_file():
            shutil.copyfile(Path(base_dir) / name, out_dir / name)
    return Extension(vocabulary_size(base), vocabulary_size(data), new.tokens)


def extend_rows(weight: torch.Tensor, new_rows: int, init: str = "mean") -> torch.Tensor:
    """`weight` (rows × dim) with `new_rows` rows appended: the mean of the existing rows, or zeros."""
    if init not in INIT_MODES:
        raise TextPrepError(f"init must be one of {', '.join(INIT_MODES)}, got {init!r}")
    if new_rows < 0 or weight.dim() != 2:
        raise TextPrepError(f"cannot append {new_rows} rows to a tensor of shape {tuple(weight.shape)}")
    if init == "mean":
        row = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # summed in fp32: bf16 sums drift
    else:
        row = weight.new_zeros(1, weight.shape[1])
    return torch.cat([weight, row.expand(new_rows, -1)])
