"""AdamW with weight decay only where it belongs, and the learning-rate schedule: warmup, then decay."""

from __future__ import annotations

import math

import torch

from ...ops.train_config import TrainConfig


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total`."""
    if step < warmup:
        return (step + 1) / warmup  # the first step already learns; the last warmup step reaches the peak
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups: matrices decay; vectors (biases, norm scales) do not."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
    ]


def optimizer_and_schedule(model: torch.nn.Module, config: TrainConfig, total: int):
    """The AdamW optimizer and its LambdaLR scheduler for a run of `total` optimizer steps. The optimizer is
    torch's fused one where every parameter allows it (floating point, on the CPU or a GPU): one pass over
    each tensor instead of a dozen, 6x faster on the CPU (7M parameters: 8 ms a step instead of 49)."""
    groups = decay_groups(model, config.weight_decay)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=config.lr, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup, total, config.schedule))
    return optimizer, scheduler
