"""What an op is: typed inputs and parameters, an output-type rule, a cost model and a cache key.

Every op is a subclass of `Op` registered with `@register`. Its `Params` is a pydantic model whose
fields are the op's keyword parameters (types, defaults and ranges in one place: the one schema);
`inputs` lists the graph inputs (models, corpora) it takes; `rule` names the backend function that
builds it, as a string, so that nothing is imported until a run needs it. Lowering binds a call's
arguments against these declarations and reports every problem as a located diagnostic; the planner asks
`cost`; the engine keys the cache with `cache_key`; the rule reads the validated parameters back with
`params_of`. Adding an op means writing one such class in a module of this package (it is found by
itself) and its rule (README, "Adding an op").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from ..diagnostics import Diagnostics, Note
from ..ir.graph import Node, canonical_json
from ..ir.types import Kind, Type
from ..source import Span
from ..toolchain import package_version


class Params(BaseModel):
    """Base of every op's parameters: strict types (a string is never silently a number), no extras."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class FileDigests(Params):
    """A parameter naming a directory's files, once checked: where they are (to read them at run time)
    and each file's sha256, which stands for them in the cache key (see `key_params`)."""

    path: str
    files: dict[str, str]


class FileDigest(Params):
    """A parameter naming one file, once checked: where it is and its sha256 (what the key holds)."""

    path: str
    sha256: str


# The compute precision of an op that offers a choice (training): a parameter like any other, so it is
# part of the op's key. Ops without the choice accumulate in fp32, which is part of their `version`.
Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class Input:
    """A graph input of an op: a model, a corpus, a dataset, or a linear combination of models."""

    name: str
    kind: Kind | tuple[Kind, ...] | str  # a Kind, any of several, or "Linear" for an affine expression unevaluated
    variadic: bool = False
    optional: bool = False  # an optional input comes last and is appended to the node's inputs
    doc: str = ""


LINEAR = "Linear"


@dataclass(frozen=True)
class Cost:
    """What the planner needs from an op: bytes moved, working memory and arithmetic.

    `peak_bytes` is the step's working memory: the most private (anonymous) memory its rule holds at
    once above what the process held before it, memory-mapped input files not counted. The planner adds
    the process's own baseline (see plan.py). `accelerator_bytes` is the memory it needs on each
    accelerator (GPU), None for an op that uses none."""

    bytes_read: int = 0
    bytes_written: int = 0
    peak_bytes: int = 0
    flops: int = 0
    accelerator_bytes: int | None = None
    detail: str = ""  # what else the plan shows about the step, on one line (a training run's tokens and steps)


@dataclass
class Context:
    """What a type rule may use: where the recipe lives, where the call is, and where to report."""

    recipe_dir: Path
    diags: Diagnostics
    span: Span
    arg_spans: dict[str, Span] = field(default_factory=dict)
    given: dict[str, bool] = field(default_factory=dict)  # which optional inputs the call gave

    def warning(self, code: str, message: str, arg: str | None = None, hint: str | None = None) -> None:
        self.diags.warning(code, message, self.arg_spans.get(arg, self.span) if arg else self.span, hint)

    def error(self, code: str, message: str, arg: str | None = None, hint: str | None = None,
              notes: tuple[Note, ...] = ()) -> Type:
        """Report an error at an argument (or the call) and return the poison type."""
        self.diags.error(code, message, self.arg_spans.get(arg, self.span) if arg else self.span, hint, notes)
        return ERROR_TYPE

    def reject(self, code: str, message: str, arg: str | None = None, hint: str | None = None) -> bool:
        """Report an error at an argument (or the call) and return False, as `check_params` does."""
        self.error(code, message, arg, hint)
        return False


ERROR_TYPE = Type(Kind.ERROR)


class Op:
    """Base class of ops; subclasses set the class attributes and override the rules."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    inputs: ClassVar[tuple[Input, ...]] = ()
    positional: ClassVar[tuple[str, ...]] = ()  # parameters that may also be given by position
    builds: ClassVar[bool] = True  # False for inputs that exist already (load, hf)
    # The backend function that builds the result, "module:function": a module of recipec.backends, or
    # any importable module (a plugin's, a test's). Resolved by backends on first use.
    rule: ClassVar[str | None] = None
    toolchain: ClassVar[tuple[str, ...]] = ("torch",)  # packages whose version can change the bytes built
    imports: ClassVar[tuple[str, ...]] = ()  # the libraries its rule imports (plan.IMPORTS: time and memory)
    fixed_seconds: ClassVar[float] = 0.0  # what its rule takes whatever the size (tracing, warm-ups), for the plan
    launchable: ClassVar[bool] = False  # its rule runs in a worker process, under `run --launch` if given
    # Parameters that cannot change the bytes built (how often to checkpoint): the key holds their default,
    # so changing one reuses the result, and keys made before it was declared stay valid.
    unkeyed: ClassVar[frozenset[str]] = frozenset()
    Params: ClassVar[type[Params]] = Params

    @classmethod
    def check_params(cls, ctx: Context, params: Params) -> bool:
        """Checks of the arguments that need no input's type (choices given together, bounds that depend on
        one another; `ctx.given` says which inputs the call passes). Run before `output_type`, and also when
        an input failed (often upstream), so that every problem of a recipe is reported at once. Reports
        through `ctx`; False when anything is wrong."""
        return True

    @classmethod
    def output_type(cls, ctx: Context, inputs: list[Node], params: Params) -> Type:
        """The type of the op's result, checking its inputs (its parameters passed `check_params`);
        reports through `ctx`."""
        raise NotImplementedError

    @classmethod
    def startup(cls, node: Node) -> tuple[tuple[str, ...], float]:
        """The libraries a build of `node` imports and the time it takes whatever the size, on the
        reference machine: the fixed part of the plan's time and memory (plan.startup)."""
        return cls.imports, cls.fixed_seconds

    @classmethod
    def cost(cls, inputs: list[Node], params: Params, out: Type, threads: int) -> Cost:
        """Estimated cost of building the result on `threads` worker threads."""
        return Cost()

    @classmethod
    def shown_names(cls, node: Node) -> dict[int, str]:
        """The nodes its result names (a report's models), by node id, with the name it shows each by:
        part of its key, so that a renamed binding rebuilds what would still show the old name."""
        return {}

    @classmethod
    def node_params(cls, params: Params, ctx: Context) -> dict[str, Any]:
        """The parameters recorded on the graph node (and hashed into its cache key): the validated
        `Params`, with anything resolved at check time (file contents, filled-in fields) put in its
        fields by `model_copy(update=...)`, dumped as JSON data, so that `params_of` reads it back."""
        return params.model_dump(mode="json")

    @classmethod
    def params_of(cls, node: Node) -> Params:
        """The node's parameters as this op's `Params`, read back from the node's JSON data (a rule's view,
        in-process or in a launched worker): validated once at check time, typed here."""
        return cls.Params.model_validate_json(canonical_json(node.params))

    # Hooks of input ops (builds=False) and of releases; the engine, verify and plan ask these, never op names.

    card_relation: ClassVar[str] = "finetune"  # a release's relation to its base models (the hub's vocabulary)

    @classmethod
    def resolve(cls, node: Node, ctx: Any) -> Any:
        """An input op's artifact at run time: a `resolve.Resolved` from a `resolve.ResolveContext`."""
        raise NotImplementedError(f"`{cls.name}` builds its result; only input ops resolve")

    @classmethod
    def remembered_digest(cls, node: Node, cache: Any) -> str | None:
        """An input's digest without reading its data, when the cache (a `store.cache.Cache`) remembers it."""
        return None

    @classmethod
    def hub_reference(cls, params: dict[str, Any]) -> tuple[str, str | None] | None:
        """(repository id, revision) of a hub input, resolved with every other before anything runs."""
        return None

    @classmethod
    def base_model(cls, record: dict[str, Any]) -> str | None:
        """How a model card names this input as a base model (a hub id), from what it resolved to."""
        return None

    @classmethod
    def source_dir(cls, params: dict[str, Any], recipe_dir: Path) -> Path | None:
        """The model directory an input op reads, when it knows one without running."""
        return None

    @classmethod
    def read_places(cls, params: dict[str, Any], recipe_dir: Path) -> list[Path]:
        """Directories the op reads that an export must never replace (besides file parameters)."""
        source = cls.source_dir(params, recipe_dir)
        return [source] if source is not None else []


REGISTRY: dict[str, type[Op]] = {}


def register(op: type[Op]) -> type[Op]:
    """Class decorator: make an op callable from recipes under its `name`."""
    assert op.name not in REGISTRY, f"op {op.name} registered twice"
    REGISTRY[op.name] = op
    return op


def bytes_read(inputs: list[Node], out: Type) -> int:
    """What reading every input model costs; an input not yet resolved is assumed the output's size."""
    fallback = out.signature.nbytes if out.signature else 0
    return sum(n.type.signature.nbytes if n.type.signature else fallback for n in inputs)


def concurrent_elements(out: Type, threads: int) -> int:
    """The most elements of output tensors that `threads` workers hold at once: backends hand out tensors
    largest first, so at worst the `threads` largest are in flight together."""
    sizes = sorted((t.numel for t in out.signature.tensors), reverse=True)
    return sum(sizes[:max(1, threads)])


def is_file_param(value: Any) -> bool:
    """A parameter naming files the op reads at run time: `{"path": where, "files" or "sha256": content}`."""
    return isinstance(value, dict) and "path" in value and ("files" in value or "sha256" in value)


def key_params(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters as the cache key sees them: a file parameter by its content hashes, never by where
    it lies, so the same recipe has the same keys wherever the project is."""
    return {name: {k: v for k, v in value.items() if k != "path"} if is_file_param(value) else value
            for name, value in params.items()}


def key_toolchain(op: type[Op]) -> dict[str, str]:
    """The versions a key of `op` holds: recipec's and those of the packages the op lists, as installed."""
    return {package: package_version(package) for package in ("recipec", *op.toolchain)}


def keyed_params(node: Node) -> dict[str, Any]:
    """A node's parameters as its cache key holds them: file parameters by content (`key_params`),
    `unkeyed` ones at their default, a compute precision resolved for this machine (lowering did that).
    The lockfile records them, so that a key that drifted can be explained by the parameter that did."""
    op = REGISTRY[node.op]
    return key_params(node.params) | {name: op.Params.model_fields[name].default for name in op.unkeyed}


def cache_key(node: Node, input_digests: list[str]) -> str:
    """sha256 over canonical JSON of op, op version, parameters (`keyed_params`), input content digests,
    the installed versions of the packages that can change this op's bytes (`key_toolchain`) and the
    names its result shows (`shown_names`)."""
    op = REGISTRY[node.op]
    doc = {"op": node.op, "version": op.version, "params": keyed_params(node), "inputs": input_digests,
           "toolchain": key_toolchain(op)}
    names = list(op.shown_names(node).values())
    if names:  # only ops that show names have the field: every other key stays as it was
        doc["names"] = names
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def model_names(nodes: list[Node]) -> list[str]:
    """How a report names the models it is given: the name the recipe binds each to, else its place among
    them (`model 2`); never the plan's `%id`, which an edit elsewhere in the recipe changes."""
    return [node.names[0] if node.names else f"model {i + 1}" for i, node in enumerate(nodes)]


def upstream_names(models: list[Node]) -> dict[int, str]:
    """`model_names` of `models`, by node id, and a name for every model they are built from (a trained one
    shows its losses): the bound one, else its op and its place among the unnamed ones of that op upstream,
    in plan order (`cp 2`). Data is left out: renaming a corpus changes nothing shown."""
    names = dict(zip((m.id for m in models), model_names(models)))
    found: dict[int, Node] = {}
    stack = [i for m in models for i in m.inputs]
    while stack:
        node = stack.pop()
        if node.id not in found and node.id not in names:
            found[node.id] = node
            stack.extend(node.inputs)
    unnamed: dict[str, int] = {}
    for node_id in sorted(i for i, node in found.items() if node.type.kind is Kind.MODEL):
        node = found[node_id]
        if not node.names:
            unnamed[node.op] = unnamed.get(node.op, 0) + 1
        names[node_id] = node.names[0] if node.names else f"{node.op} {unnamed[node.op]}"
    return names


def file_digest(ctx: Context, path: str) -> FileDigest:
    """A file parameter by its content (the cache key's view) and its place, relative to the recipe (the
    rule's, to read it from)."""
    resolved = (ctx.recipe_dir / path).resolve()
    return FileDigest(path=str(resolved), sha256=hashlib.sha256(resolved.read_bytes()).hexdigest())
