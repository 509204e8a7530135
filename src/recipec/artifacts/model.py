"""The model kind: a Hugging Face model folder (config.json, safetensors weights, tokenizer files).

Its digest is that of store/digests.py: weights by content plus every data file. A release holds the
data files a release may hold (store/release_files.py), config code references removed unless the
recipe kept them, and a model card (`README.md`) whose front matter names the base models and whose
body carries the recipe and its lock digest, then what the recipe's reports say about the model (its
column of an `eval`). A delta is stored the same way but is never released.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..ir.types import Kind
from ..store import release_files
from ..store.cache import Cache
from ..store.digests import covered_files, model_dir_digest, remembered_model_dir_digest, weights_identity
from ..store.filehash import hash_files
from ..store.model_dir import ModelDirError, ModelFiles, read_model_dir, weight_files
from ..store.release import ReleaseFile
from . import Artifact, ArtifactError, ArtifactKind, Problem, ReleaseInfo, register


@register
class ModelKind(ArtifactKind):
    kind = Kind.MODEL
    noun = "a model"
    formats = ("hf",)

    @classmethod
    def read(cls, path: Path) -> ModelFiles:
        try:
            return read_model_dir(path)
        except ModelDirError as err:
            raise ArtifactError([Problem(err.code, err.message, err.hint)]) from None

    @classmethod
    def content_files(cls, path: Path) -> list[Path]:
        return covered_files(path)

    @classmethod
    def digest(cls, path: Path, built: str | None = None) -> str:
        """`built` is the weights' digest, which every model rule returns (it hashed them as it wrote them)."""
        assert built is not None, "a model rule returns its weights' digest"
        return model_dir_digest(path, built)

    @classmethod
    def release_files(cls, artifact: Artifact, info: ReleaseInfo, fmt: str) -> list[ReleaseFile]:
        files = [_release_file(entry, info) for entry in sorted(artifact.path.iterdir())
                 if entry.is_file() and release_files.is_release_file(entry.name)]
        own_code = release_files.recipec_code_file(_read_config(artifact.path / "config.json"))
        if own_code is not None:
            files.append(ReleaseFile(own_code[0], text=own_code[1].decode("utf-8")))
        return files + [ReleaseFile("README.md", text=card_text(info, artifact.digest))]


@register
class DeltaKind(ModelKind):
    """A difference between models, stored as a model folder; only ever an input of another op."""

    kind = Kind.DELTA
    noun = "a delta"
    formats = ()


def input_digest(files: ModelFiles, cache: Cache, threads: int, rehash: bool) -> str:
    """An input directory's digest; its weights are hashed only when their digest is not remembered."""
    identity = weights_identity(files.root)
    weights = cache.known_digests().get(identity)
    if not weights or rehash:
        from ..store.hash_process import weights_digest  # reads every weight

        weights = weights_digest(files, threads)
        cache.remember_digest(identity, weights)
    return model_dir_digest(files.root, weights)


def remembered_input_digest(root: Path | None, known: dict[str, str]) -> str | None:
    """An input directory's digest without reading a weight, when its weights' digest is remembered."""
    try:
        return remembered_model_dir_digest(root, known) if root and weight_files(root) else None
    except (ModelDirError, OSError):
        return None


def file_records(root: Path, threads: int) -> list[dict]:
    """Every file a model directory's digest covers, with size and sha256, as the lock lists them."""
    sums = hash_files(covered_files(root), threads)
    return [{"name": p.name, "size": p.stat().st_size, "sha256": h} for p, h in sorted(sums.items())]


def _release_file(entry: Path, info: ReleaseInfo) -> ReleaseFile:
    known = info.known.get(entry.name)
    if release_files.is_weight_file(entry.name):
        return ReleaseFile(entry.name, source=entry, shared=known is not None, read_only=True, sha256=known)
    stripped = None if info.keep_code or entry.name not in release_files.CODE_FILES else _without_code(entry)
    if stripped is not None:
        return ReleaseFile(entry.name, text=stripped)
    return ReleaseFile(entry.name, source=entry, sha256=known)


def _read_config(source: Path) -> dict:
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _without_code(source: Path) -> str | None:
    """A config file's text with its code references removed (a recipec_* config.json then names recipec's
    own modeling file), or None when that changes nothing."""
    data = _read_config(source)
    cleaned = (release_files.with_recipec_code(data) if source.name == "config.json"
               else release_files.without_code_references(data))
    if cleaned == data:
        return None
    return json.dumps(cleaned, indent=2, ensure_ascii=False) + "\n"


def card_text(info: ReleaseInfo, model_digest: str) -> str:
    """The model card: hub front matter (base models and their relation), the recipe and its digests, then
    what the recipe's reports say about the model (its column of an `eval`)."""
    front = ["---"]
    if info.base_models:
        front.append("base_model:")
        front += [f"- {m}" for m in info.base_models]
        front.append(f"base_model_relation: {info.relation}")
    front += ["tags:", "- recipec", "---", ""]
    body = [
        f"# {info.recipe_name}", "",
        "Built by recipec from this recipe:", "",
        "```", info.recipe_text.rstrip("\n"), "```", "",
        f"- lock digest: `{info.lock_digest}`",
        f"- model digest: `{model_digest}` (covers every tensor and every data file: config, tokenizer, chat template)",
        "", "`recipec verify` rebuilds this model from the recipe and its lockfile and compares it byte for byte.", "",
    ]
    return "\n".join(front + body + list(info.card_sections))
