"""Model arithmetic: `combine`, the one op every `+ - *` expression over models lowers to.

`cp + 0.8*(chat - base)` is `combine` of the leaves (cp, chat, base) with coefficients (1, 0.8, -0.8).
Written out, `combine(expr, embeddings=..., norms=..., dtype=...)` sets the per-tensor policies a plain
expression takes by default. The affine algebra (folding, the sum-to-1-or-0 rule) belongs to the
language and lives in lowering; this module checks that the leaves fit together.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import Field, field_validator

from .sources import tokenizer_digests

from ..diagnostics import Note
from ..ir.types import DTYPE_CODES, Kind, Signature, Type, compare
from ..store.safetensors_header import DTYPE_BYTES
from .base import LINEAR, Context, Cost, Input, Op, Params, bytes_read, register

# The streaming engine works through each tensor in chunks of this many elements per input, in fp32,
# on the run's threads: the planner's peak-memory estimate and the engine share this number.
STREAM_CHUNK_ELEMENTS = 1 << 18  # 1 MiB of fp32: measured fastest on this CPU (per-op overhead vs cache)
# Parsing an input's tokenizer.json to compare vocabularies, and keeping its id → token table (Python
# objects, generously: a vocabulary entry and its merge rule take a few hundred bytes).
TOKENIZER_PARSE_BYTES_PER_TOKEN = 1024
TOKEN_TABLE_BYTES_PER_TOKEN = 256

POLICY_HINT = ('wrap the expression to choose a vocabulary policy: combine(expr, embeddings="overlap") adds the '
               'delta on the shared rows only; embeddings="keep" keeps the first model\'s rows')


@register
class Combine(Op):
    """A linear combination of models, with per-tensor policies.

    Example: `combine(cp + 0.8*(chat - base), norms="keep")`
    """

    name = "combine"
    inputs = (Input("expr", LINEAR, doc="an affine expression over models"),)

    class Params(Params):
        coefficients: tuple[float, ...] = ()  # filled in by lowering from the expression, never by users
        embeddings: Literal["add", "keep", "overlap"] = Field(
            "add", description="what to do with vocabulary tensors: add the delta, keep the first model's, "
                               "or add on the rows all models share")
        norms: Literal["add", "keep"] = Field(
            "add", description="whether norm weights take part or stay the first model's")
        special_tokens: Literal["chat", "first"] = Field(
            "chat", description="where special-token embedding rows come from when vocabularies differ")
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
            "auto", description="output dtype; auto keeps the first model's")
        overrides: list[str] = Field(
            [], description='per-tensor factors on the delta part, as "pattern=factor" (fnmatch patterns, '
                            'first match wins; 0 keeps the first model\'s tensor), e.g. ["lm_head.*=0.5"]')
        shard_size: int = Field(5 * 10**9, gt=0, description="the largest shard in bytes, e.g. 2G")
        tokenizer: str | None = Field(None, description="a model directory whose tokenizer files the output "
                                                        "ships instead of the first model's")
        chat_template: str | None = Field(None, description="a Jinja file to use as the output's chat template")

        @field_validator("overrides")
        @classmethod
        def _overrides_parse(cls, value: list[str]) -> list[str]:
            for item in value:
                pattern, sep, factor = item.rpartition("=")
                try:
                    float(factor)
                except ValueError:
                    sep = ""
                if not sep or not pattern:
                    raise ValueError(f'{item!r} is not "pattern=factor"')
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
        total = sum(c for c, n in zip(params.coefficients, inputs) if n.type.kind is Kind.MODEL)
        kind = Kind.MODEL if abs(total - 1) < 1e-9 else Kind.DELTA
        vocab_policy = params.embeddings in ("keep", "overlap")
        return check_same_architecture(ctx, inputs, kind, params.dtype, "expr", vocab_policy)

    @classmethod
    def node_params(cls, params, ctx):
        data = params.model_dump(mode="json")
        # Files the output copies are keyed by content; their paths go along only to read them from.
        if params.tokenizer is not None:
            root = (ctx.recipe_dir / params.tokenizer).resolve()
            data["tokenizer"] = {"path": str(root), "files": tokenizer_digests(root)}
        if params.chat_template is not None:
            path = (ctx.recipe_dir / params.chat_template).resolve()
            data["chat_template"] = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        return data

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
        # Where vocabularies differ under embeddings="overlap", each vocabulary tensor is assembled whole in
        # the output dtype before it is written, as many at once as there are workers.
        vocab_sizes = {n.type.signature.vocab_size if n.type.signature else None for n in inputs}
        vocab = sorted((t.nbytes for t in sig.tensors if t.shape and t.shape[0] == sig.vocab_size), reverse=True)
        whole = sum(vocab[:workers]) if params.embeddings == "overlap" and len(vocab_sizes) > 1 else 0
        # Before any tensor, the inputs' vocabularies are compared: every table held, one file parsed.
        tokens = (sig.vocab_size or 0) * (TOKENIZER_PARSE_BYTES_PER_TOKEN + len(inputs) * TOKEN_TABLE_BYTES_PER_TOKEN)
        return Cost(bytes_read=bytes_read(inputs, out), bytes_written=sig.nbytes,
                    peak_bytes=max(chunks + whole, tokens), flops=2 * len(inputs) * sig.params)


def check_same_architecture(ctx: Context, inputs, kind: Kind, dtype: str, arg: str = "models",
                            vocab_policy: bool = False) -> Type:
    """The output type of an op over models that must share a signature (the first model's), or an error
    naming the first differing tensors; vocabulary-only differences pass when a policy handles them."""
    known = [n for n in inputs if n.type.signature is not None]
    if not known:
        return Type(kind, None)
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
                        f"`{other.label}` has {other.type.signature.vocab_size} ({names})", arg, POLICY_HINT, notes)
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
    return Signature.build(sig.model_type, tensors, sig.vocab_size, sig.tied_embeddings)
