"""Shrinking ops that change a model's shape: `drop_layers` (a shallower student) and `lowrank` (each
targeted linear as two thinner ones).

Both find layers and linear weights by tensor name (`LAYER_NAMES`), so a model with or without its task
head — a headless `BertModel` with unprefixed names and integer buffers included — is handled alike, and
every tensor outside what the op changes is carried byte for byte. The layer selection and the low-rank
sizes are pure functions of names and shapes, shared by the type rules (check time, from the signature)
and the rules (backends/shrink.py, from the files), so plan and run agree on every output tensor.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from .. import modeling
from ..ir.types import Kind, Signature, Type
from .base import ERROR_TYPE, Context, Cost, Input, Op, Params, bytes_read, register

# Where a family's layers are: a tensor name is `<prefix><index>.<rest>`; the prefix's first part is absent
# in a headless model (LlamaModel, GPT2Model, BertModel). A family's recipec_* models (pruned, low-rank) name
# their tensors as the stock ones do.
LAYER_NAMES = {
    "llama": re.compile(r"^((?:model\.)?layers\.)(\d+)\.(.+)$"),
    "gpt2": re.compile(r"^((?:transformer\.)?h\.)(\d+)\.(.+)$"),
    "bert": re.compile(r"^((?:bert\.)?encoder\.layer\.)(\d+)\.(.+)$"),
}
SUPPORTED = tuple(sorted(LAYER_NAMES))
# GPT-2's Conv1D modules store their weight (in, out), the transpose of nn.Linear's (out, in).
TRANSPOSED_FAMILIES = ("gpt2",)
NORM_MODULE = re.compile(r"(?:^|\.)(?:\w*norm|ln_\w+)$", re.IGNORECASE)


class SelectionError(ValueError):
    """A layer selection or low-rank size that does not fit the model: message, hint and the argument at fault."""

    def __init__(self, message: str, hint: str, arg: str | None = None):
        super().__init__(message)
        self.message, self.hint, self.arg = message, hint, arg


def family(model_type: str) -> str | None:
    """The family whose layers the ops know (`llama` for llama and recipec_llama), or None."""
    found = modeling.family(model_type)
    return found if found in LAYER_NAMES else None


def unsupported(model_type: str) -> SelectionError:
    return SelectionError(f"this op does not support {model_type!r} models",
                          f"supported families: {', '.join(SUPPORTED)} (with or without their task head)")


def layer_of(model_type: str, name: str) -> tuple[str, int, str] | None:
    """(prefix, layer index, rest) of a tensor or module name inside a layer, None outside the layers."""
    match = LAYER_NAMES[family(model_type)].match(name)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None


def layer_count(model_type: str, names) -> int:
    """How many layers the tensor names show (one more than the highest index)."""
    indices = [found[1] for found in (layer_of(model_type, n) for n in names) if found]
    return max(indices) + 1 if indices else 0


# --- drop_layers ------------------------------------------------------------------------------------------

def selection_problem(keep: float | None, layers: list[int] | None) -> SelectionError | None:
    """What is wrong with how the layers kept are chosen, whatever the model: not exactly one way."""
    if (keep is None) == (layers is None):
        return SelectionError("drop_layers needs exactly one of `keep=` or `layers=`",
                              "e.g. keep=0.5 keeps every other layer; layers=[0, 2] keeps those two")
    return None


def kept_layers(count: int, keep: float | None, layers: list[int] | None) -> tuple[int, ...]:
    """The indices of the layers kept, in order. `keep`: a whole number is a count, a number below 1 a fraction,
    evenly spaced from the first layer (index ⌊i·count/kept⌋: keep=0.5 keeps every other layer); `layers`: the
    indices themselves. Raises SelectionError."""
    if (problem := selection_problem(keep, layers)) is not None:
        raise problem
    if layers is not None:
        if not layers:
            raise SelectionError("`layers` is empty: a model needs at least one layer",
                                 f"name layers to keep, from 0 to {count - 1}", "layers")
        bad = [i for i in layers if not 0 <= i < count]
        if bad:
            raise SelectionError(f"layer {bad[0]} is not a layer of this model, which has {count}",
                                 f"layer indices run from 0 to {count - 1}", "layers")
        if list(layers) != sorted(set(layers)):
            raise SelectionError(f"`layers` must name distinct layers in increasing order, got {list(layers)}",
                                 f"e.g. {sorted(set(layers))}", "layers")
        return tuple(layers)
    hint = f"keep a count from 1 to {count}, or a fraction above {1 / (2 * count):.3g} (below 1)"
    if keep < 1:
        kept = round(keep * count)
    elif keep == int(keep):
        kept = int(keep)
    else:
        raise SelectionError(f"`keep` is a count of layers (a whole number) or a fraction (below 1), got {keep:g}",
                             hint, "keep")
    if kept < 1:
        raise SelectionError(f"keep={keep:g} of {count} layers leaves no layer", hint, "keep")
    if kept > count:
        raise SelectionError(f"keep={kept} is more layers than the model's {count}", hint, "keep")
    return tuple(i * count // kept for i in range(kept))


def renamed_layers(model_type: str, names, kept: tuple[int, ...]) -> dict[str, str]:
    """Old name -> new name of every tensor that stays: layers kept renumbered 0, 1, ...; the rest unchanged."""
    new_index = {old: new for new, old in enumerate(kept)}
    renamed = {}
    for name in names:
        found = layer_of(model_type, name)
        if found is None:
            renamed[name] = name
        elif found[1] in new_index:
            prefix, index, rest = found
            renamed[name] = f"{prefix}{new_index[index]}.{rest}"
    return renamed


def _check_supported(ctx: Context, sig: Signature) -> int | None:
    """The model's layer count, or None after reporting why the op cannot work on it."""
    if family(sig.model_type) is None:
        err = unsupported(sig.model_type)
        ctx.error("E458", err.message, "model", err.hint)
        return None
    count = layer_count(sig.model_type, (t.name for t in sig.tensors))
    if count == 0:
        ctx.error("E458", f"no layers found in this {sig.model_type} model", "model",
                  f"the op looks for tensors named like {LAYER_NAMES[family(sig.model_type)].pattern}")
        return None
    return count


@register
class DropLayers(Op):
    """A shallower model: only the layers kept, renumbered, config updated. Example: `student = drop_layers(base, keep=0.5)`

    `keep=N` keeps N layers, `keep=0.5` half of them, evenly spaced from the first (every other layer);
    `layers=[0, 5, 11]` names them. Every other tensor is carried byte for byte.
    """

    name = "drop_layers"
    imports = ("torch",)
    inputs = (Input("model", Kind.MODEL, doc="the model to make shallower"),)
    toolchain = ("torch",)
    rule = "shrink:build_drop_layers"

    class Params(Params):
        keep: float | None = Field(None, gt=0, description="layers kept: a count (a whole number) or a fraction "
                                                           "(below 1), evenly spaced from the first")
        layers: list[int] | None = Field(None, description="the indices of the layers kept, in increasing order")

    @classmethod
    def check_params(cls, ctx, params):
        problem = selection_problem(params.keep, params.layers)
        return problem is None or ctx.reject("E459", problem.message, problem.arg, problem.hint)

    @classmethod
    def output_type(cls, ctx, inputs, params):
        sig = inputs[0].type.signature
        if sig is None:
            return Type(Kind.MODEL, None)  # the layers are known once the model is
        count = _check_supported(ctx, sig)
        if count is None:
            return ERROR_TYPE
        try:
            kept = kept_layers(count, params.keep, params.layers)
        except SelectionError as err:
            return ctx.error("E459", err.message, err.arg, err.hint)
        return Type(Kind.MODEL, shallower_signature(sig, kept))

    @classmethod
    def cost(cls, inputs, params, out, threads):
        sig = out.signature
        if sig is None:
            return Cost()
        largest = sig.largest_tensor.nbytes if sig.tensors else 0
        return Cost(bytes_read=sig.nbytes, bytes_written=sig.nbytes, peak_bytes=largest)


def shallower_signature(sig: Signature, kept: tuple[int, ...]) -> Signature:
    """`sig` with only the layers `kept`, renumbered; its facts follow (`ArchFacts.with_layers`)."""
    names = renamed_layers(sig.model_type, (t.name for t in sig.tensors), kept)
    tensors = {names[t.name]: (t.dtype, t.shape) for t in sig.tensors if t.name in names}
    facts = sig.facts.with_layers(kept) if sig.facts is not None else None
    return Signature.build(sig.model_type, tensors, sig.vocab_size, sig.tied_embeddings, facts)


# --- lowrank ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Linear:
    """A linear weight inside a layer: its module path and its (out, in) shape, in nn.Linear's orientation."""

    path: str
    out_features: int
    in_features: int

    @property
    def break_even(self) -> float:
        """The rank at which two factors hold as many numbers as the weight: in·out/(in + out)."""
        return self.in_features * self.out_features / (self.in_features + self.out_features)

    def saves(self, rank: int) -> bool:
        return rank * (self.in_features + self.out_features) < self.in_features * self.out_features


def layer_linears(model_type: str, shapes: dict[str, tuple[int, ...]]) -> list[Linear]:
    """Every dense linear weight inside the layers (2-D `.weight` of a module that is neither a norm nor a
    factor of a linear factorized before), by module path."""
    found = []
    for name, shape in sorted(shapes.items()):
        path = name.removesuffix(".weight")
        if (path == name or len(shape) != 2 or layer_of(model_type, name) is None or NORM_MODULE.search(path)
                or path.endswith((".a", ".b"))):
            continue
        out_f, in_f = (shape[1], shape[0]) if family(model_type) in TRANSPOSED_FAMILIES else shape
        found.append(Linear(path, out_f, in_f))
    return found


def targeted(linears: list[Linear], patterns: list[str] | None) -> list[Linear]:
    """The linears whose module path matches a pattern (all of them without patterns). Raises SelectionError
    for a pattern that matches none."""
    if patterns is None:
        return linears
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(l.path, pattern) for l in linears):
            shown = ", ".join(f"`{l.path}`" for l in linears[:4])
            raise SelectionError(f"the target {pattern!r} matches no linear inside the model's layers",
                                 f"targets are fnmatch patterns over module paths, e.g. {shown}", "targets")
    return [l for l in linears if any(fnmatch.fnmatchcase(l.path, p) for p in patterns)]


def fixed_rank(linear: Linear, rank: int | None, ratio: float | None) -> int:
    """The rank of a linear for `rank=` or `ratio=` (the share of its parameters kept). Raises SelectionError."""
    if ratio is not None:
        rank = math.floor(ratio * linear.break_even)
        if rank < 1:
            raise SelectionError(f"ratio={ratio:g} leaves `{linear.path}` ({linear.out_features}×"
                                 f"{linear.in_features}) no rank at all",
                                 f"use ratio ≥ {1 / linear.break_even:.3g}", "ratio")
        return rank
    if rank > min(linear.in_features, linear.out_features):
        raise SelectionError(f"rank={rank} is above the rank of `{linear.path}` ({linear.out_features}×"
                             f"{linear.in_features}), at most {min(linear.in_features, linear.out_features)}",
                             _rank_hint(linear), "rank")
    if not linear.saves(rank):
        raise SelectionError(f"rank={rank} saves nothing on `{linear.path}` ({linear.out_features}×"
                             f"{linear.in_features}): two factors of rank {rank} hold {rank * (linear.in_features + linear.out_features):,} "
                             f"numbers, the weight {linear.in_features * linear.out_features:,}",
                             _rank_hint(linear), "rank")
    return rank


def _rank_hint(linear: Linear) -> str:
    useful = math.ceil(linear.break_even) - 1
    return f"a rank that saves parameters on `{linear.path}` is at most {useful}; or use ratio= or targets="


def energy_rank(squared: list[float], energy: float) -> int:
    """The smallest rank whose singular values, squared, hold `energy` of the total (squared: descending)."""
    total, running = sum(squared), 0.0
    for rank, value in enumerate(squared, 1):
        running += value
        if running >= energy * total:
            return rank
    return len(squared)


def low_rank_names(path: str, bias: bool) -> list[str]:
    """The tensors a factorized linear is stored as: `<path>.a.weight` (rank, in), `<path>.b.weight`
    (out, rank) and `<path>.b.bias` when the original had a bias."""
    return [f"{path}.a.weight", f"{path}.b.weight"] + ([f"{path}.b.bias"] if bias else [])


def factorized_shapes(model_type: str, shapes: dict[str, tuple[int, ...]], ranks: dict[str, int]) -> dict:
    """Every tensor name -> shape after factorizing the linears `ranks` names (path -> rank)."""
    linears = {l.path: l for l in layer_linears(model_type, shapes)}
    out = {}
    for name, shape in shapes.items():
        path = name.rsplit(".", 1)[0]
        if path not in ranks:
            out[name] = shape
        elif name.endswith(".weight"):
            linear, rank = linears[path], ranks[path]
            out[f"{path}.a.weight"] = (rank, linear.in_features)
            out[f"{path}.b.weight"] = (linear.out_features, rank)
        else:  # the bias goes with the second factor
            out[f"{path}.b.bias"] = shape
    return out


class LowrankParams(Params):
    rank: int | None = Field(None, gt=0, description="the rank of every targeted linear")
    ratio: float | None = Field(None, gt=0, lt=1, description="the share of each targeted linear's parameters kept")
    energy: float | None = Field(None, gt=0, le=1, description="the share of each weight's squared singular "
                                                               "values kept (its rank follows, per linear)")
    targets: list[str] | None = Field(None, description="fnmatch patterns over module paths (default: every "
                                                        "linear inside the layers)")
    scaling: Literal["whiten", "rms"] = Field(
        "whiten", description="with `data`: how inputs weigh in the SVD: whitened by the Cholesky factor of their "
                              "second moments (SVD-LLM), or each feature scaled by its RMS (ASVD-style)")
    seq_len: int = Field(256, gt=1, description="with `data`: tokens per calibration sequence (at most the "
                                                "model's positions)")
    tokens: int = Field(16384, gt=0, description="with `data`: calibration tokens read from the corpus")


@register
class Lowrank(Op):
    """Each targeted linear W (out×in) as two factors B·A of rank r (truncated SVD, √Σ split to both).
    Example: `small = lowrank(base, ratio=0.5, data=corpus)`

    Give one of `rank=`, `ratio=` (the share of each linear's parameters kept) or `energy=` (the share of squared
    singular values kept). With `data=`, the SVD is activation-aware: it minimizes the error on the inputs the
    corpus gives each linear (`scaling="whiten"`, SVD-LLM) or weighs input features by their RMS
    (`scaling="rms"`, ASVD-style). The output loads with
    `import recipec` + `AutoModelForCausalLM.from_pretrained`.
    """

    name = "lowrank"
    inputs = (Input("model", Kind.MODEL, doc="the model whose linears are factorized"),
              Input("data", Kind.CORPUS, optional=True, doc="a corpus to calibrate the scaling on"))
    toolchain = ("torch", "transformers", "tokenizers")
    rule = "shrink:build_lowrank"
    imports = ("torch", "transformers")
    Params = LowrankParams

    @classmethod
    def check_params(cls, ctx, params):
        given = [n for n in ("rank", "ratio", "energy") if getattr(params, n) is not None]
        if len(given) != 1:
            return ctx.reject("E461", f"lowrank needs exactly one of `rank=`, `ratio=`, `energy=` (got "
                                      f"{', '.join(given) or 'none'})", given[1] if len(given) > 1 else None,
                              "e.g. ratio=0.5 keeps half of each linear's parameters")
        return True

    @classmethod
    def output_type(cls, ctx, inputs, params):
        sig = inputs[0].type.signature
        if sig is None:
            return Type(Kind.MODEL, None)
        if _check_supported(ctx, sig) is None:
            return ERROR_TYPE
        if sig.facts is None:
            return ctx.error("E458", f"lowrank's output loads through recipec's {family(sig.model_type)} classes, "
                                     "which do not know this model's config", "model",
                             "recipec's classes cover the families' causal-LM, masked-LM and headless models")
        shapes = {t.name: t.shape for t in sig.tensors}
        try:
            linears = targeted(layer_linears(sig.model_type, shapes), params.targets)
            if params.energy is not None:
                return Type(Kind.MODEL, None)  # ranks follow from the singular values: known once built
            # The narrowest linear first: its error is the one that tells the most.
            ranks = {l.path: fixed_rank(l, params.rank, params.ratio)
                     for l in sorted(linears, key=lambda l: (l.break_even, l.path))}
        except SelectionError as err:
            return ctx.error("E463" if err.arg == "targets" else "E462", err.message, err.arg, err.hint)
        return Type(Kind.MODEL, factorized_signature(sig, ranks))

    @classmethod
    def cost(cls, inputs, params, out, threads):
        source = inputs[0].type.signature
        if source is None:
            return Cost()
        largest = source.largest_tensor.numel if source.tensors else 0
        written = out.signature.nbytes if out.signature else source.nbytes
        # An SVD in fp64 of the largest weight: the matrix, its two factors and workspace.
        peak = 4 * 8 * largest
        try:
            linears = targeted(layer_linears(source.model_type, {t.name: t.shape for t in source.tensors}),
                               params.targets)
        except (SelectionError, KeyError):
            linears = []  # reported by the type rule
        if len(inputs) > 1:
            # Calibration: the model in fp32, and per targeted linear an fp64 in×in matrix (whiten) or vector.
            widths = [l.in_features for l in linears]
            peak += 4 * source.params + 8 * sum(w * w if params.scaling == "whiten" else w for w in widths)
        # An SVD of an m×n matrix (m ≥ n) takes about 4·m·n² operations.
        svd = sum(4 * l.in_features * l.out_features * min(l.in_features, l.out_features) for l in linears)
        return Cost(bytes_read=bytes_read(inputs[:1], out), bytes_written=written, peak_bytes=peak, flops=svd)


def factorized_signature(sig: Signature, ranks: dict[str, int]) -> Signature:
    """`sig` with the linears `ranks` names as two factors each: a model of recipec's classes for its family
    (`recipec_llama`, ...: see recipec.modeling), with the same facts (heads, widths, layers)."""
    dtypes = {t.name: t.dtype for t in sig.tensors}
    shapes = factorized_shapes(sig.model_type, {t.name: t.shape for t in sig.tensors}, ranks)
    tensors = {name: (dtypes.get(name) or dtypes[_source_name(name)], shape) for name, shape in shapes.items()}
    model_type = modeling.PREFIX + family(sig.model_type) if ranks else sig.model_type
    return Signature.build(model_type, tensors, sig.vocab_size, sig.tied_embeddings, sig.facts)


def _source_name(name: str) -> str:
    """The dense tensor a factor comes from (`p.a.weight`, `p.b.weight` -> `p.weight`; `p.b.bias` -> `p.bias`)."""
    path, _factor, kind = name.rsplit(".", 2)
    return f"{path}.{kind}"
