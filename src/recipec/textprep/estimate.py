"""How many tokens and documents a corpus holds, estimated at check time from a sample, before any tokenizer.

`plan` sizes training steps, time and memory from a corpus's tokens, long before it is tokenized (the
tokenizer may not even exist yet). Bytes alone mislead by a factor of two or more exactly where recipec is
used most: UTF-8 spends 3 bytes on a Chinese character, which BPE vocabularies turn into about one token,
while English averages about 4 characters per token; JSON lines add keys and quotes that are never
tokenized. So the estimate reads the start of each file (at most `SAMPLE_BYTES`, a few files when there
are many), counts the characters the text holds (JSON strings only, for JSON lines) by script, and scales
the counts to the file sizes. Documents are counted too (non-blank lines, or JSON lines): each one adds an
end-of-text token, and a chat template around each under `inscp`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

SAMPLE_BYTES = 64 << 10  # read from the start of a file: enough lines for a ratio, cheap on every check
SAMPLED_FILES = 8  # at most, spread over the files, so that a corpus of thousands is estimated as fast
CHARS_PER_TOKEN = 4.0  # alphabetic scripts, spaces and punctuation (BPE on English prose: 3.5-4.5)
TOKENS_PER_WIDE_CHAR = 1.3  # CJK, kana, hangul (Llama-2's vocabulary and small BPEs ≈1.4; one extended for
# Chinese ≈0.7)

_WIDE = re.compile("[\u1100-\u11ff\u2e80-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef]")


class TextEstimate(NamedTuple):
    tokens: int  # of the text, one end-of-text token per document included
    documents: int


def estimate_files(files: list[Path], is_json: Callable[[Path], bool]) -> TextEstimate:
    """Tokens and documents of these files (a corpus or a chat dataset), from a sample of each; `is_json`
    says which files hold JSON lines, as the data source reads them."""
    sizes = [path.stat().st_size for path in files]
    chosen = _spread(len(files), SAMPLED_FILES)
    tokens = documents = 0.0
    sampled_bytes = sum(sizes[i] for i in chosen)
    for i in chosen:
        sample_tokens, sample_documents, read = _sample(files[i], is_json(files[i]))
        if read:
            tokens += sample_tokens * sizes[i] / read
            documents += sample_documents * sizes[i] / read
    scale = sum(sizes) / sampled_bytes if sampled_bytes else 0.0  # the files not sampled are like those that were
    return TextEstimate(round((tokens + documents) * scale), round(documents * scale))


def _spread(count: int, most: int) -> list[int]:
    """Indices of at most `most` of `count` items, evenly spread, first and last included."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def _sample(path: Path, is_json: bool) -> tuple[float, int, int]:
    """(tokens, documents, bytes read) of the start of a file; whole lines only, unless the first is longer."""
    with open(path, "rb") as f:
        data = f.read(SAMPLE_BYTES)
    if len(data) == SAMPLE_BYTES and b"\n" in data:
        data = data[:data.rindex(b"\n") + 1]
    lines = [line for line in data.decode("utf-8", errors="replace").splitlines() if line.strip()]
    if is_json:
        lines = [" ".join(_strings(_json_or_text(line))) for line in lines]
    return sum(_tokens(line) for line in lines), len(lines), len(data)


def _json_or_text(line: str):
    try:
        return json.loads(line)
    except ValueError:  # the run reports it, with its line; the estimate takes it as text
        return line


def _strings(value) -> list[str]:
    """Every string in a JSON value (a record's text, a conversation's contents and roles)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _tokens(text: str) -> float:
    wide = len(_WIDE.findall(text))
    return wide * TOKENS_PER_WIDE_CHAR + (len(text) - wide) / CHARS_PER_TOKEN
