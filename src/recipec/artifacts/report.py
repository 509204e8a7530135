"""The report kind: what an analysis found, as JSON data, a rendered Markdown page and PNG figures.

A report rule builds a `Report` and calls `write_report`: `report.json` holds the data (what `run --json`
prints), `report.md` the page (what `run` prints), and each figure is a PNG beside them, drawn with
matplotlib's Agg backend (no display needed). A release is those files. Every report the main recipe binds
is built and printed by `run` (reports are cheap), exported or not.

Measurements (times, memory: no two runs give the same) are marked by the rule where it makes them: the
paths of measured values in the data (`Report.measured`), the table cells that show one (`Measured` text)
and the figures drawn from them (`Report.measured_figures`). `write_report` then writes `measured.json`, which
says what is measured where; it is reproducible itself. The reproducible part of a file holding measurements
is the file with its measured values masked (`reproducible_views`): the digest covers that (or the digest
the rule returns), and the lock, `run --locked` and `verify` compare it byte for byte, while the measured
values are only checked to be there and well formed.

A report whose data holds `models`, a list of objects each with the `label` of the model it is about, shows
them in that order as the columns (after the first, the row titles) of its first table, the first model the
reference. The model card of an exported model then holds its column beside the reference's
(`card_section`), less any row with a measured cell, so that the card stays reproducible.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..ir.types import Kind, Type
from ..store.filehash import content_file_hash, content_hash
from . import ArtifactError, ArtifactKind, Problem, files_digest, register

REPORT = Kind.register("Report")
DATA_FILE, PAGE_FILE, MEASURED_FILE = "report.json", "report.md", "measured.json"
MASK = "<measured>"  # what a measured value becomes in a file's reproducible part
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
        """`built`, when the rule returned one; else that of every file, measured ones by their reproducible part."""
        if built is not None:
            return built
        views = cls.reproducible_views(path)
        return files_digest({p.name: content_hash(views[p.name]) if p.name in views else content_file_hash(p)
                             for p in cls.content_files(path)})

    @classmethod
    def reproducible_views(cls, path: Path) -> dict[str, bytes]:
        """Each file holding measurements, as its reproducible part; ArtifactError when one is malformed."""
        try:
            manifest = _manifest(path)
        except (OSError, ValueError) as err:
            raise ArtifactError([Problem("E536", f"{path / MEASURED_FILE} is malformed: {err}")]) from None
        if manifest is None:
            return {}
        views, name = {}, DATA_FILE
        try:
            if manifest["data"]:
                views[DATA_FILE] = _masked_data((path / DATA_FILE).read_bytes(), manifest["data"])
            if manifest["cells"]:
                name = PAGE_FILE
                views[PAGE_FILE] = _masked_page((path / PAGE_FILE).read_bytes(), manifest["cells"])
            for name in manifest["figures"]:
                views[name] = _checked_png(path / name)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
            raise ArtifactError([Problem("E536", f"{path / name}: its measured values are malformed: {err}",
                                         "export the report again")]) from None
        return views

    @classmethod
    def card_section(cls, path: Path, model_label: str, report_label: str) -> str | None:
        """The model's column of the first table beside the reference's, less rows with a measured cell."""
        data = cls.read(path)
        models = data.get("models")
        labels = [m.get("label") for m in models if isinstance(m, dict)] if isinstance(models, list) else []
        if model_label not in labels:
            return None
        lines = (path / PAGE_FILE).read_text(encoding="utf-8").split("\n")
        manifest = _manifest(path)
        measured = {row for table, row, _ in (manifest["cells"] if manifest else []) if table == 0}
        columns = sorted({0, 1, labels.index(model_label) + 1})
        block = _tables(lines)[0]
        rows = [block[0]] + [line for k, line in enumerate(block[2:]) if k not in measured]
        table = [[_CELL_SEPARATOR.split(lines[number])[1:-1][c].strip() for c in columns] for number in rows]
        intro = (f"From the recipe's report `{report_label}`: this model (`{model_label}`) beside the first "
                 "model it evaluates, the reference.")
        title = lines[0].removeprefix("# ")
        return "\n".join([f"## {title}: `{report_label}`", "", intro, "", Table(table[0], table[1:]).markdown(), ""])

    @classmethod
    def measured_what(cls, path: Path) -> str | None:
        """What a report's measurements are, in words ("times and memory"); None when nothing is measured."""
        manifest = _manifest(path)
        return manifest["what"] if manifest else None

    @classmethod
    def read(cls, path: Path) -> dict:
        """The report's data."""
        try:
            return json.loads((path / DATA_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ArtifactError([Problem("E505", f"cannot read {path / DATA_FILE}: {err}")]) from None


def _manifest(path: Path) -> dict | None:
    file = path / MEASURED_FILE
    if not file.is_file():
        return None
    manifest = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or set(manifest) != {"what", "data", "cells", "figures"}:
        raise ValueError("it does not say what is measured where")
    return manifest


def _masked_data(raw: bytes, paths: list[str]) -> bytes:
    """report.json with the values at `paths` masked; ValueError where a path holds no value."""
    data = json.loads(raw.decode("utf-8"))
    for path in paths:
        _mask_path(data, path.split("."), path)
    return _json_text(data).encode("utf-8")


def _mask_path(value: Any, parts: list[str], path: str) -> None:
    head, rest = parts[0], parts[1:]
    if head == "*" and rest:  # every element of a list
        if not isinstance(value, list):
            raise ValueError(f"`{path}`: not a list where `*` is")
        for item in value:
            _mask_path(item, rest, path)
        return
    if not isinstance(value, dict) or head not in value:
        raise ValueError(f"no value at `{path}`")
    if rest:
        _mask_path(value[head], rest, path)
    else:
        value[head] = MASK


_CELL_SEPARATOR = re.compile(r"(?<!\\)\|")


def _tables(lines: list[str]) -> list[list[int]]:
    """Line numbers of each Markdown table of a page (its header, separator, then body rows)."""
    tables, run = [], []
    for number, line in enumerate(lines + [""]):
        if line.startswith("|"):
            run.append(number)
        elif run:
            tables.append(run)
            run = []
    return tables


def _masked_page(raw: bytes, cells: list[list[int]]) -> bytes:
    """report.md with the measured table cells ([table, row, column], body rows) masked."""
    lines = raw.decode("utf-8").split("\n")
    tables = _tables(lines)
    for table, row, column in cells:
        number = tables[table][2 + row]  # after the header and its separator
        parts = _CELL_SEPARATOR.split(lines[number])
        if not 0 <= column < len(parts) - 2:
            raise ValueError(f"table {table + 1}, row {row + 1} has no column {column + 1}")
        parts[column + 1] = f" {MASK} "
        lines[number] = "|".join(parts)
    return "\n".join(lines).encode("utf-8")


def _checked_png(path: Path) -> bytes:
    """A figure drawn from measurements has no reproducible part: it must only be a PNG."""
    with open(path, "rb") as f:
        if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            raise ValueError("not a PNG image")
    return PNG_SIGNATURE


class Measured(str):
    """A table cell's text that shows a measurement (a time, a memory size): it differs from run to run."""


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
    measured: tuple[str, ...] = ()  # paths of measured values in `data`: "measurement", "models.*.measured"
    measured_figures: tuple[str, ...] = ()  # figures drawn from measured values
    measured_what: str = "measured values"  # what they are, in words: "times and memory"

    def measured_cells(self) -> list[list[int]]:
        """[table, row, column] of every `Measured` cell (rows of the table's body)."""
        return [[t, r, c] for t, table in enumerate(self.tables) for r, row in enumerate(table.rows)
                for c, cell in enumerate(row) if isinstance(cell, Measured)]

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
    """Write a report's data, page and figures into `out`, deterministically, and `measured.json` when
    anything in them is measured."""
    (out / DATA_FILE).write_text(_json_text(report.data), encoding="utf-8")
    (out / PAGE_FILE).write_text(report.page(), encoding="utf-8")
    for name, draw in report.figures.items():
        _draw_png(draw, out / f"{name}.png")
    manifest = {"what": report.measured_what, "data": sorted(report.measured), "cells": report.measured_cells(),
                "figures": sorted(f"{name}.png" for name in report.measured_figures)}
    if manifest["data"] or manifest["cells"] or manifest["figures"]:
        (out / MEASURED_FILE).write_text(_json_text(manifest), encoding="utf-8")
        ReportKind.reproducible_views(out)  # every mark holds: a path with no value is the rule's bug


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


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
