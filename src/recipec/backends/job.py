"""What a backend rule is given and what it may raise."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..ir.graph import Node
from ..artifacts import Artifact  # what a rule reads: its inputs' results, of any kind


class RunFailure(Exception):
    """A run-time failure with a diagnostic code and a hint; reported at the failing op's span."""

    def __init__(self, code: str, message: str, hint: str | None = None):
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint


@dataclass(frozen=True)
class RunWarning:
    """A run-time warning from a rule; the engine reports it at the span of the op that built the node."""

    code: str
    message: str
    hint: str | None = None


@dataclass
class Job:
    node: Node
    inputs: list[Artifact]
    out: Path
    threads: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    progress: Callable[[int], None] = lambda nbytes: None  # called with bytes written as work advances
    warnings: list[RunWarning] = field(default_factory=list)
    nonfinite: int = 0  # NaN and ±inf values written into the result

    def warn(self, code: str, message: str, hint: str | None = None) -> None:
        self.warnings.append(RunWarning(code, message, hint))
