"""Text ops: `tokenizer` (train a byte-level BPE), `extend_vocab` (append tokens to a model's vocabulary) and
`ppl_filter` (keep the documents or conversations a model finds plausible).

Their rules are in backends/text.py and use textprep; here are what they take, what they give at check time
(a tokenizer's size, a model's grown vocabulary rows) and what they cost.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import Field

from ..artifacts.tokenizer import TOKENIZER
from ..ir.types import Kind, Signature, Type
from ..textprep.bpe import BYTE_ALPHABET, special_token_list
from ..textprep.templates import DEFAULT_CHAT_TEMPLATE
from .base import ERROR_TYPE, Context, Cost, FileDigest, Input, Op, Params, bytes_read, file_digest, register
from .tokenizer_facts import require_tokenizer

# The tensors whose rows are vocabulary entries (input embeddings and output projections), by architecture.
VOCAB_ROW_TENSORS = ("model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight")
# What `tokenizer` writes per vocabulary entry (token and merge in tokenizer.json, pretty-printed), roughly.
TOKENIZER_BYTES_PER_TOKEN = 64
# The `tokenizers` trainer's working memory per byte of corpus (word counts, pair tables), measured roughly.
TRAIN_BYTES_PER_CORPUS_BYTE = 8


def chat_template_file(ctx: Context, path: str | None) -> bool:
    """Whether a `chat_template=` file exists; reports E401 when it does not."""
    if path is None or (ctx.recipe_dir / path).is_file():
        return True
    ctx.error("E401", f"no chat template file {path!r} (relative to {ctx.recipe_dir})", "chat_template",
              "a chat template is a Jinja file, e.g. templates/chat.jinja")
    return False


def _data_size(node, name: str) -> int:
    """A size a data source's node knows (0 otherwise); a `ppl_filter` result is planned at its input's
    size, which bounds it."""
    if getattr(node, "op", None) == PplFilter.name:
        return _data_size(node.inputs[0], name)
    return int(node.params.get(name, 0)) if isinstance(node.params, dict) else 0


def corpus_bytes(node) -> int:
    """The bytes of a data source's files."""
    return _data_size(node, "bytes")


def corpus_tokens(node) -> int:
    """The tokens of a data source's text, as estimated at check time (textprep/estimate.py)."""
    return _data_size(node, "estimated_tokens")


def corpus_documents(node) -> int:
    """The documents (or conversations) of a data source, as estimated at check time."""
    return _data_size(node, "estimated_documents")


@register
class TrainTokenizer(Op):
    """Train a byte-level BPE tokenizer on a corpus (deterministic). Example: `tok = tokenizer(zh, vocab_size=8000)`

    Special tokens take the first ids: `<s>`, `</s>`, `<pad>`, then `special_tokens`, then the chat template's
    markers. The result has exactly `vocab_size` tokens; `init(..., tokenizer=tok)` sizes a model to it.
    """

    name = "tokenizer"
    inputs = (Input("corpus", Kind.CORPUS, doc="the corpus to learn merges from"),)
    toolchain = ("tokenizers",)
    rule = "text:build_tokenizer"

    class Params(Params):
        vocab_size: int = Field(description="the number of tokens, special tokens included")
        model: Literal["bpe"] = Field("bpe", description="the tokenizer model (byte-level BPE)")
        special_tokens: list[str] = Field([], description="extra special tokens, after `<s>`, `</s>`, `<pad>`")
        chat_template: str | FileDigest | None = Field(None, description="a Jinja chat template file, relative "
                                                       "to the recipe (default: ChatML turns ending in `</s>`)")

    @classmethod
    def check_params(cls, ctx, params):
        if not chat_template_file(ctx, params.chat_template):
            return False
        ok = True
        template = ((ctx.recipe_dir / params.chat_template).read_text(encoding="utf-8")
                    if params.chat_template else DEFAULT_CHAT_TEMPLATE)
        specials = special_token_list("<s>", "</s>", "<pad>", params.special_tokens, template)
        smallest = BYTE_ALPHABET + len(specials) + 1
        if params.vocab_size < smallest:
            ok = ctx.reject("E440", f"vocab_size {params.vocab_size} is too small for a byte-level BPE with "
                            f"{len(specials)} special tokens", "vocab_size",
                            f"use vocab_size >= {smallest} (256 bytes, the special tokens, one merge)")
        return ok

    @classmethod
    def output_type(cls, ctx, inputs, params):
        return Type(TOKENIZER, vocab_size=params.vocab_size)

    @classmethod
    def node_params(cls, params, ctx):
        if params.chat_template is None:
            return params.model_dump(mode="json")
        return params.model_copy(update={"chat_template": file_digest(ctx, params.chat_template)}).model_dump(
            mode="json")

    @classmethod
    def cost(cls, inputs, params, out, threads):
        corpus = corpus_bytes(inputs[0])
        return Cost(bytes_read=corpus, bytes_written=params.vocab_size * TOKENIZER_BYTES_PER_TOKEN,
                    peak_bytes=corpus * TRAIN_BYTES_PER_CORPUS_BYTE, flops=corpus * 64)


def grown_signature(sig: Signature, add: int) -> Signature:
    """`sig` with `add` more vocabulary rows in its embedding and output tensors, everything else the same."""
    vocab = sig.vocab_size + add
    tensors = {t.name: (t.dtype, (vocab, *t.shape[1:]) if t.name in VOCAB_ROW_TENSORS else t.shape)
               for t in sig.tensors}
    facts = dataclasses.replace(sig.facts, vocab=vocab) if sig.facts else None
    return Signature.build(sig.model_type, tensors, vocab, sig.tied_embeddings, facts)


@register
class ExtendVocab(Op):
    """Append tokens to a model's vocabulary, existing ids unchanged (the Chinese-LLaMA step).
    Example: `zh = extend_vocab(base, corpus=zh_text, add=2000)`

    The new tokens come from another tokenizer (`tokenizer=`, of the same kind) or are learned from a corpus
    (`corpus=`); their embedding and output rows start as the mean of the existing rows (`init="mean"`) or zeros.
    Every other tensor is carried byte for byte; config.json's `vocab_size` and the tokenizer follow.
    """

    name = "extend_vocab"
    inputs = (Input("model", Kind.MODEL, doc="the model whose vocabulary grows (with its tokenizer.json)"),
              Input("tokenizer", TOKENIZER, optional=True, doc="a tokenizer to take new tokens from"),
              Input("corpus", Kind.CORPUS, optional=True, doc="a corpus to learn new tokens from"))
    toolchain = ("torch", "tokenizers")
    rule = "text:build_extend_vocab"

    class Params(Params):
        add: int = Field(description="how many tokens to append")
        # textprep.vocab.INIT_MODES, written out so that checking a recipe never imports torch
        init: Literal["mean", "zero"] = Field("mean", description="the new rows: the mean of the existing ones, "
                                              "or zeros")

    @classmethod
    def check_params(cls, ctx, params):
        ok = True
        if ctx.given.get("tokenizer") == ctx.given.get("corpus"):
            ok = ctx.reject("E442", "extend_vocab takes new tokens from `tokenizer=` or `corpus=`, exactly one",
                            hint="e.g. extend_vocab(base, corpus=text(\"zh/*.txt\"), add=2000)")
        if params.add < 1:
            ok = ctx.reject("E441", f"`add` must be a positive number of tokens, got {params.add}", "add")
        return ok

    @classmethod
    def output_type(cls, ctx, inputs, params):
        sig = inputs[0].type.signature
        rows = sig is None or (sig.vocab_size is not None and any(t.name in VOCAB_ROW_TENSORS for t in sig.tensors))
        if not rows:
            ctx.error("E443", f"cannot find the vocabulary rows of this {sig.model_type} model", "model",
                      "extend_vocab knows " + ", ".join(f"`{n}`" for n in VOCAB_ROW_TENSORS))
        if not require_tokenizer(ctx, inputs[0], "extend_vocab", "model") or not rows:
            return ERROR_TYPE
        if sig is None:
            return Type(Kind.MODEL, None)  # known once the model is locked
        return Type(Kind.MODEL, grown_signature(sig, params.add))

    @classmethod
    def cost(cls, inputs, params, out, threads):
        sig = out.signature
        if sig is None:
            return Cost()
        rows = max((t.nbytes for t in sig.tensors if t.name in VOCAB_ROW_TENSORS), default=0)
        learn = corpus_bytes(inputs[-1]) if len(inputs) > 1 else 0
        return Cost(bytes_read=bytes_read(inputs[:1], out) + learn, bytes_written=sig.nbytes,
                    peak_bytes=3 * rows + learn * TRAIN_BYTES_PER_CORPUS_BYTE, flops=sig.params)


@register
class PplFilter(Op):
    """Keep the documents (or conversations) whose perplexity under a model lies within bounds.
    Example: `clean = ppl_filter(sft_data, chat_model, max=15)`

    Perplexity is exp(mean next-token loss) over a document's tokens (a conversation rendered by the model's
    chat template), in fp32. The result is the same kind as the data; the counts kept and dropped and a
    histogram of perplexities are printed by `run` and kept with the result (`ppl_filter.json`).
    """

    name = "ppl_filter"
    inputs = (Input("data", (Kind.CORPUS, Kind.DATASET), doc="a corpus or a chat dataset"),
              Input("model", Kind.MODEL, doc="the model that scores it (with its tokenizer)"))
    toolchain = ("torch", "transformers", "tokenizers")
    rule = "text:build_ppl_filter"
    imports = ("torch", "transformers")

    class Params(Params):
        max: float | None = Field(None, description="the largest perplexity kept")
        min: float | None = Field(None, description="the smallest perplexity kept")
        seq_len: int = Field(1024, description="tokens scored per document; longer ones are scored in windows")
        batch: int = Field(8, description="documents per forward pass")

    @classmethod
    def check_params(cls, ctx, params):
        ok = True
        if params.max is None and params.min is None:
            ok = ctx.reject("E444", "ppl_filter needs a bound: `max=`, `min=` or both",
                            hint="e.g. ppl_filter(data, model, max=15)")
        for name in ("max", "min"):
            value = getattr(params, name)
            if value is not None and not value > 0:
                ok = ctx.reject("E444", f"`{name}` is a perplexity, which is above 0; got {value:g}", name)
        if params.max is not None and params.min is not None and params.max <= params.min:
            ok = ctx.reject("E444", f"`max` ({params.max:g}) must be above `min` ({params.min:g})", "max",
                            "nothing lies between them: every document would be dropped")
        for name in ("seq_len", "batch"):
            if getattr(params, name) < 1:
                ok = ctx.reject("E444", f"`{name}` must be at least 1, got {getattr(params, name)}", name)
        return ok

    @classmethod
    def output_type(cls, ctx, inputs, params):
        if not require_tokenizer(ctx, inputs[1], "ppl_filter", "model"):
            return ERROR_TYPE
        return Type(inputs[0].type.kind)

    @classmethod
    def cost(cls, inputs, params, out, threads):
        model = inputs[1].type.signature
        data = corpus_bytes(inputs[0])
        if model is None:
            return Cost(bytes_read=data)
        tokens = corpus_tokens(inputs[0])
        logits = params.batch * params.seq_len * (model.vocab_size or 0) * 4
        return Cost(bytes_read=data + model.nbytes, bytes_written=data, flops=2 * model.params * tokens,
                    peak_bytes=model.params * 4 + 3 * logits)
