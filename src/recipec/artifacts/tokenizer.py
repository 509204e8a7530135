"""The tokenizer kind: a directory of tokenizer files (tokenizer.json, its config, vocabularies, chat
template), digested and released as those files."""

from __future__ import annotations

from pathlib import Path

from ..ir.types import Kind
from ..store.model_dir import TOKENIZER_FILES
from . import ArtifactError, ArtifactKind, Problem, register

TOKENIZER = Kind.register("Tokenizer")


@register
class TokenizerKind(ArtifactKind):
    kind = TOKENIZER
    noun = "a tokenizer"
    formats = ("hf",)

    @classmethod
    def content_files(cls, path: Path) -> list[Path]:
        return [path / name for name in TOKENIZER_FILES if (path / name).is_file()]

    @classmethod
    def read(cls, path: Path) -> list[Path]:
        found = cls.content_files(path)
        if not found:
            raise ArtifactError([Problem("E401", f"no tokenizer files in {path}",
                                         "a tokenizer directory holds tokenizer.json or tokenizer_config.json")])
        return found
