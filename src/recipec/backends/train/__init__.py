"""The engine-independent training core that the cp, inscp and sft rules call, and those rules.

`train(model, documents, config, work_dir)` packs tokenized documents, trains a transformers causal LM
through accelerate, checkpoints into the work directory and resumes from it; `render_loss_curve` draws
the metrics it leaves there. Nothing in the core knows recipes, ops or the cache: failures are
`TrainingError` (message and hint), which the rules (rules.py, `build_train`) turn into a diagnostic at
their op's span.

The settings (`TrainConfig`) live in `recipec.ops.train_config`, as they are the training ops'
parameter schema, read at check time without torch; metrics are imported eagerly, and the loop,
packing and rules load on first use.
"""

import importlib

from ...ops.train_config import TrainConfig, TrainingError, batch_shape, total_steps
from .metrics import METRICS, read_metrics, render_loss_curve

_LAZY = {"Progress": "loop", "TrainSummary": "loop", "packing_isolates": "loop", "train": "loop",
         "Document": "packing", "pack": "packing", "build_train": "rules"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


__all__ = [
    "METRICS",
    "Document",
    "Progress",
    "TrainConfig",
    "TrainSummary",
    "TrainingError",
    "batch_shape",
    "build_train",
    "pack",
    "packing_isolates",
    "read_metrics",
    "render_loss_curve",
    "total_steps",
    "train",
]
