"""The chat dataset kind: conversations, normalized to `{"messages": [{"role", "content"}, ...]}` records.

`chat(glob)` reads JSON-lines files whose objects hold a non-empty `messages` list of `{"role": one of
system, user, assistant, tool; "content": a string}`; other keys are dropped. Ops read it with
`iter_conversations`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..ir.types import Kind
from . import Artifact, Problem, register
from .data import DataKind, Records, iter_records, json_lines

ROLES = ("system", "user", "assistant", "tool")


@register
class DatasetKind(DataKind):
    kind = Kind.DATASET
    noun = "a chat dataset"
    record_noun = "conversation"


def read_conversations(path: Path, shown: str) -> Records:
    """The conversations of one chat file, and a Problem for each line that is not one."""
    for number, value in json_lines(path, shown):
        if isinstance(value, Problem):
            yield (value if value.code != "E551" else
                   Problem(value.code, value.message, 'chat reads JSON lines, each {"messages": [{"role": "user", '
                           '"content": "..."}, ...]}; plain text is read by text(...)'))
            continue
        problem = _conversation_problem(value)
        if problem:
            yield Problem("E553", f"{shown}:{number}: {problem}",
                          'each line is {"messages": [{"role": "user", "content": "..."}, ...]}')
        else:
            yield {"messages": [{"role": m["role"], "content": m["content"]} for m in value["messages"]]}


def _conversation_problem(value: object) -> str | None:
    messages = value.get("messages") if isinstance(value, dict) else None
    if not isinstance(messages, list):
        return "no `messages` list"
    if not messages:
        return "an empty `messages` list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i + 1} is not an object"
        if message.get("role") not in ROLES:
            return f"message {i + 1} has role {message.get('role')!r}, not one of {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"message {i + 1} has no string `content`"
    return None


def iter_conversations(artifact: Artifact) -> Iterator[list[dict]]:
    """Every conversation of a chat dataset (its list of messages), in file order, streamed."""
    for record in iter_records(artifact):
        yield record["messages"]
