"""Backends: the rules that build each op's result.

An op names its rule as a string (`Op.rule = "merge:build_merge"`), resolved here on first use, so that
checking which ops can run imports nothing and a run that finds everything cached never imports torch.
An op with no rule is refused up front with `no rule for X`, never a failure somewhere deep in a run.

A rule is `rule(job: Job) -> str | None`: it reads the op's validated parameters with
`Op.params_of(job.node)` and writes a complete result of its node's kind into `job.out` from the
input artifacts in `job.inputs`. A model rule returns the content digest of the weights it wrote (the
model kind makes the result's digest from it and the data files); other kinds digest their files
(recipec/artifacts), except a report that holds measurements, whose rule returns the digest of the rest.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import threading
from collections.abc import Callable

from ..ops import REGISTRY
from .job import Artifact, Job, Meter, RunFailure


def rule_module(op: str) -> tuple[str, str]:
    """(module, function) of the rule that builds `op`: a module of this package when one has the name,
    else an importable module of that name (a plugin's, a test's)."""
    module, _, function = (REGISTRY[op].rule or "").partition(":")
    local = f"{__name__}.{module}"
    is_local = "." not in module and importlib.util.find_spec(local) is not None
    return (local if is_local else module), function


def rule_at(module: str, function: str) -> Callable[[Job], str | None]:
    """A rule by its location, as `rule_module` gives it (a launched worker finds its rule this way)."""
    return getattr(importlib.import_module(module), function)


def rule_for(op: str) -> Callable[[Job], str | None]:
    """The rule that builds `op`, imported on first use."""
    return rule_at(*rule_module(op))


def import_torch_in_background() -> threading.Thread:
    """Import torch on a thread of its own and return it (started); join it before running a rule.

    Importing torch takes seconds of one core, while a cold run's first seconds go to hashing its inputs
    on the others (torch-free, see store/digests.py): side by side, a cold run takes the time of the
    longer, not of both. Only torch: packages that install a lazy module in place of themselves, as
    transformers does, must not be imported from two threads at once, and a rule imports those.
    """
    def work() -> None:
        with contextlib.suppress(Exception):  # a broken install fails again, with its message, in the rule
            importlib.import_module("torch")

    thread = threading.Thread(target=work, name="recipec-import-torch")
    thread.start()
    return thread


__all__ = ["Artifact", "Job", "Meter", "RunFailure", "import_torch_in_background", "rule_at", "rule_for", "rule_module"]
