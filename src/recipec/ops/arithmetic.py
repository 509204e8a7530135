"""Model arithmetic: `combine`, the one op every `+ - *` expression over models lowers to.

`cp + 0.8*(chat - base)` is `combine` of the leaves (cp, chat, base) with coefficients (1, 0.8, -0.8).
Written out, `combine(expr, embeddings=..., norms=..., dtype=...)` sets the per-tensor policies a plain
expression takes by default. The affine algebra (folding, the sum-to-1-or-0 rule) belongs to the
language and lives in lowering; this module checks that the leaves fit together.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from .sources import tokenizer_digests

from ..diagnostics import Note
from ..dtypes import DTYPE_BYTES, DTYPE_CODES
from ..ir.types import Kind, Signature, Type, compare
from .base import LINEAR, Context, Cost, FileDigest, FileDigests, Input, Op, Params, bytes_read, file_digest, register

# The streaming engine works through each tensor in chunks of this many elements per input, in fp32,
# on the run's threads: the planner's peak-memory estimate and the engine share this number.
STREAM_CHUNK_ELEMENTS = 1 << 18  # 1 MiB of fp32: measured fastest on this CPU (per-op overhead vs cache)
# A result that no later node reads is written front to back past the page cache (store/tensors.py's
# OrderedModelWriter), in writes of STREAM_WRITE_BYTES, STREAM_WRITERS at a time, from a buffer per
# worker and writer and one more; each worker beyond the first may compute STREAM_AHEAD_BYTES_PER_WORKER
# ahead of the file's frontier, held until the frontier gets there.
STREAM_WRITE_BYTES = 4 << 20
STREAM_WRITERS = 2
STREAM_AHEAD_BYTES_PER_WORKER = 16 << 20
# Parsing an input's tokenizer.json to compare vocabularies, and keeping its id → token table (Python
# objects, generously: a vocabulary entry and its merge rule take a few hundred bytes).
TOKENIZER_PARSE_BYTES_PER_TOKEN = 1024
TOKEN_TABLE_BYTES_PER_TOKEN = 256

POLICY_HINT = ('wrap the expression to choose a vocabulary policy: combine(expr, embeddings="overlap") adds the '
               'delta on the shared rows only; embeddings="keep" keeps the first model\'s rows')

# The dtypes the streaming engine reads into fp32 and writes back. Others (FP8, integer or quantized
# weights) need scales or a dequantization recipec does not do; arithmetic on their raw codes is noise.
COMPUTE_DTYPES = ("F64", "F32", "BF16", "F16")

# The largest factor `overrides` and merge `weights` may give (see SCALE_HINT for why).
MAX_SCALE = 1e6
SCALE_HINT = (f"factors scale weights of magnitude about 1: past ±{MAX_SCALE:g} an output overflows fp16 (largest "
              "65504) and fp32 accumulation drops the other terms' bits; useful factors lie near [0, 2]")
FP32_MAX = 3.4028234663852886e38  # the largest finite fp32: what a coefficient must fit to be computed with


class VocabularyPolicy(Params):
    """The per-tensor policies `combine` and `merge` share: vocabulary rows, special tokens, norms."""

    embeddings: Literal["add", "keep", "overlap"] = Field(
        "add", description="what to do with vocabulary tensors: combine them like any tensor, keep the first "
                           "model's, or combine the rows all models share and keep the first model's extra rows")
    norms: Literal["add", "keep"] = Field(
        "add", description="whether norm weights take part or stay the first model's")
    special_tokens: Literal["chat", "first"] = Field(
        "chat", description="where special-token embedding rows come from when vocabularies differ: the chat "
                            "model (the largest weight after the first) or the first model")


def out_of_scale(factors) -> float | None:
    """The first user-given factor that is not finite or beyond ±MAX_SCALE, or None when all fit."""
    return next((f for f in factors if not (math.isfinite(f) and abs(f) <= MAX_SCALE)), None)


def parse_overrides(items: list[str]) -> list[tuple[str, float]]:
    """`"pattern=factor"` items as (fnmatch pattern, factor); raises ValueError naming a malformed item."""
    parsed = []
    for item in items:
        pattern, sep, factor = item.rpartition("=")
        try:
            value = float(factor)
        except ValueError:
            sep = ""
        if not sep or not pattern:
            raise ValueError(f'{item!r} is not "pattern=factor"')
        parsed.append((pattern, value))
    return parsed


def overridden_coefficients(coefficients: tuple[float, ...], factor: float) -> tuple[float, ...]:
    """The coefficients with the delta part scaled by `factor`: the first model takes up what the others
    give away, so the weights still sum as before (factor 0 keeps the first model's tensor)."""
    first, rest = coefficients[0], coefficients[1:]
    return (first + (1 - factor) * sum(rest),) + tuple(c * factor for c in rest)


@register
class Combine(Op):
    """A linear combination of models, with per-tensor policies.

    Example: `combine(cp + 0.8*(chat - base), norms="keep")`
    """

    name = "combine"
    imports = ("torch",)
    card_relation = "merge"
    inputs = (Input("expr", LINEAR, doc="an affine expression over models"),)
    rule = "arithmetic:build_combine"

    class Params(VocabularyPolicy):
        coefficients: tuple[float, ...] = ()  # filled in by lowering from the expression, never by users
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
            "auto", description="output dtype; auto keeps the first model's")
        overrides: list[str] = Field(
            [], description='per-tensor factors on the delta part, as "pattern=factor" (fnmatch patterns, '
                            'first match wins; 0 keeps the first model\'s tensor), e.g. ["lm_head.*=0.5"]')
        shard_size: int = Field(5 * 10**9, gt=0, description="the largest shard in bytes, e.g. 2G")
        # As the recipe gives them, paths; once checked, their content (see `node_params`).
        tokenizer: str | FileDigests | None = Field(None, description="a model directory whose tokenizer files "
                                                                      "the output ships instead of the first model's")
        chat_template: str | FileDigest | None = Field(None, description="a Jinja file to use as the output's "
                                                                         "chat template")

        @field_validator("overrides")
        @classmethod
        def _overrides_parse(cls, value: list[str]) -> list[str]:
            parse_overrides(value)
            return value

    internal = frozenset({"coefficients"})

    @classmethod
    def output_type(cls, ctx: Context, inputs, params):
        if params.tokenizer is not None and not tokenizer_digests(ctx.recipe_dir / params.tokenizer):
            return ctx.error("E401", f"no tokenizer files in {params.tokenizer!r} (relative to {ctx.recipe_dir})",
                             "tokenizer", "name a model directory with tokenizer.json or tokenizer_config.json")
        if params.chat_template is not None and not (ctx.recipe_dir / params.chat_template).is_file():
            return ctx.error("E401", f"no chat template file {params.chat_template!r} (relative to {ctx.recipe_dir})",
                             "chat_template", "a chat template is a Jinja file, e.g. templates/chat.jinja")
        bad = out_of_scale(f for _, f in parse_overrides(params.overrides))
        if bad is not None:
            return ctx.error("E203", f"`overrides` has the factor {bad:g}; factors must be finite and within "
                                     f"±{MAX_SCALE:g}", "overrides", SCALE_HINT)
        overflow = _coefficient_overflow(params, inputs)
        if overflow:
            return ctx.error("E321", overflow[1], overflow[0],
                             f"the engine multiplies weights by each coefficient in fp32, whose largest value is "
                             f"{FP32_MAX:.3g}; keep coefficients and override factors near 1")
        total = sum(c for c, n in zip(params.coefficients, inputs) if n.type.kind is Kind.MODEL)
        kind = Kind.MODEL if abs(total - 1) < 1e-9 else Kind.DELTA
        vocab_policy = params.embeddings in ("keep", "overlap")
        return check_same_architecture(ctx, inputs, kind, params.dtype, "expr", vocab_policy)

    @classmethod
    def node_params(cls, params, ctx):
        # Files the output copies are keyed by content; their paths go along only to read them from.
        resolved = {}
        if params.tokenizer is not None:
            root = (ctx.recipe_dir / params.tokenizer).resolve()
            resolved["tokenizer"] = FileDigests(path=str(root), files=tokenizer_digests(root))
        if params.chat_template is not None:
            resolved["chat_template"] = file_digest(ctx, params.chat_template)
        return params.model_copy(update=resolved).model_dump(mode="json")

    @classmethod
    def cost(cls, inputs, params, out, threads):
        sig = out.signature
        if sig is None:
            return Cost()
        largest = sig.largest_tensor.numel if sig.tensors else 0
        widest = max((DTYPE_BYTES[t.dtype] for t in sig.tensors), default=4)
        workers = min(threads, len(sig.tensors))
        # Per worker: the fp32 accumulator and an output-dtype staging buffer.
        chunks = workers * min(STREAM_CHUNK_ELEMENTS, largest) * (4 + widest)
        # The writer's buffers and what it holds ahead: pages are only taken as data fills them.
        writing = (min(sig.nbytes, (workers + STREAM_WRITERS + 1) * STREAM_WRITE_BYTES)
                   + min(sig.nbytes, (workers - 1) * STREAM_AHEAD_BYTES_PER_WORKER))
        # Where vocabularies differ under embeddings="overlap", each vocabulary tensor is assembled whole in
        # the output dtype before it is written, as many at once as there are workers.
        vocab_sizes = {n.type.signature.vocab_size if n.type.signature else None for n in inputs}
        vocab = sorted((t.nbytes for t in sig.tensors if t.shape and t.shape[0] == sig.vocab_size), reverse=True)
        whole = sum(vocab[:workers]) if params.embeddings == "overlap" and len(vocab_sizes) > 1 else 0
        # Before any tensor, the inputs' vocabularies are compared: every table held, one file parsed.
        tokens = (sig.vocab_size or 0) * (TOKENIZER_PARSE_BYTES_PER_TOKEN + len(inputs) * TOKEN_TABLE_BYTES_PER_TOKEN)
        return Cost(bytes_read=bytes_read(inputs, out), bytes_written=sig.nbytes,
                    peak_bytes=max(chunks + writing + whole, tokens), flops=2 * len(inputs) * sig.params)


def _coefficient_overflow(params, inputs) -> tuple[str, str] | None:
    """(argument, message) for the first coefficient, alone or under an override factor, that fp32 cannot
    hold; None when all fit."""
    coefficients = params.coefficients
    if not coefficients:
        return None
    factors = [("expr", None)] + [("overrides", (p, f)) for p, f in parse_overrides(params.overrides)]
    for arg, override in factors:
        effective = coefficients if override is None else overridden_coefficients(coefficients, override[1])
        for c, node in zip(effective, inputs):
            if abs(c) > FP32_MAX:
                under = f" under the override \"{override[0]}={override[1]:g}\"" if override else ""
                return arg, f"the coefficient of `{node.label}` is {c:.3g}{under}, beyond what fp32 can hold"
    return None


UNCOMPUTABLE_HINT = (f"arithmetic and merges read {', '.join(COMPUTE_DTYPES)}; dequantize or convert the model "
                     "first (exporting it unchanged needs no arithmetic and stays possible)")


def uncomputable_message(model: str, tensor: str, dtype: str) -> str:
    return f"`{model}` stores `{tensor}` as {dtype}, which recipec cannot compute with"


def check_same_architecture(ctx: Context, inputs, kind: Kind, dtype: str, arg: str = "models",
                            vocab_policy: bool = False, policy_hint: str = POLICY_HINT) -> Type:
    """The output type of an op over models that must share a signature (the first model's), or an error
    naming the first differing tensors; vocabulary-only differences pass when a policy handles them."""
    known = [n for n in inputs if n.type.signature is not None]
    if not known:
        return Type(kind, None)
    for n in known:
        odd = next((t for t in n.type.signature.tensors if t.dtype not in COMPUTE_DTYPES), None)
        if odd is not None:
            notes = (Note(f"`{n.label}` is defined here", n.spans[0]),) if n.spans else ()
            return ctx.error("E322", uncomputable_message(n.label, odd.name, odd.dtype), arg, UNCOMPUTABLE_HINT,
                             notes)
    first = known[0]
    if first.type.signature.tied_embeddings:
        untied = [n for n in known[1:] if "lm_head.weight" in n.type.signature.by_name]
        for n in untied:
            ctx.warning("E307", f"`{n.label}` has its own `lm_head.weight`, but the output ties its embeddings "
                                f"as `{first.label}` (the first model) does: that tensor is not used", arg,
                        "put an untied model first to keep a separate output projection")
    for other in known[1:]:
        diff = compare(first.type.signature, other.type.signature)
        if diff is None or (diff.vocab_only and vocab_policy):
            continue
        notes = tuple(Note(f"`{n.label}` is defined here", n.spans[0]) for n in (first, other) if n.spans)
        if diff.vocab_only:
            names = ", ".join(f"`{n}`" for n, _, _ in diff.changed)
            return ctx.error(
                "E304", f"vocabularies differ: `{first.label}` has {first.type.signature.vocab_size} tokens, "
                        f"`{other.label}` has {other.type.signature.vocab_size} ({names})", arg, policy_hint, notes)
        more = f" (and {diff.count - 1} more)" if diff.count > 1 else ""
        return ctx.error("E303", f"`{first.label}` and `{other.label}` have different architectures: "
                                 f"{diff.first()}{more}", arg,
                         "combine only models of one architecture, e.g. a fine-tune and its base", notes)
    return Type(kind, output_signature(first.type.signature, dtype))


def output_signature(sig: Signature, dtype: str) -> Signature:
    if dtype == "auto":
        return sig
    code = DTYPE_CODES[dtype]
    tensors = {t.name: (code if t.dtype in ("F32", "BF16", "F16") else t.dtype, t.shape) for t in sig.tensors}
    return Signature.build(sig.model_type, tensors, sig.vocab_size, sig.tied_embeddings, sig.facts)
