"""What an op is: typed inputs and parameters, an output-type rule, a cost model and a cache key.

Every op is a subclass of `Op` registered with `@register`. Its `Params` is a pydantic model whose
fields are the op's keyword parameters (types, defaults and ranges in one place); `inputs` lists the
graph inputs (models, corpora) it takes. Lowering binds a call's arguments against these declarations
and reports every problem as a located diagnostic; the planner asks `cost`; backends key the cache with
`cache_key`. Adding an op means writing one such class (STYLE.md, "adding an op").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ..diagnostics import Diagnostics, Note
from ..ir.graph import Node, canonical_json
from ..ir.types import Kind, Type
from ..source import Span


class Params(BaseModel):
    """Base of every op's parameters: strict types (a string is never silently a number), no extras."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


@dataclass(frozen=True)
class Input:
    """A graph input of an op: a model, a corpus, a dataset, or a linear combination of models."""

    name: str
    kind: Kind | str  # Kind, or "Linear" for an affine expression taken unevaluated
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


ERROR_TYPE = Type(Kind.ERROR)


class Op:
    """Base class of ops; subclasses set the class attributes and override the rules."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    inputs: ClassVar[tuple[Input, ...]] = ()
    positional: ClassVar[tuple[str, ...]] = ()  # parameters that may also be given by position
    builds: ClassVar[bool] = True  # False for inputs that exist already (load, hf)
    toolchain: ClassVar[tuple[str, ...]] = ("torch",)  # packages whose version can change the bytes built
    runtime_bytes: ClassVar[int] = 0  # memory the libraries its rule imports add to the process, for good
    launchable: ClassVar[bool] = False  # its rule runs in a worker process, under `run --launch` if given
    Params: ClassVar[type[Params]] = Params

    @classmethod
    def output_type(cls, ctx: Context, inputs: list[Node], params: Params) -> Type:
        """The type of the op's result, checking its inputs; reports through `ctx`."""
        raise NotImplementedError

    @classmethod
    def cost(cls, inputs: list[Node], params: Params, out: Type, threads: int) -> Cost:
        """Estimated cost of building the result on `threads` worker threads."""
        return Cost()

    @classmethod
    def node_params(cls, params: Params, ctx: Context) -> dict[str, Any]:
        """The parameters recorded on the graph node (and hashed into its cache key)."""
        return params.model_dump(mode="json")


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


COMPUTE_DTYPE = "float32"  # every backend accumulates in fp32; part of every key


def is_file_param(value: Any) -> bool:
    """A parameter naming files the op reads at run time: `{"path": where, "files" or "sha256": content}`."""
    return isinstance(value, dict) and "path" in value and ("files" in value or "sha256" in value)


def key_params(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters as the cache key sees them: a file parameter by its content hashes, never by where
    it lies, so the same recipe has the same keys wherever the project is."""
    return {name: {k: v for k, v in value.items() if k != "path"} if is_file_param(value) else value
            for name, value in params.items()}


def cache_key(node: Node, input_digests: list[str], versions: dict[str, str]) -> str:
    """sha256 over canonical JSON of op, op version, parameters (file parameters by content), input
    content digests, compute dtype and the versions of the packages that can change this op's bytes."""
    op = REGISTRY[node.op]
    doc = {"op": node.op, "version": op.version, "params": key_params(node.params), "inputs": input_digests,
           "compute_dtype": COMPUTE_DTYPE, "toolchain": {k: versions[k] for k in ("recipec",) + op.toolchain}}
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()
