"""Backends: the rules that build each op's result. `RULES` maps an op name to its rule; an op with no
rule is refused up front with `no rule for X` (never a failure somewhere deep in a run).

A rule is `rule(job: Job) -> str`: it writes a complete model directory into `job.out` from the input
artifacts in `job.inputs`, and returns the result's content digest.
"""

from __future__ import annotations

from .job import Artifact, Job, RunFailure

RULES: dict[str, object] = {}


def rule(op: str):
    """Decorator: register a backend rule for an op."""
    def register(fn):
        RULES[op] = fn
        return fn
    return register


def load_rules() -> dict:
    from . import arithmetic, merge, sources  # noqa: F401  (registration on import)

    return RULES


__all__ = ["Artifact", "Job", "RULES", "RunFailure", "load_rules", "rule"]
