"""Source ops: where models and data come from (`load`, `hf`, `init`, `text`, `chat`).

Their type rules read only config.json and safetensors headers, so `check` and `plan` stay fast and
never read a weight or touch the network. A string where a model is expected goes through
`model_reference`: a local path (relative to the recipe) when it looks like one, otherwise a hub id.
"""

from __future__ import annotations

import difflib
import glob as globlib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from .. import arch as archs
from ..artifacts import Artifact, Problem
from ..artifacts.corpus import JSON_SUFFIXES, CorpusKind, read_texts
from ..artifacts.data import remembered_records_digest, resolve_records
from ..artifacts.dataset import DatasetKind, read_conversations
from ..artifacts.model import ModelKind, file_records, input_digest, remembered_input_digest
from ..artifacts.tokenizer import TOKENIZER
from ..dtypes import DTYPE_CODES
from ..ir.types import Kind, Signature, Type
from ..store import hub
from ..store.filehash import named_file_hashes
from ..store.model_dir import (TOKENIZER_FILES, ModelDirError, ModelFiles, check_json_files, pickled_weights,
                               read_config, read_model_dir)
from ..textprep.estimate import estimate_files
from .base import ERROR_TYPE, Context, Cost, FileDigests, Input, Op, Params, register
from .resolve import ResolveContext, Resolved

def signature_of_dir(root: Path) -> Signature:
    """The signature of a local model directory, from config.json and safetensors headers."""
    return signature_of_files(read_model_dir(root))


def signature_of_files(files: ModelFiles) -> Signature:
    """The signature of a model directory already read."""
    tensors = {name: (t.dtype, t.shape) for name, t in files.tensors.items()}
    config = files.config
    tied = "lm_head.weight" not in tensors and bool(config.get("tie_word_embeddings", True))
    return Signature.build(config["model_type"], tensors, _vocab_size(config), tied, config_facts(config))


def signature_of_config(config: dict, dtype: str | None = None) -> Signature:
    """The signature a config implies for a freshly initialized model (no files needed)."""
    facts = archs.facts_from_config(config)
    shapes = archs.tensor_shapes_from_facts(config["model_type"], facts)
    dt = dtype or archs.config_dtype(config)
    tied = bool(config.get("tie_word_embeddings", False))
    return Signature.build(config["model_type"], {n: (dt, s) for n, s in shapes.items()}, _vocab_size(config), tied,
                           facts)


def config_facts(config: dict) -> archs.ArchFacts | None:
    """A config's shape facts, or None where recipec has no tensor table for its architecture."""
    try:
        return archs.facts_from_config(config)
    except ValueError:
        return None


def _vocab_size(config: dict) -> int | None:
    value = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return value if isinstance(value, int) else None


def _dir_type(ctx: Context, root: Path, arg: str) -> Type:
    try:
        signature = signature_of_dir(root)
        check_json_files(root)
    except ModelDirError as err:
        return ctx.error(err.code, err.message, arg, err.hint)
    return Type(Kind.MODEL, signature)


@register
class Load(Op):
    """A local Hugging Face model directory (config.json + safetensors). Example: `load("models/base")`"""

    name = "load"
    positional = ("path",)
    builds = False

    class Params(Params):
        path: str = Field(description="a model directory, relative to the recipe")
        allow_pickle: bool = Field(False, description="whether pickled weights may be read (weights_only=True)")
        remote_code: bool = Field(False, description="whether releases built from this model keep its config's "
                                  "references to code (`auto_map`); the code files themselves are never shipped")

    @classmethod
    def output_type(cls, ctx, inputs, params):
        root = ctx.recipe_dir / params.path
        if not root.exists():
            return _missing_directory(ctx, params.path, "path")
        only_pickles = root.is_dir() and pickled_weights(root) and not (root / "model.safetensors").exists()
        if params.allow_pickle and only_pickles:
            try:
                read_config(root)
            except ModelDirError as err:
                return ctx.error(err.code, err.message, "path", err.hint)
            return Type(Kind.MODEL, None)  # a pickle has no header: its signature is known once converted
        return _dir_type(ctx, root, "path")

    @classmethod
    def node_params(cls, params, ctx):
        return {"path": str((ctx.recipe_dir / params.path).resolve()), "allow_pickle": params.allow_pickle,
                "remote_code": params.remote_code}

    @classmethod
    def source_dir(cls, params, recipe_dir):
        return recipe_dir / params["path"]

    @classmethod
    def resolve(cls, node, ctx: ResolveContext) -> Resolved:
        path = Path(node.params["path"])
        return _resolve_model_dir(node, path, {"path": ctx.relative(path)}, ctx)

    @classmethod
    def remembered_digest(cls, node, cache):
        return remembered_input_digest(Path(node.params["path"]), cache.known_digests())


@register
class Hf(Op):
    """A model on the Hugging Face hub, pinned by revision. Example: `hf("meta-llama/Llama-2-7b-hf", revision="main")`

    Resolved from the local hub cache when it is there; otherwise its signature is unknown until
    `recipec lock` resolves it. Never downloads during check or plan.
    """

    name = "hf"
    positional = ("id",)
    builds = False

    class Params(Params):
        id: str = Field(description="a hub repository id such as `org/name`")
        revision: str | None = Field(None, description="a branch, tag or commit to pin")

    @classmethod
    def output_type(cls, ctx, inputs, params):
        if not hub.is_hub_id(params.id):
            return ctx.error("E206", f"{params.id!r} is not a hub id", "id",
                             "hub ids look like `org/name`; for a local directory use load(\"path\")")
        cached = hub.cached_snapshot(params.id, params.revision)
        if cached is None:
            return Type(Kind.MODEL, None)
        return _dir_type(ctx, cached[0], "id")

    @classmethod
    def hub_reference(cls, params):
        return params["id"], params.get("revision")

    @classmethod
    def read_places(cls, params, recipe_dir):
        # The whole repository in the hub cache: its snapshots and the blobs they link to.
        return [snapshot.parent.parent for snapshot in super().read_places(params, recipe_dir)]

    @classmethod
    def source_dir(cls, params, recipe_dir):
        cached = hub.cached_snapshot(params["id"], params.get("revision"))
        return cached[0] if cached is not None else None

    @classmethod
    def resolve(cls, node, ctx: ResolveContext) -> Resolved:
        path, commit = ctx.hub_snapshots[cls.hub_reference(node.params)]
        record = {"id": node.params["id"], "revision": node.params.get("revision") or "main", "commit": commit}
        return _resolve_model_dir(node, path, record, ctx)

    @classmethod
    def remembered_digest(cls, node, cache):
        return remembered_input_digest(cls.source_dir(node.params, Path()), cache.known_digests())

    @classmethod
    def base_model(cls, record):
        return record.get("id")


def _resolve_model_dir(node, path: Path, record: dict, ctx: ResolveContext) -> Resolved:
    """A model directory as an input artifact: pickles converted when allowed, weights hashed unless remembered."""
    if node.params.get("allow_pickle") and pickled_weights(path) and not (path / "model.safetensors").exists():
        path = ctx.convert_pickle(path)
        record.update(converted_from_pickle=True, converted_key=path.name)  # a gc root keeps it
    files = ModelKind.read(path)
    artifact = Artifact(Kind.MODEL, path, input_digest(files, ctx.cache, ctx.threads, ctx.hash_files))
    artifact.files = files  # read already
    if ctx.hash_files:
        record["files"] = file_records(path, ctx.threads)
    return Resolved(artifact, record)


def model_reference(ctx: Context, text: str) -> tuple[type[Op], Params] | None:
    """A string where a model is expected: a local directory or a hub id.

    A string is a local path when it starts with `./`, `../` or `/`, or when its first component
    exists beside the recipe; only then can a typo be caught instead of becoming a hub id.
    """
    if _is_local_path(ctx.recipe_dir, text):
        if (ctx.recipe_dir / text).is_dir():
            return Load, Load.Params(path=text)
        _missing_directory(ctx, text)
        return None
    if hub.is_hub_id(text):
        return Hf, Hf.Params(id=text)
    ctx.error("E401", f"no model directory {text!r} (relative to {ctx.recipe_dir}) and not a hub id",
              hint="a model reference is a local directory with config.json, or a hub id like `org/name`")
    return None


def _is_local_path(recipe_dir: Path, text: str) -> bool:
    if text in (".", "..") or text.startswith(("./", "../", "/")):
        return True
    first = text.split("/", 1)[0]
    return bool(first) and (recipe_dir / first).exists()


def _missing_directory(ctx: Context, text: str, arg: str | None = None) -> Type:
    """E401 for a local model path that does not exist, suggesting the nearest directory that does."""
    nearest = nearest_directory(ctx.recipe_dir, text)
    return ctx.error("E401", f"no model directory {text!r} (relative to {ctx.recipe_dir})", arg,
                     f"did you mean {nearest!r}?" if nearest else
                     "paths in a recipe are relative to the recipe's own directory")


def nearest_directory(recipe_dir: Path, text: str) -> str | None:
    """The existing directory closest to a mistyped path, component by component: each one that exists,
    else the sibling whose name is most like it (`out/m33` -> `out/m3`, `mdoels/qs` -> `models/qs`),
    as deep as the guesses go; None when the path exists or nothing is close."""
    parts = [p for p in text.split("/") if p not in ("", ".")]
    prefix: list[str] = []
    base = Path("/") if text.startswith("/") else recipe_dir
    guessed = False
    for part in parts:
        here = base.joinpath(*prefix)
        if (here / part).is_dir():
            prefix.append(part)
            continue
        try:
            siblings = sorted(p.name for p in here.iterdir() if p.is_dir())
        except OSError:
            break
        close = difflib.get_close_matches(part, siblings, n=1, cutoff=0.6)
        if not close:
            break
        prefix.append(close[0])
        guessed = True
    if not guessed:
        return None
    guess = "/".join(prefix)
    return ("/" + guess) if text.startswith("/") else ("./" + guess) if text.startswith("./") else guess


@register
class Init(Op):
    """A randomly initialized model from a preset or a config, seeded. Example: `init("llama", size="tiny", seed=1)`"""

    name = "init"
    positional = ("arch",)
    # A tokenizer value (`tokenizer=tokenizer(corpus, ...)`) is an input, and the model's vocabulary follows its
    # size; a string `tokenizer="dir"` stays the parameter of the same name, whose files are copied as they are.
    inputs = (Input("tokenizer", TOKENIZER, optional=True, doc="a tokenizer the model is sized to and ships with"),)
    toolchain = ("torch", "transformers")
    rule = "sources:build_init"

    class Params(Params):
        arch: str = Field(description="the architecture family: " + ", ".join(archs.ARCHS))
        size: str | None = Field(None, description="a preset size: " + ", ".join(archs.SIZES))
        # As the recipe gives them, paths; once checked, their content (see `node_params`).
        config: str | dict[str, Any] | None = Field(None, description="a config.json to build instead of a preset")
        seed: int = Field(0, ge=0, description="the random seed; the same seed gives the same weights")
        dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="the weights' dtype")
        tokenizer: str | FileDigests | None = Field(None, description="a directory whose tokenizer files the "
                                                                      "model ships with")

        def hf_config(self) -> dict[str, Any]:
            """The config.json this init builds (a preset's, or the given one's content), with its dtype."""
            config = dict(self.config) if isinstance(self.config, dict) else archs.preset_config(self.arch, self.size)
            config["dtype"] = self.dtype
            return config

    @classmethod
    def config_for(cls, ctx: Context, params: Params) -> dict | None:
        """The HF config this init builds, or None after reporting why there is none."""
        if params.arch not in archs.ARCHS:
            ctx.error("E407", f"unknown architecture {params.arch!r}", "arch",
                      "known architectures: " + ", ".join(archs.ARCHS))
            return None
        if (params.size is None) == (params.config is None):
            ctx.error("E204", "init needs exactly one of `size=` or `config=`",
                      hint=f'e.g. init("{params.arch}", size="tiny")')
            return None
        if params.config is not None:
            try:
                config = read_config(ctx.recipe_dir / params.config)
            except ModelDirError as err:
                ctx.error(err.code, err.message, "config", err.hint)
                return None
            if config["model_type"] != params.arch:
                ctx.error("E407", f"config is for {config['model_type']!r}, not {params.arch!r}", "config")
                return None
            return config
        try:
            return archs.preset_config(params.arch, params.size)
        except (KeyError, ValueError):
            ctx.error("E407", f"unknown size {params.size!r} for {params.arch}", "size",
                      "known sizes: " + ", ".join(archs.SIZES))
            return None

    @classmethod
    def output_type(cls, ctx, inputs, params):
        if params.tokenizer is not None and not tokenizer_digests(ctx.recipe_dir / params.tokenizer):
            return ctx.error("E401", f"no tokenizer files in {params.tokenizer!r} (relative to {ctx.recipe_dir})",
                             "tokenizer", "a tokenizer directory holds tokenizer.json or tokenizer_config.json")
        if params.tokenizer is not None:
            try:
                check_json_files(ctx.recipe_dir / params.tokenizer)
            except ModelDirError as err:
                return ctx.error(err.code, err.message, "tokenizer", err.hint)
        config = cls.config_for(ctx, params)
        if config is None:
            return ERROR_TYPE  # config_for said why
        if ctx.given.get("tokenizer"):
            config = {**config, "vocab_size": inputs[0].type.vocab_size}
        try:
            return Type(Kind.MODEL, signature_of_config(config, DTYPE_CODES[params.dtype]))
        except (KeyError, ValueError) as err:
            return ctx.error("E407", f"cannot build this config: {err}", "config")

    @classmethod
    def node_params(cls, params, ctx):
        resolved: dict[str, Any] = {}
        if params.config is not None:
            # The config's content, not its path, decides the weights.
            resolved["config"] = cls.config_for(ctx, params)
        if params.tokenizer is not None:
            # Likewise the tokenizer files' content; their path goes along only to copy them from, and the
            # cache key leaves it out (see `key_params`), so the key does not depend on where the files are.
            root = (ctx.recipe_dir / params.tokenizer).resolve()
            resolved["tokenizer"] = FileDigests(path=str(root), files=tokenizer_digests(root))
        return params.model_copy(update=resolved).model_dump(mode="json")

    # Importing transformers and its model code (measured +140 MiB of private memory with transformers 5).
    imports = ("torch", "transformers")

    @classmethod
    def cost(cls, inputs, params, out, threads):
        sig = out.signature
        # transformers materializes the whole model in fp32; each tensor is then cast, one at a time.
        cast = sig.largest_tensor.nbytes if sig.tensors and params.dtype != "float32" else 0
        return Cost(bytes_written=sig.nbytes, peak_bytes=sig.params * 4 + cast, flops=sig.params * 8)




def tokenizer_digests(root: Path) -> dict[str, str]:
    """sha256 of each tokenizer file in a directory (small files: reading them is cheap)."""
    return named_file_hashes(root, TOKENIZER_FILES)


CHECKED_FILES = 64  # data files whose first record check reads (one line each)


def _data_files(ctx: Context, pattern: str) -> list[Path] | None:
    matches = sorted(Path(p) for p in globlib.glob(str(ctx.recipe_dir / pattern), recursive=True))
    files = [p for p in matches if p.is_file()]
    if not files:
        ctx.error("E405", f"{pattern!r} matches no files (relative to {ctx.recipe_dir})", "glob",
                  "check the pattern; `**` matches directories recursively")
        return None
    if not any(p.stat().st_size for p in files):  # caught here, not after a run has started training on it
        ctx.error("E405", f"{pattern!r} matches only empty files ({len(files)}, relative to {ctx.recipe_dir})",
                  "glob", "write the data first, or point the pattern at the files that hold it")
        return None
    return files


class _DataSource(Op):
    """Files read by content into normalized records (artifacts/data.py); the files are found at check time."""

    builds = False
    artifact_kind: type  # a DataKind

    @classmethod
    def output_type(cls, ctx, inputs, params):
        files = _data_files(ctx, params.glob)
        if files is None or not cls._first_records_read(ctx, params, files):
            return ERROR_TYPE
        return Type(cls.artifact_kind.kind)

    @classmethod
    def _first_records_read(cls, ctx, params, files: list[Path]) -> bool:
        """Each file's first record reads as `run` will read them all (JSON, the text field, a conversation,
        UTF-8): files of the wrong format are found here, not after training has started on the others.
        Reports one problem per file, of the first `CHECKED_FILES` files."""
        read = cls.reader(params.model_dump(), lambda p: os.path.relpath(p, ctx.recipe_dir))
        ok = True
        for path in files[:CHECKED_FILES]:
            first = next(iter(read(path)), None)
            if isinstance(first, Problem):
                ok = ctx.reject(first.code, first.message, "glob", first.hint)
        return ok

    @classmethod
    def node_params(cls, params, ctx):
        data = params.model_dump(mode="json")
        files = [p.resolve() for p in _data_files(ctx, params.glob) or ()]
        data["files"] = [str(p) for p in files]
        data["bytes"] = sum(p.stat().st_size for p in files)
        # What the plan sizes training and evaluation by (the files are read by content only when run).
        estimate = estimate_files(files, cls.holds_json)
        data["estimated_tokens"], data["estimated_documents"] = estimate.tokens, estimate.documents
        return data

    @staticmethod
    def holds_json(path: Path) -> bool:
        """Whether the source reads this file as JSON lines."""
        return True

    @classmethod
    def read_options(cls, params: dict) -> dict:
        """The parameters that decide how the files are read into records (part of the records' key)."""
        return {}

    @classmethod
    def reader(cls, params: dict, shown):
        """A function from one file to its records and problems."""
        raise NotImplementedError

    @classmethod
    def resolve(cls, node, ctx: ResolveContext) -> Resolved:
        files = [Path(p) for p in node.params["files"]]
        artifact, sums = resolve_records(cls.artifact_kind, cls.name, files, cls.read_options(node.params),
                                         cls.reader(node.params, ctx.relative), ctx.relative, ctx.cache,
                                         ctx.threads, ctx.hash_files)
        record = {"glob": node.params["glob"], "converted_key": artifact.meta["key"]}  # a gc root keeps the records
        if ctx.hash_files:
            record["files"] = [{"name": ctx.relative(p), "size": p.stat().st_size, "sha256": sums[p]} for p in files]
        return Resolved(artifact, record)

    @classmethod
    def remembered_digest(cls, node, cache):
        files = [Path(p) for p in node.params["files"]]
        return remembered_records_digest(cls.artifact_kind, files, cls.read_options(node.params), cache)


@register
class Text(_DataSource):
    """A text corpus: JSON-lines or plain-text files. Example: `text("data/zh/*.jsonl", field="text")`"""

    name = "text"
    positional = ("glob",)
    artifact_kind = CorpusKind

    class Params(Params):
        glob: str = Field(description="files to read, relative to the recipe (`**` recurses)")
        field: str = Field("text", description="the JSON field holding the text, for .jsonl files")

    @classmethod
    def read_options(cls, params):
        return {"field": params["field"]}

    @staticmethod
    def holds_json(path: Path) -> bool:
        return path.suffix in JSON_SUFFIXES

    @classmethod
    def reader(cls, params, shown):
        return lambda path: read_texts(path, shown(path), params["field"])


@register
class Chat(_DataSource):
    """A chat dataset: JSON-lines of {"messages": [{"role", "content"}, ...]}. Example: `chat("data/sft/*.jsonl")`"""

    name = "chat"
    positional = ("glob",)
    artifact_kind = DatasetKind

    class Params(Params):
        glob: str = Field(description="files to read, relative to the recipe (`**` recurses)")

    @classmethod
    def reader(cls, params, shown):
        return lambda path: read_conversations(path, shown(path))
