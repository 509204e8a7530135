"""Documents and conversations to token ids and loss masks, the way each training op sees its data.

- `encode_document` (cp): the tokenizer's own conventions for the start (Llama adds one BOS, GPT-2 none), then
  EOS at the end; loss on every token.
- `encode_conversation` (sft): the chat template renders the whole conversation as text (`tokenize=False`), which
  is tokenized once with `add_special_tokens=False`, so the template's BOS is the only one. The loss mask is 1
  exactly on what each assistant turn adds: its content and its end-of-turn token, not the role header before
  it nor the whitespace between turns. Those characters are found by rendering prefixes of the conversation
  (up to the turn with the generation prompt, then with the turn) and mapped to tokens by their offsets.
- `wrap_inscp` (inscp): one document as the assistant's answer to an empty user turn (InsCP), loss on every
  token unless `loss="assistant"`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .errors import TextPrepError
from .templates import missing_markers

LOSS_MODES = ("all", "assistant")


@dataclass(frozen=True)
class Encoded:
    """One training example: token ids and, for each, 1 where the loss counts and 0 where it does not."""

    ids: list[int]
    loss_mask: list[int]


@dataclass(frozen=True)
class ChatFormat:
    """A tokenizer and the chat template to render with, checked to fit each other (see `chat_format`)."""

    tokenizer: PreTrainedTokenizerBase
    template: str


VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")  # a tokenizer has one


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The tokenizer in a local directory, loaded by transformers."""
    if not Path(directory).is_dir():
        raise TextPrepError(f"no tokenizer directory at {directory}", "name a directory with tokenizer.json")
    if not any((Path(directory) / name).is_file() for name in VOCABULARY_FILES):
        # transformers 5 would hand back a tokenizer with an empty vocabulary
        raise TextPrepError(f"{directory} holds no tokenizer (none of {', '.join(VOCABULARY_FILES)})",
                            "give the model a tokenizer: `tokenizer=` on `init`, or a model folder that has one")
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise TextPrepError(f"cannot load a tokenizer from {directory}: {e}",
                            "name a directory with tokenizer.json and tokenizer_config.json") from None


def chat_format(tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> ChatFormat:
    """Pair a tokenizer with `template` (default: its own), refusing a missing template or missing tokens."""
    template = template if template is not None else tokenizer.chat_template
    if isinstance(template, dict):  # named templates: a chat uses the one called "default"
        template = template.get("default")
    if not isinstance(template, str):
        raise TextPrepError("the tokenizer has no chat template",
                            "give the op `template=` (a Jinja file) or the model `chat_template=`")
    missing = missing_markers(template, lambda text: tokenizer.encode(text, add_special_tokens=False))
    if missing:
        names = ", ".join(f"`{m}`" for m in missing)
        raise TextPrepError(f"the chat template writes {names}, which the tokenizer does not have as one token",
                            "use a template written for this tokenizer, or add its tokens as special tokens")
    return ChatFormat(tokenizer, template)


def encode_document(tokenizer: PreTrainedTokenizerBase, text: str) -> Encoded:
    """A plain document for continual pre-training: BOS as the tokenizer adds it, EOS at the end, loss on all."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return Encoded(ids, [1] * len(ids))


def _render(fmt: ChatFormat, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return fmt.tokenizer.apply_chat_template(messages, chat_template=fmt.template, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
    except TemplateError as e:
        raise TextPrepError(f"the chat template failed to render a conversation: {e}",
                            "check the conversation's roles against what the template accepts") from None


def _check_messages(messages: Any) -> list[dict]:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise TextPrepError("a conversation must be a non-empty list of {\"role\": str, \"content\": str}",
                            "write each line of a chat file as {\"messages\": [{\"role\": ..., \"content\": ...}]}")
    return messages


def assistant_spans(fmt: ChatFormat, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) characters each assistant turn adds to it."""
    full = _render(fmt, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(fmt, messages[:i], generation_prompt=True)
        through = _render(fmt, messages[: i + 1], generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise TextPrepError("the chat template does not render a conversation as the sum of its turns, so "
                                "the assistant's tokens cannot be located", "use loss=\"all\" or another template")
        # Whitespace after the end-of-turn token separates turns; it is the template's, not the assistant's.
        end = max(len(before), len(through.rstrip()))
        spans.append((len(before), end))
    return full, spans


def _tokens_in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap a span (a token straddling the start carries content)."""
    def inside(start: int, end: int) -> bool:
        return any(start < s_end and max(end, start + 1) > s_start for s_start, s_end in spans)
    return [1 if inside(start, end) else 0 for start, end in offsets]


def encode_conversation(fmt: ChatFormat, messages: list[dict], loss: str = "assistant") -> Encoded:
    """A conversation rendered with the chat template; the loss on assistant turns only, or on all tokens."""
    if loss not in LOSS_MODES:
        raise TextPrepError(f"loss must be one of {', '.join(LOSS_MODES)}, got {loss!r}")
    messages = _check_messages(messages)
    if loss == "all":
        text = _render(fmt, messages, generation_prompt=False)
        ids = list(fmt.tokenizer(text, add_special_tokens=False)["input_ids"])
        return Encoded(ids, [1] * len(ids))
    text, spans = assistant_spans(fmt, messages)
    try:
        encoding = fmt.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise TextPrepError("the tokenizer cannot report character offsets, needed for assistant-only loss",
                            "use a fast tokenizer (a directory with tokenizer.json)") from None
    ids = list(encoding["input_ids"])
    return Encoded(ids, _tokens_in_spans(list(encoding["offset_mapping"]), spans))


def inscp_messages(document: str, system: str | None = None) -> list[dict]:
    """InsCP's wrapping of one document: an empty user turn, the document as the assistant's answer."""
    turns = [{"role": "user", "content": ""}, {"role": "assistant", "content": document}]
    return ([{"role": "system", "content": system}] if system else []) + turns


def wrap_inscp(fmt: ChatFormat, document: str, system: str | None = None, loss: str = "all") -> Encoded:
    """One document for InsCP: wrapped in the chat template, loss on all tokens or (`"assistant"`) the answer."""
    return encode_conversation(fmt, inscp_messages(document, system), loss=loss)
