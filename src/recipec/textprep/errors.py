"""The one error text preparation raises: a message and a hint, which the calling op turns into a diagnostic."""

from __future__ import annotations


class TextPrepError(Exception):
    """Bad input to text preparation (a tokenizer, template, corpus or conversation), with a hint to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
