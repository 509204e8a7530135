"""The training settings one loop needs, typed and checked, and the step counts that follow from them.

cp, inscp and sft all reduce to this: the op turns its parameters into a `TrainConfig`; the loop reads
nothing else. Batch arithmetic lives here so the loop and the plan agree on it, and so does what the
machine offers (`this_machine`): `precision="auto"` is resolved against it before a node is keyed, so the
key says what really ran.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainingError(Exception):
    """A training run that cannot go on: a message for the user and a hint phrased as an instruction."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


class TrainConfig(BaseModel):
    """Hyperparameters of one training run; exactly one of `steps`, `epochs`, `tokens` says how long."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq_len: int = Field(gt=1)
    batch: int = Field(gt=0, description="sequences per optimizer step, over all processes")
    micro_batch: int | None = Field(default=None, gt=0, description="sequences per forward pass")
    grad_accum: int | None = Field(default=None, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: int = Field(default=0, ge=0, description="optimizer steps of linear warmup")
    steps: int | None = Field(default=None, gt=0)
    epochs: float | None = Field(default=None, gt=0)
    tokens: int | None = Field(default=None, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    save_every: int | None = Field(default=None, gt=0, description="optimizer steps between checkpoints")
    shuffle_buffer: int = Field(default=1024, gt=0, description="packed sequences shuffled together")

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        given = [name for name in ("steps", "epochs", "tokens") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of steps, epochs, tokens (got {', '.join(given) or 'none'})")
        return self


@dataclass(frozen=True)
class BatchShape:
    """How a global batch splits: per process, then into micro-batches accumulated before one step."""

    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def per_process(self) -> int:
        return self.micro_batch * self.grad_accum


def batch_shape(config: TrainConfig, world_size: int) -> BatchShape:
    """Micro-batch and accumulation for `world_size` processes; whichever is not given follows from `batch`."""
    if config.batch % world_size:
        raise TrainingError(f"batch={config.batch} does not split over {world_size} processes",
                            f"make `batch` a multiple of {world_size}")
    per_process = config.batch // world_size
    micro, accum = config.micro_batch, config.grad_accum
    if micro is None and accum is None:
        micro, accum = per_process, 1
    elif micro is None:
        micro = per_process // accum
    elif accum is None:
        accum = per_process // micro
    if micro < 1 or accum < 1 or micro * accum != per_process:
        given = " × ".join(f"{name}={value}" for name, value in (("micro_batch", config.micro_batch),
                                                                ("grad_accum", config.grad_accum)) if value is not None)
        over = f" over {world_size} processes" if world_size != 1 else ""
        if config.micro_batch is not None and config.grad_accum is not None:
            raise TrainingError(f"batch={config.batch}{over} is not {given}",
                                "give `batch` = micro_batch × grad_accum × processes, or only one of the two")
        raise TrainingError(f"{given} does not divide batch={config.batch}{over} ({per_process} per process)",
                            f"give a divisor of {per_process}")
    return BatchShape(micro, accum, world_size)


def sequences_in(total_tokens: int, seq_len: int) -> int:
    """Packed sequences a corpus of `total_tokens` fills (the last one padded, never dropped)."""
    return math.ceil(total_tokens / seq_len)


def total_steps(config: TrainConfig, corpus_tokens: int) -> int:
    """Optimizer steps the run takes, given the corpus size in tokens."""
    if config.steps is not None:
        return config.steps
    if config.tokens is not None:
        return math.ceil(config.tokens / (config.batch * config.seq_len))
    return math.ceil(sequences_in(corpus_tokens, config.seq_len) * config.epochs / config.batch)


def passes_needed(config: TrainConfig) -> int:
    """Full passes over the corpus the data stream holds: `epochs` rounded up, else one."""
    return math.ceil(config.epochs) if config.epochs is not None else 1


@dataclass(frozen=True)
class Device:
    """What training can use on this machine: a GPU's name (None on a CPU-only machine), the memory one
    training process may fill (the GPU's, or the machine's RAM), and whether the GPU computes in bf16."""

    gpu: str | None
    memory_bytes: int
    bf16: bool = False


@functools.cache
def this_machine() -> Device:
    """The first CUDA GPU, or the CPU and its RAM. Asks torch when a rule has imported it already, else
    `nvidia-smi`, so that check and plan stay free of torch."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Device(props.name, props.total_memory, torch.cuda.is_bf16_supported())
    gpu = _nvidia_smi_gpu()
    if gpu is not None:
        return gpu
    return Device(None, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _nvidia_smi_gpu() -> Device | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        answer = subprocess.run([smi, "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
        name, mib, capability = (field.strip() for field in answer.splitlines()[0].split(","))
        return Device(name, int(float(mib)) << 20, float(capability) >= 8.0)  # bf16 from Ampere (8.0) on
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def resolved_precision(precision: str, device: Device) -> Literal["fp32", "bf16"]:
    """`auto` is bf16 mixed precision on a GPU that has bf16, fp32 elsewhere (bf16 on a CPU is ~10x slower)."""
    if precision != "auto":
        return precision
    return "bf16" if device.gpu is not None and device.bf16 else "fp32"


def machine_precision(params, device: Device):
    """`params` with `precision="auto"` replaced by the precision `device` (this machine) trains in, as every
    op that trains keys its node: the key, the plan and the run then say what runs (bf16 and fp32 bytes
    differ)."""
    return params.model_copy(update={"precision": resolved_precision(params.precision, device)})


def largest_fitting_micro_batch(per_process: int, bytes_at: Callable[[int], int], budget: int) -> int:
    """The largest micro-batch that divides `per_process` and whose planned memory (`bytes_at(m)`) stays
    within `budget`; 1 when none does (the run may then fail for memory, and says so)."""
    fitting = [m for m in range(per_process, 0, -1) if per_process % m == 0 and bytes_at(m) <= budget]
    return fitting[0] if fitting else 1
