"""Kinds of result: what a node's output is on disk, how it is read, digested, shown and released.

A result is an `Artifact`: its kind, a content digest, metadata and a directory (in the cache, or an
input's own directory). Each kind of result is one module here whose `ArtifactKind` subclass says, in
one place, how such a directory is read, what its digest covers, how `plan` describes it, which export
formats it accepts and what files a release of it holds. A module registers its kind on import with
`@register`; an op family may add a kind the same way, and the engine, the lowerer and the release
writer handle it without a change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from ..ir.types import Kind, Type
from ..store.cache import OBJECT_META
from ..store.filehash import content_digest, content_file_hash
from ..store.release import ReleaseFile


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input or a built directory, for a diagnostic at the node's span."""

    code: str
    message: str
    hint: str | None = None


class ArtifactError(Exception):
    """A directory or input that cannot be read as its kind; carries every problem found, to report at once."""

    def __init__(self, problems: list[Problem]):
        super().__init__(problems[0].message if problems else "unreadable artifact")
        self.problems = problems


@dataclass
class Artifact:
    """A result: its kind, where its files are, its content digest and whatever metadata its kind keeps."""

    kind: Kind
    path: Path
    digest: str
    meta: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def files(self) -> Any:
        """The directory as its kind reads it (a model's `ModelFiles`), read on first use."""
        return artifact_kind(self.kind).read(self.path)


@dataclass(frozen=True)
class ReleaseInfo:
    """What a release may say about where its artifact came from (a model's card uses all of it)."""

    recipe_name: str
    recipe_text: str
    lock_digest: str
    base_models: tuple[str, ...] = ()
    relation: str = "finetune"
    known: dict[str, str] = field(default_factory=dict)  # sha256 of files already hashed (a cache object's)
    keep_code: bool = False
    card_sections: tuple[str, ...] = ()  # what the recipe's reports say about this artifact (Markdown)


class ArtifactKind:
    """How one kind of result lives on disk. Subclasses set `kind` and override what differs."""

    kind: ClassVar[Kind]
    noun: ClassVar[str]  # how messages name it: "a model", "a report"
    formats: ClassVar[tuple[str, ...]] = ()  # export formats it accepts, the default first; () = not exportable
    root_when_bound: ClassVar[bool] = False  # built and shown by `run` whenever the main recipe binds one

    @classmethod
    def read(cls, path: Path) -> Any:
        """The directory's content as rules use it; raises ArtifactError when it is not of this kind."""
        return None

    @classmethod
    def content_files(cls, path: Path) -> list[Path]:
        """The files the digest covers and a release holds: by default every file of the directory."""
        return sorted(p for p in path.iterdir() if p.is_file() and p.name != OBJECT_META)

    @classmethod
    def digest(cls, path: Path, built: str | None = None) -> str:
        """The content digest of a directory of this kind; `built` is what its rule returned, if anything."""
        return files_digest({p.name: content_file_hash(p) for p in cls.content_files(path)})

    @classmethod
    def reproducible_views(cls, path: Path) -> dict[str, bytes]:
        """Files of a directory of this kind (a result or a release of it) that hold measurements, each as
        its reproducible part, the measured values masked; raises ArtifactError where they are malformed.
        Those files are compared by that part. By default no file holds a measurement."""
        return {}

    @classmethod
    def measured_what(cls, path: Path) -> str | None:
        """What the measurements of such a directory are, in words; None when it holds none."""
        return None

    @classmethod
    def card_section(cls, path: Path, model_label: str, report_label: str) -> str | None:
        """What a result of this kind, bound to `report_label`, says about the model labelled `model_label`
        (one of the nodes it was built from), as Markdown for that model's card; None when nothing."""
        return None

    @classmethod
    def describe(cls, type_: Type) -> str:
        """How `plan` shows a value of this kind."""
        return str(type_)

    @classmethod
    def release_files(cls, artifact: Artifact, info: ReleaseInfo, fmt: str) -> list[ReleaseFile]:
        """What a release in format `fmt` holds: by default a copy of every content file."""
        return [ReleaseFile(p.name, source=p, sha256=info.known.get(p.name)) for p in cls.content_files(artifact.path)]


def files_digest(named: dict[str, str]) -> str:
    """A content digest over files by name and hash (their order and the directory's place do not matter)."""
    return content_digest(named)


KINDS: dict[Kind, type[ArtifactKind]] = {}


def register(kind: type[ArtifactKind]) -> type[ArtifactKind]:
    """Class decorator: make `kind.kind` values storable, digestible and (if it has formats) exportable."""
    assert kind.kind not in KINDS, f"artifact kind {kind.kind} registered twice"
    KINDS[kind.kind] = kind
    return kind


def artifact_kind(kind: Kind) -> type[ArtifactKind]:
    """The artifact kind of a value kind; KeyError when values of that kind are never results (Scalar)."""
    return KINDS[kind]


def exportable_kinds() -> list[str]:
    """The kinds an `export` accepts, with their formats, for messages."""
    return [f"{k.value} ({', '.join(a.formats)})" for k, a in KINDS.items() if a.formats]


from . import corpus, dataset, model, onnx, report, tokenizer  # noqa: E402,F401  (registration happens on import)

__all__ = ["KINDS", "Artifact", "ArtifactError", "ArtifactKind", "Problem", "ReleaseInfo", "artifact_kind",
           "exportable_kinds", "files_digest", "register"]
