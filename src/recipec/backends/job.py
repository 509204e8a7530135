"""What a backend rule is given and what it may raise.

A rule gets a `Job`: its node, the input artifacts, `out` (the directory its result is written into,
committed to the cache only when the rule returns), `work` (the node's work directory, kept across
failures so that a long job resumes from its checkpoints; the rule creates it if it wants one) and
`progress`, a `Meter` that the rule advances in its own units, and `upstream`: the result of every node it
is built from (its inputs, theirs, and so on), by node id, so that a report can show what came before its
inputs (the loss curves of training nodes upstream of an evaluated model). A launched job's is empty.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..artifacts import Artifact  # what a rule reads: its inputs' results, of any kind
from ..ir.graph import Node


class RunFailure(Exception):
    """A run-time failure with a diagnostic code and a hint; reported at the failing op's span."""

    def __init__(self, code: str, message: str, hint: str | None = None):
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint


def checked_bytes(path: Path | str, sha256: str) -> bytes:
    """A file a parameter names, as the recipe was checked with it: RunFailure E502 when it changed since."""
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RunFailure("E502", f"{path} changed since the recipe was checked",
                         "run `recipec check` again: the recipe's key holds the file's content")
    return data


def checked_text(file) -> str:
    """The UTF-8 text of a file parameter (a `FileDigest`: path and sha256), as `checked_bytes` reads it."""
    return checked_bytes(file.path, file.sha256).decode("utf-8")


@dataclass(frozen=True)
class RunWarning:
    """A run-time warning from a rule; the engine reports it at the span of the op that built the node."""

    code: str
    message: str
    hint: str | None = None


@dataclass
class Meter:
    """How far a job is, in its own unit (bytes, steps, tokens, documents), with a total when known.

    `meter(n)` advances by n; `meter.update(done, total, unit)` says where the job stands (a resumed job
    starts where its checkpoint was). Every change is passed to `sink`, which draws it. The rate, and so
    the ETA, is measured from the first report on: work done before it (a checkpoint) took no time here."""

    label: str = ""
    total: int | None = None
    unit: str = "bytes"
    done: int = 0
    sink: Callable[["Meter"], None] = lambda meter: None
    finished: bool = False
    _baseline: tuple[float, int] | None = None  # (when, done) at the first report
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # rules report from threads

    def __call__(self, advance: int) -> None:
        with self._lock:
            self._set(self.done + advance, None, None)

    def update(self, done: int, total: int | None = None, unit: str | None = None) -> None:
        with self._lock:
            self._set(done, total, unit)

    def _set(self, done: int, total: int | None, unit: str | None) -> None:
        if unit is not None and unit != self.unit:
            self.unit, self._baseline = unit, None  # another unit: the rate so far means nothing
        if self._baseline is None:
            self._baseline = (time.monotonic(), done)
        self.done = done
        self.total = total if total is not None else self.total
        self.sink(self)

    def finish(self) -> None:
        self.finished = True
        self.sink(self)

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate since the first report; None without a total or a rate yet."""
        if self.total is None or self._baseline is None:
            return None
        since, start = self._baseline
        elapsed, gained = time.monotonic() - since, self.done - start
        if gained <= 0 or elapsed <= 0:
            return None
        return max(0.0, (self.total - self.done) * elapsed / gained)


@dataclass
class Job:
    node: Node
    inputs: list[Artifact]
    out: Path
    work: Path  # the node's work directory: absent until the rule makes it, kept until the result is committed
    threads: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    progress: Meter = field(default_factory=Meter)
    warnings: list[RunWarning] = field(default_factory=list)
    nonfinite: int = 0  # NaN and ±inf values written into the result
    upstream: dict[int, Artifact] = field(default_factory=dict)  # node id -> result, for every node upstream
    read_again: bool = False  # whether another node of this run reads the result (from the page cache, then)

    def warn(self, code: str, message: str, hint: str | None = None) -> None:
        self.warnings.append(RunWarning(code, message, hint))
