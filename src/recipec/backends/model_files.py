"""Everything in a model directory besides the weights: config, generation config, tokenizer, chat template.

Default rules for a combination: the first model's config (its dtype updated to the output's) and
tokenizer; when a chat model takes part (the leaf with the largest positive coefficient after the
first), its chat template and its end-of-sequence tokens, because that is the behaviour the chat
vector carries. Only data files are copied: never Python files, so no remote code can travel.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..dtypes import DTYPE_CODES, TensorSpec
from ..ops.base import FileDigest, FileDigests
from ..store.model_dir import TOKENIZER_FILES
from ..store.tensors import write_json
from .job import Job

_DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}  # "BF16" -> "bfloat16", for config.json


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def chat_leaf(weights: tuple[float, ...]) -> int | None:
    """Which input is the chat model of a chat-vector combination or of a merge, if any: the one with the
    largest positive weight after the first (`weights`: one per input, the base of a merge left out)."""
    best = max(range(1, len(weights)), key=lambda i: weights[i], default=None)
    return best if best is not None and weights[best] > 0 else None


def copy_model_files(job: Job, out: list[TensorSpec], weights: tuple[float, ...],
                     tokenizer: FileDigests | None = None, chat_template: FileDigest | None = None) -> None:
    """Config, generation config, tokenizer and chat template for a combined model whose inputs take
    `weights`; `tokenizer` and `chat_template` replace the first model's when given."""
    first = job.inputs[0].path
    config = dict(job.inputs[0].files.config)
    dtypes = {t.dtype for t in out}
    dominant = max(dtypes, key=lambda d: sum(t.nbytes for t in out if t.dtype == d)) if dtypes else None
    if dominant in _DTYPE_NAMES:
        config["dtype"] = _DTYPE_NAMES[dominant]
        config.pop("torch_dtype", None)
    write_json(job.out / "config.json", config)
    source = Path(tokenizer.path) if tokenizer else first
    for name in TOKENIZER_FILES:
        if name != "generation_config.json" and (source / name).is_file():
            shutil.copyfile(source / name, job.out / name)
    generation = _read_json(first / "generation_config.json")
    chat = chat_leaf(weights)
    if chat is not None:
        _carry_chat_behaviour(job.inputs[chat].path, job.out, generation)
    elif generation is not None:
        write_json(job.out / "generation_config.json", generation)
    if chat_template:
        set_chat_template(job.out, Path(chat_template.path).read_text(encoding="utf-8"))


def set_chat_template(out: Path, template: str) -> None:
    """An explicit chat template wins over every default: in the file transformers 5 reads, and in
    tokenizer_config.json for older readers."""
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    config = _read_json(out / "tokenizer_config.json")
    if config is not None:
        config["chat_template"] = template
        write_json(out / "tokenizer_config.json", config)


def _carry_chat_behaviour(chat_dir: Path, out: Path, generation: dict | None) -> None:
    chat_generation = _read_json(chat_dir / "generation_config.json")
    if chat_generation is not None:
        generation = dict(generation or {})
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if key in chat_generation:
                generation[key] = chat_generation[key]
    if generation is not None:
        write_json(out / "generation_config.json", generation)
    if (chat_dir / "chat_template.jinja").is_file():
        shutil.copyfile(chat_dir / "chat_template.jinja", out / "chat_template.jinja")
    chat_config = _read_json(chat_dir / "tokenizer_config.json") or {}
    ours = _read_json(out / "tokenizer_config.json")
    if ours is not None:
        for key in ("chat_template", "eos_token"):
            if key in chat_config:
                ours[key] = chat_config[key]
        write_json(out / "tokenizer_config.json", ours)


def tokenizer_vocab(model_dir: Path) -> dict[int, str] | None:
    """id -> token string from tokenizer.json (model vocabulary plus added tokens), or None."""
    data = _read_json(model_dir / "tokenizer.json")
    if data is None:
        return None
    vocab = (data.get("model") or {}).get("vocab")
    table: dict[int, str] = {}
    if isinstance(vocab, dict):
        table.update({i: tok for tok, i in vocab.items() if isinstance(i, int)})
    elif isinstance(vocab, list):  # unigram: [[piece, score], ...]
        table.update({i: entry[0] for i, entry in enumerate(vocab) if isinstance(entry, list) and entry})
    for added in data.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("id"), int):
            table[added["id"]] = added.get("content", "")
    return table


def tokenizer_rows(model_dir: Path, special: bool) -> set[int]:
    """Ids of a tokenizer's special tokens (added tokens marked special, and bos/eos/unk/pad)."""
    data = _read_json(model_dir / "tokenizer.json") or {}
    rows = {a["id"] for a in data.get("added_tokens") or []
            if isinstance(a, dict) and isinstance(a.get("id"), int) and (a.get("special") or not special)}
    vocab = {tok: i for i, tok in (tokenizer_vocab(model_dir) or {}).items()}
    config = _read_json(model_dir / "tokenizer_config.json") or {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and token in vocab:
            rows.add(vocab[token])
    return rows


def check_shared_tokens(job: Job, rows: int) -> str | None:
    """None when every input's tokenizer gives the same token for each shared row; else what differs.

    Equal shapes do not prove equal vocabularies: a row must mean the same token in every model for
    arithmetic on it to mean anything. Inputs without tokenizer.json cannot be checked and are skipped.
    """
    # Models are named as the recipe names them (cache directories have only hashes for names).
    tables = [(f"`{n.label}`", tokenizer_vocab(a.path)) for n, a in zip(job.node.inputs, job.inputs)]
    tables = [(name, t) for name, t in tables if t is not None]
    if len(tables) < 2:
        return None
    (first_name, first), rest = tables[0], tables[1:]
    for name, table in rest:
        for row in range(rows):
            if first.get(row) != table.get(row):
                return f"row {row} is token {first.get(row)!r} in {first_name} but {table.get(row)!r} in {name}"
    return None
