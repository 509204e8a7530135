"""Value types of the recipe language and architecture signatures.

`Model[sig]` and `Delta[sig]` carry a `Signature`: the model type and every tensor's name, shape and
dtype, read from config.json and safetensors headers (or computed from a config for `init`). A hub
model that is not cached has no signature yet: it is "unknown until locked", and checks that need it
are deferred rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..arch import ArchFacts
from ..dtypes import TensorSpec


class Kind(str):
    """The kind of a value: Model, Delta, Corpus, ... Open: an op family registers a new one with
    `Kind.register("Report")`. Kinds are interned, so `kind is Kind.MODEL` holds, and a kind is the
    string of its name, so it compares, hashes and serializes as that name."""

    _interned: ClassVar[dict[str, Kind]] = {}

    MODEL: ClassVar[Kind]
    DELTA: ClassVar[Kind]
    CORPUS: ClassVar[Kind]
    DATASET: ClassVar[Kind]
    SCALAR: ClassVar[Kind]
    STR: ClassVar[Kind]
    BOOL: ClassVar[Kind]
    LIST: ClassVar[Kind]
    ERROR: ClassVar[Kind]

    def __new__(cls, name: str) -> Kind:
        """The registered kind called `name` (ValueError when there is none, as for an Enum)."""
        try:
            return cls._interned[name]
        except KeyError:
            raise ValueError(f"{name!r} is not a registered kind") from None

    @classmethod
    def register(cls, name: str) -> Kind:
        """The kind called `name`, created on first registration; registering it again returns the same one."""
        if name not in cls._interned:
            cls._interned[name] = str.__new__(cls, name)
        return cls._interned[name]

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Kind.{self.value}"

    def __reduce__(self):  # copies and pickles stay the interned object
        return (Kind.register, (self.value,))


Kind.MODEL = Kind.register("Model")
Kind.DELTA = Kind.register("Delta")
Kind.CORPUS = Kind.register("Corpus")
Kind.DATASET = Kind.register("Dataset")
Kind.SCALAR = Kind.register("Scalar")
Kind.STR = Kind.register("Str")
Kind.BOOL = Kind.register("Bool")
Kind.LIST = Kind.register("List")
Kind.ERROR = Kind.register("Error")  # the type of an expression that already failed: accepted nowhere, reported once


@dataclass(frozen=True)
class Signature:
    """What makes two checkpoints combinable: architecture and every tensor's name, shape and dtype; and
    the config's shape facts (layers, heads per layer, widths), where recipec knows the architecture, for
    ops that change shapes to derive their output from at check time."""

    model_type: str
    tensors: tuple[TensorSpec, ...]  # sorted by name
    vocab_size: int | None = None
    tied_embeddings: bool = False
    facts: ArchFacts | None = None  # None for an architecture recipec has no tensor table for

    @classmethod
    def build(cls, model_type: str, tensors: dict[str, tuple[str, tuple[int, ...]]], vocab_size: int | None,
              tied: bool, facts: ArchFacts | None = None) -> Signature:
        specs = tuple(TensorSpec(n, d, tuple(s)) for n, (d, s) in sorted(tensors.items()))
        return cls(model_type, specs, vocab_size, tied, facts)

    @property
    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def largest_tensor(self) -> TensorSpec | None:
        return max(self.tensors, key=lambda t: t.numel, default=None)

    @property
    def dtype(self) -> str:
        """The dtype most of the parameters are stored in."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
        return max(counts, key=counts.get) if counts else "F32"


@dataclass(frozen=True)
class Type:
    kind: Kind
    signature: Signature | None = None  # Model and Delta only; None = unknown until locked
    vocab_size: int | None = None  # a Tokenizer's size, where its op knows it at check time

    def __str__(self) -> str:
        if self.kind in (Kind.MODEL, Kind.DELTA):
            return f"{self.kind.value}[{self.signature.model_type if self.signature else '?'}]"
        return self.kind.value


@dataclass(frozen=True)
class SignatureDiff:
    """How two signatures differ: `vocab_only` when only vocabulary rows do."""

    only_left: tuple[str, ...]
    only_right: tuple[str, ...]
    changed: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # name, left shape, right shape
    model_types: tuple[str, str] | None
    vocab_only: bool

    def first(self) -> str:
        """A sentence naming the first difference."""
        if self.model_types:
            return f"model types differ: {self.model_types[0]} vs {self.model_types[1]}"
        if self.changed:
            name, a, b = self.changed[0]
            return f"`{name}` has shape {list(a)} vs {list(b)}"
        if self.only_left:
            return f"`{self.only_left[0]}` is only in the first"
        return f"`{self.only_right[0]}` is only in the second"

    @property
    def count(self) -> int:
        return len(self.only_left) + len(self.only_right) + len(self.changed)


def _effective_shapes(sig: Signature) -> dict[str, tuple[int, ...]]:
    # A model with tied embeddings saves no output projection; it still has one, equal to the input
    # embedding, so a tied and an untied model of one architecture remain combinable.
    shapes = {t.name: t.shape for t in sig.tensors}
    if sig.tied_embeddings and "lm_head.weight" not in shapes:
        for embed in ("model.embed_tokens.weight", "transformer.wte.weight"):
            if embed in shapes:
                shapes["lm_head.weight"] = shapes[embed]
    return shapes


def compare(left: Signature, right: Signature) -> SignatureDiff | None:
    """None when two signatures are combinable, else what differs. Dtypes may differ: math is fp32."""
    if left.model_type != right.model_type:
        return SignatureDiff((), (), (), (left.model_type, right.model_type), False)
    a, b = _effective_shapes(left), _effective_shapes(right)
    if a == b:
        return None
    only_left = tuple(sorted(set(a) - set(b)))
    only_right = tuple(sorted(set(b) - set(a)))
    changed = tuple((n, a[n], b[n]) for n in sorted(set(a) & set(b)) if a[n] != b[n])
    vocab_only = (not only_left and not only_right and left.vocab_size != right.vocab_size
                  and all(sa[0] in (left.vocab_size, right.vocab_size) and sa[1:] == sb[1:]
                          for _, sa, sb in changed if sa and sb))
    return SignatureDiff(only_left, only_right, changed, None, vocab_only)
