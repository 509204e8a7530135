"""The corpus kind: text documents, normalized to `{"text": ...}` records (see data.py).

`text(glob, field=)` reads JSON-lines files (`.jsonl`, `.json`: one object per line, the text in
`field`) and plain text files (anything else: one record per non-blank line, as Hugging Face's `text`
loader reads them). Ops read it with `iter_texts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..ir.types import Kind
from . import Artifact, Problem, register
from .data import DataKind, Records, iter_records, json_lines, lines

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


@register
class CorpusKind(DataKind):
    kind = Kind.CORPUS
    noun = "a corpus"
    record_noun = "document"


def read_texts(path: Path, shown: str, field: str) -> Records:
    """The text records of one corpus file, and a Problem for each line that has none."""
    if path.suffix not in JSON_SUFFIXES:
        for number, text in lines(path, shown):
            if isinstance(text, Problem) or text.strip():
                yield text if isinstance(text, Problem) else {"text": text.rstrip("\r\n")}
        return
    for number, value in json_lines(path, shown):
        if isinstance(value, Problem):
            yield value
        elif not isinstance(value, dict) or field not in value:
            yield Problem("E552", f"{shown}:{number}: no field `{field}`",
                          f"each line needs a string `{field}`; name the field with `text(..., field=\"...\")`")
        elif not isinstance(value[field], str):
            yield Problem("E552", f"{shown}:{number}: field `{field}` is {type(value[field]).__name__}, not a string",
                          "the text field holds the document as a string")
        else:
            yield {"text": value[field]}


def iter_texts(artifact: Artifact) -> Iterator[str]:
    """Every document of a corpus, in file order, streamed."""
    for record in iter_records(artifact):
        yield record["text"]
