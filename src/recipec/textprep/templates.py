"""Chat templates: the default one recipec's tokenizers ship, reading a directory's, and what a template needs.

Light on purpose (json, re): check time reads templates and tests their special tokens without importing
transformers. Rendering happens in `encode`, through transformers, so the template runs exactly as it will
for anyone who loads the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from .errors import TextPrepError

# ChatML turns in which every turn ends with the tokenizer's own EOS, so generation stops on one token and a
# plain pre-training document ends the same way. `{% generation %}` marks what the assistant says, for
# transformers' `return_assistant_tokens_mask`; recipec's own masks do not depend on it.
TURN_START = "<|im_start|>"
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '" + TURN_START + "' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + TURN_START + "assistant\\n' }}{% endif %}"
)

# A special-token-shaped literal in a template: `<|im_start|>`, `</s>`, `<start_of_turn>`. No spaces, quotes
# or Jinja braces inside, so comparisons such as `a < b and c > d` never match.
_MARKER = re.compile(r"<[^<>\s'\"{}%]{1,40}>")


def template_markers(template: str) -> list[str]:
    """The special-token-shaped literals a template writes, in order of first appearance."""
    return list(dict.fromkeys(_MARKER.findall(template)))


def missing_markers(template: str, encode: Callable[[str], list[int]]) -> list[str]:
    """The template's markers that `encode` (text -> ids, no special tokens added) does not map to one token."""
    return [marker for marker in template_markers(template) if len(encode(marker)) != 1]


def read_chat_template(directory: Path) -> str | None:
    """The chat template a tokenizer directory ships, as transformers finds it, or None."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TextPrepError(f"{jinja} is not UTF-8 text: {e}", "save it as UTF-8") from None
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as e:
            raise TextPrepError(f"{path} is not a JSON object: {e}", "repair or remove the file") from None
        if isinstance(template, list):  # named templates: the one called "default" is what a chat uses
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            return template
    return None
