"""The plan: what `recipec run` would build, in order, and what each step costs.

Steps come in topological order over the nodes the exports need. Inputs (`load`, `hf`, data) are not
built; every other node is built unless the cache already holds it. Costs come from each op's cost
model, for the number of worker threads the run will use. Rendering (text and JSON) lives in `render.py`.

Peak memory is what a user sees of `recipec run`: the private (anonymous) memory of the run process,
interpreter and libraries included, memory-mapped input files not (the kernel can drop those pages at
any time). A step's peak is the process's baseline, plus the libraries its and earlier steps' rules
imported (they stay loaded; `IMPORTS`), plus the step's own working memory (and a launched step's own
process: its baseline and libraries); the run's peak is the largest step's, since
steps run one after another and each result is streamed to disk.

Time is a simple model: a step's start-up (the libraries its process has not imported yet, a launched
step's own process, and its op's fixed work such as tracing a graph: `startup`), then reading,
writing and arithmetic one after another at rates of a typical machine (`BASE_RATES`), multiplied by
how much slower or faster this machine was at that work for the same op in earlier runs (the cache
remembers each op's ratio of measured to modelled work, `speed`). The run's time is the sum of its
steps'.

An op may add advice to a step it is about to build, through an optional `plan_advice(node, cost,
seconds)` classmethod: the training ops say when a step is out of reach on this machine (no GPU, longer
than a day) and what a GPU run of it needs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Callable

from ..ir.graph import ExportSpec, Graph, Node
from ..ops import REGISTRY
from ..ops.base import Cost

INPUT, BUILD, CACHED = "input", "build", "cached"

# Private memory of a `recipec run` process before its first step: the interpreter, torch and recipec
# (measured 151 MiB with torch 2.13 on x86-64 Linux), with room for allocator slack.
PROCESS_BYTES = 224 << 20


def default_threads() -> int:
    """The worker threads `run` uses when not told: one per core."""
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Rates:
    """Throughputs the time model assumes before this machine has been measured."""

    read_bytes_per_s: float = 1.0 * 2**30  # input weights, mostly from the page cache or an NVMe disk
    write_bytes_per_s: float = 0.5 * 2**30  # results are fsynced
    flops_per_thread_per_s: float = 1e9  # fp32 elementwise work, memory-bound


BASE_RATES = Rates()
CALIBRATION_SECONDS = 1.0  # a build whose modelled work is shorter tells more of noise than of rates

# What importing a library costs a process on the reference machine (2 x86-64 cores; torch 2.13 and
# transformers 5, measured): (seconds, private bytes it adds, for good). A process pays each once, in the
# first step that needs it; a launched step (training) runs in a process of its own and pays its imports,
# the interpreter's start and its baseline every time.
IMPORTS = {
    "torch": (2.4, 0),  # its memory is part of PROCESS_BYTES: every run process imports it
    "transformers": (5.5, 192 << 20),  # and its model code
    "accelerate": (0.3, 128 << 20),
    "torch.export": (2.2, 192 << 20),  # with dynamo, which traces
    "onnxruntime": (0.4, 128 << 20),  # and the ONNX translation
}
PROCESS_START_SECONDS = 0.5


@dataclass
class Libraries:
    """What a run's process has imported so far, and its private memory with them."""

    loaded: set[str] = field(default_factory=set)
    bytes: int = PROCESS_BYTES


def startup(node: Node, process: Libraries) -> tuple[float, int]:
    """The fixed part of a step, whatever its size: (seconds: its op's fixed work (`Op.startup`) and the
    imports it does; bytes its own process adds for the step, a launched step's). `process` is updated: an
    in-process rule's libraries stay loaded, and in memory, for the rest of the run."""
    op = REGISTRY[node.op]
    imports, fixed = op.startup(node)
    if op.launchable:
        return (PROCESS_START_SECONDS + fixed + sum(IMPORTS[lib][0] for lib in imports),
                PROCESS_BYTES + sum(IMPORTS[lib][1] for lib in imports))
    missing = [lib for lib in imports if lib not in process.loaded]
    process.loaded.update(missing)
    process.bytes += sum(IMPORTS[lib][1] for lib in missing)
    return fixed + sum(IMPORTS[lib][0] for lib in missing), 0


def step_seconds(work: float, startup: float, speed: float | None) -> float:
    """A step's estimated time: its start-up, and its modelled work at this machine's measured speed for
    the op (`speed`: measured / modelled work, None before one was measured)."""
    return startup + work * (speed or 1.0)


def measured_speed(seconds: float, work: float, startup: float) -> float | None:
    """What a build that took `seconds` says of this machine's speed at its op's work; None when its work
    is too short to tell (start-up and noise would decide)."""
    if work < CALIBRATION_SECONDS:
        return None
    return max(seconds - startup, 0.1 * work) / work


def modelled_seconds(cost: Cost, threads: int, rates: Rates = BASE_RATES) -> float:
    """A step's time before calibration: its reads, writes and arithmetic done one after another."""
    return (cost.bytes_read / rates.read_bytes_per_s + cost.bytes_written / rates.write_bytes_per_s
            + cost.flops / (rates.flops_per_thread_per_s * max(1, threads)))


@dataclass(frozen=True)
class Step:
    node: Node
    status: str
    cost: Cost
    description: str
    seconds: float = 0.0  # estimated time to build it; 0 for inputs and cached steps
    advice: str = ""  # what the op says of a step this machine is badly suited to (training without a GPU)


@dataclass(frozen=True)
class Plan:
    recipe: str
    steps: tuple[Step, ...]
    exports: tuple[ExportSpec, ...]
    threads: int

    @property
    def to_build(self) -> int:
        return sum(s.status == BUILD for s in self.steps)

    @property
    def cached(self) -> int:
        return sum(s.status == CACHED for s in self.steps)

    @property
    def totals(self) -> Cost:
        built = [s.cost for s in self.steps if s.status == BUILD]
        accelerator = [c.accelerator_bytes for c in built if c.accelerator_bytes is not None]
        return Cost(sum(c.bytes_read for c in built), sum(c.bytes_written for c in built),
                    max((c.peak_bytes for c in built), default=0), sum(c.flops for c in built),
                    max(accelerator) if accelerator else None)

    @property
    def seconds(self) -> float:
        """Estimated time of the whole run: steps run one after another."""
        return sum(s.seconds for s in self.steps)

    def summary(self) -> str:
        n = len(self.exports)
        return f"Plan: {self.to_build} to build, {self.cached} cached, {n} export{'s' if n != 1 else ''}."


def describe(node: Node) -> str:
    """How the recipe wrote the expression that made this node, on one line."""
    if node.spans:
        return re.sub(r"\s+", " ", node.spans[0].text).strip()
    return node.op


def step_cost(node: Node, threads: int) -> Cost:
    """What building `node` costs by its op's model, working memory only (the process's baseline is the
    plan's business); zero for an input."""
    op = REGISTRY[node.op]
    if not op.builds:
        return Cost()
    return op.cost(list(node.inputs), op.Params.model_construct(**node.params), node.type, threads)


def make_plan(graph: Graph, recipe: str, is_cached: Callable[[Node], bool] = lambda node: False,
              threads: int | None = None, speed: dict[str, float] | None = None) -> Plan:
    """The plan for a lowered graph on `threads` workers (default: as `run`); `is_cached` says which
    built nodes the cache already holds; `speed` is this machine's measured/modelled time ratio per op."""
    threads = threads or default_threads()
    speed = speed or {}
    steps, process = [], Libraries()
    for node in graph.reachable():
        op = REGISTRY[node.op]
        if not op.builds:
            status = INPUT
        elif is_cached(node):
            status = CACHED
        else:
            status = BUILD
        cost, seconds = step_cost(node, threads), 0.0
        if status == BUILD:
            fixed, own_process = startup(node, process)
            if cost != Cost():  # known (a report or an ONNX model has no signature, but a cost)
                cost = replace(cost, peak_bytes=process.bytes + own_process + cost.peak_bytes)
                seconds = step_seconds(modelled_seconds(cost, threads), fixed, speed.get(op.name))
        steps.append(Step(node, status, cost, describe(node), seconds, _advice(op, node, status, cost, seconds)))
    return Plan(recipe, tuple(steps), tuple(graph.exports), threads)


def _advice(op, node: Node, status: str, cost: Cost, seconds: float) -> str:
    """An op's advice on a step to build, from its optional `plan_advice(node, cost, seconds)` hook."""
    advise = getattr(op, "plan_advice", None)
    return advise(node, cost, seconds) if advise is not None and status == BUILD and node.type.signature else ""
