"""Per-step training metrics as JSON lines in the work directory, and the loss curve drawn from them.

One line per optimizer step: step, loss, lr, grad_norm, tokens, tokens_per_s. A resumed run first cuts
the file back to the checkpoint it resumes from, so the file always tells one consistent run.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...store.atomic import write_text_atomic

METRICS = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict]:
    """Every complete line of a metrics file (a line a kill cut short is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the lines of steps up to `last_step` (the steps a resumed run does not redo)."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def render_loss_curve(metrics_path: Path, png_path: Path) -> None:
    """Draw loss against step from a metrics file into a PNG (same metrics and matplotlib, same bytes)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must be chosen before pyplot is imported
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(metrics_path)
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], linewidth=1.2)
    axes.set_xlabel("optimizer step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("loss (nats per target token)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    # No Software entry: the PNG's bytes then depend on the data only, not on matplotlib's version string.
    figure.savefig(png_path, format="png", metadata={"Software": None})
    plt.close(figure)
