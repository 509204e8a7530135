"""The report kind: what an analysis found, as JSON data, a rendered Markdown page and PNG figures.

A report rule builds a `Report` and calls `write_report`: `report.json` holds the data (what `run --json`
prints), `report.md` the page (what `run` prints), and each figure is a PNG beside them, drawn with
matplotlib's Agg backend (no display needed). The digest covers all of them, unless the rule returns one: a
report holding measurements (times, memory: no two runs give the same) returns the digest of what is
reproducible in it, so its node's digest, the lock and `verify` compare that. A release is those files.
Every report the main recipe binds is built and printed by `run` (reports are cheap), exported or not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..ir.types import Kind, Type
from . import ArtifactError, ArtifactKind, Problem, register

REPORT = Kind.register("Report")
DATA_FILE, PAGE_FILE = "report.json", "report.md"


@register
class ReportKind(ArtifactKind):
    kind = REPORT
    noun = "a report"
    formats = ("report",)
    root_when_bound = True

    @classmethod
    def describe(cls, type_: Type) -> str:
        return f"{type_} · printed by `run`"

    @classmethod
    def digest(cls, path: Path, built: str | None = None) -> str:
        """`built`, when the rule returned the digest of its reproducible data; else that of every file."""
        return built if built is not None else super().digest(path)

    @classmethod
    def read(cls, path: Path) -> dict:
        """The report's data."""
        try:
            return json.loads((path / DATA_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ArtifactError([Problem("E505", f"cannot read {path / DATA_FILE}: {err}")]) from None


@dataclass
class Table:
    """A table of the page: a header row and rows of cells already formatted."""

    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "|".join(" --- " for _ in self.header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in self.rows])


@dataclass
class Report:
    title: str
    data: dict[str, Any]
    tables: list[Table] = field(default_factory=list)
    figures: dict[str, Callable[[Any], None]] = field(default_factory=dict)  # file stem -> draw(axes)
    sections: list[str] = field(default_factory=list)  # Markdown blocks after the tables (notes, samples)

    def page(self) -> str:
        parts = [f"# {self.title}"] + [t.markdown() for t in self.tables] + self.sections
        parts += [f"![{name}]({name}.png)" for name in self.figures]
        return "\n\n".join(parts) + "\n"


def cell_text(text: str, limit: int | None = None) -> str:
    """Free text (an answer) as one Markdown table cell or list item: on one line, `|` escaped, cut to
    `limit` characters with an ellipsis."""
    flat = " ".join(text.split())
    if limit is not None and len(flat) > limit:
        flat = flat[:limit].rstrip() + "…"
    return flat.replace("|", "\\|")


def bar_chart(labels: list[str], values: list[float | None], ylabel: str) -> Callable[[Any], None]:
    """A figure drawer: one bar per label (a missing value draws none), its value written above it."""
    def draw(axes) -> None:
        positions = range(len(labels))
        heights = [v if v is not None else 0.0 for v in values]
        bars = axes.bar(positions, heights, color="#4C72B0")
        for bar, value in zip(bars, values):
            if value is not None:
                axes.annotate(f"{value:.4g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              ha="center", va="bottom", fontsize=8)
        axes.set_xticks(list(positions), labels, rotation=20 if len(labels) > 4 else 0)
        axes.set_ylabel(ylabel)
        axes.grid(axis="y", alpha=0.3)
    return draw


def line_chart(series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str) -> Callable[[Any], None]:
    """A figure drawer: one line per named (x, y) series, with a legend."""
    def draw(axes) -> None:
        from matplotlib.ticker import MaxNLocator

        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        for name, (xs, ys) in series.items():
            axes.plot(xs, ys, linewidth=1.2, label=name)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend()
    return draw


def write_report(report: Report, out: Path) -> None:
    """Write a report's data, page and figures into `out`, deterministically."""
    (out / DATA_FILE).write_text(json.dumps(report.data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / PAGE_FILE).write_text(report.page(), encoding="utf-8")
    for name, draw in report.figures.items():
        _draw_png(draw, out / f"{name}.png")


def _draw_png(draw: Callable[[Any], None], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4), dpi=100)
    try:
        draw(axes)
        figure.tight_layout()
        # No timestamps or software version in the file, so the same report gives the same bytes.
        figure.savefig(dest, format="png", metadata={"Software": None})
    finally:
        pyplot.close(figure)


def page_of(path: Path) -> str:
    """The rendered page of a report directory."""
    return (path / PAGE_FILE).read_text(encoding="utf-8")
