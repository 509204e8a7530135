"""Per-step training metrics as JSON lines in the work directory, and the loss curve drawn from them.

One line per optimizer step: step, loss, lr, grad_norm, tokens, tokens_per_s. A resumed run first cuts
the file back to the checkpoint it resumes from, so the file always tells one consistent run.

The same records can go to accelerate's trackers (TensorBoard, W&B, ...): `recipec run --log-with NAMES`
puts the names and a log folder in the environment (`tracking_environment`), where every training rule,
in the driver or in a launched worker, finds them (`Trackers.from_environment`). Trackers see what the run
did; they change nothing it builds, so they are not part of any key.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ...store.atomic import write_text_atomic

METRICS = "metrics.jsonl"
LOG_WITH_ENV, LOG_DIR_ENV = "RECIPEC_LOG_WITH", "RECIPEC_LOG_DIR"
# accelerate's tracker names and the package each needs (`all`: whichever of them are installed).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "aim": "aim",
                    "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                    "trackio": "trackio", "all": None}


@dataclass(frozen=True)
class Trackers:
    """Which accelerate trackers a run logs to, and the folder local ones (TensorBoard) write under."""

    names: tuple[str, ...]
    directory: Path

    @classmethod
    def from_environment(cls) -> Trackers | None:
        names = tuple(n.strip() for n in os.environ.get(LOG_WITH_ENV, "").split(",") if n.strip())
        return cls(names, Path(os.environ.get(LOG_DIR_ENV, "runs"))) if names else None

    def problem(self) -> str | None:
        """Why these trackers cannot log (an unknown name, a package not installed), or None."""
        for name in self.names:
            if name not in TRACKER_PACKAGES:
                return f"unknown tracker {name!r}; accelerate knows {', '.join(TRACKER_PACKAGES)}"
            package = TRACKER_PACKAGES[name]
            if package is not None and importlib.util.find_spec(package) is None:
                return f"the {name} tracker needs the `{package}` package, which is not installed"
        return None


def tracking_environment(log_with: str, directory: Path) -> dict[str, str]:
    """The environment that tells training rules (here and in launched workers) where to log."""
    return {LOG_WITH_ENV: log_with, LOG_DIR_ENV: str(directory.resolve())}


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
