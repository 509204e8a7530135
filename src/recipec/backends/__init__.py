"""Backends: the rules that build each op's result.

`RULES` maps an op name to its rule, as data (module and function), so that checking which ops can run
imports nothing, and a run that finds everything cached never imports torch. An op with no rule is
refused up front with `no rule for X`, never a failure somewhere deep in a run.

A rule is `rule(job: Job) -> str`: it writes a complete model directory into `job.out` from the input
artifacts in `job.inputs`, and returns the content digest of the weights it wrote (the engine makes the
result's digest from it and the data files, store/digests.py).
"""

from __future__ import annotations

import importlib

from .job import Artifact, Job, Meter, RunFailure

RULES: dict[str, tuple[str, str]] = {
    "init": ("sources", "build_init"),
    "combine": ("arithmetic", "build_combine"),
    "merge": ("merge", "build_merge"),
}


def rule_at(module: str, function: str):
    """A rule by location: a module of this package (`merge`), or any importable module by its full
    dotted name (`my_ops.rules`), so that an op family living elsewhere registers its rules here too."""
    return getattr(importlib.import_module(module if "." in module else f".{module}", __name__), function)


def rule_for(op: str):
    """The rule that builds `op`, imported on first use."""
    return rule_at(*RULES[op])


__all__ = ["Artifact", "Job", "Meter", "RULES", "RunFailure", "rule_at", "rule_for"]
