"""The engine-independent training core that the cp, inscp and sft rules call.

`train(model, documents, config, work_dir)` packs tokenized documents, trains a transformers causal LM
through accelerate, checkpoints into the work directory and resumes from it; `render_loss_curve` draws
the metrics it leaves there. Nothing here knows recipes, ops or the cache: failures are `TrainingError`
(message and hint), which the rule turns into a diagnostic at its op's span.
"""

from .config import TrainConfig, TrainingError, batch_shape, total_steps
from .loop import Progress, TrainSummary, packing_isolates, train
from .metrics import METRICS, read_metrics, render_loss_curve
from .packing import Document, pack

__all__ = [
    "METRICS",
    "Document",
    "Progress",
    "TrainConfig",
    "TrainSummary",
    "TrainingError",
    "batch_shape",
    "pack",
    "packing_isolates",
    "read_metrics",
    "render_loss_curve",
    "total_steps",
    "train",
]
