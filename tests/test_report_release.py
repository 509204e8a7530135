"""Releases of reports that hold measurements: the measured values (a `stats` report's times and memory)
are marked where the rule makes them, kept apart by masking, and only checked to be present and well
formed; every other byte of the report is compared by the lock, `run --locked` and `verify`."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import run_cli

from recipec.artifacts import ArtifactError
from recipec.artifacts.report import MEASURED_FILE, Measured, Report, ReportKind, Table, write_report
from recipec.cli import main
from recipec.store.lockfile import read_lock

FAST = "seq_len=8, repeats=1, decode_tokens=2"


def _report(seconds: float, params: int) -> Report:
    data = {"models": [{"params": params, "measured": {"seconds": seconds}}], "measurement": {"cpu": "x"}}
    table = Table(["", "model"], [["parameters", f"{params:,}"], ["latency", Measured(f"{seconds * 1000:.3g} ms")]])
    return Report("R", data, [table], measured=("measurement", "models.*.measured"), measured_what="times")


def test_measured_values_are_masked_and_nothing_else(tmp_path):
    for name, seconds, params in (("a", 0.5, 10), ("b", 0.25, 10), ("c", 0.5, 11)):
        (tmp_path / name).mkdir()
        write_report(_report(seconds, params), tmp_path / name)
    manifest = json.loads((tmp_path / "a" / MEASURED_FILE).read_text())
    assert manifest == {"what": "times", "data": ["measurement", "models.*.measured"], "cells": [[0, 1, 1]],
                        "figures": []}
    views = {name: ReportKind.reproducible_views(tmp_path / name) for name in "abc"}
    assert views["a"] == views["b"]  # other times, same reproducible part
    assert views["a"]["report.json"] != views["c"]["report.json"]  # another parameter count
    assert views["a"]["report.md"] != views["c"]["report.md"]
    assert b"ms" not in views["a"]["report.md"] and b"| parameters | 10 |" in views["a"]["report.md"]
    digests = {name: ReportKind.digest(tmp_path / name) for name in "abc"}
    assert digests["a"] == digests["b"] != digests["c"]


def test_a_report_without_measurements_has_no_manifest(tmp_path):
    write_report(Report("R", {"x": 1}, [Table(["a"], [["1"]])]), tmp_path)
    assert not (tmp_path / MEASURED_FILE).exists() and ReportKind.reproducible_views(tmp_path) == {}


def test_malformed_measured_values_are_named(tmp_path):
    write_report(_report(0.5, 10), tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    del data["measurement"]
    (tmp_path / "report.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="no value at `measurement`"):
        ReportKind.reproducible_views(tmp_path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A recipe whose `stats` report is exported, run once and locked."""
    root = tmp_path_factory.mktemp("stats_release")
    (root / "r.rcp").write_text(f'recipec 1\nm = init("llama", size="tiny", seed=1)\ns = stats(m, {FAST})\n'
                                'export s to "out/stats"\n')
    return root


def _run(args: list, capsys, root: Path) -> tuple[int, str, str]:
    return run_cli(args + [root / "r.rcp"], capsys, cwd=root)


def _rewrite(release: Path, name: str, edit) -> None:
    """Edit a release file, and its line of SHA256SUMS with it (as a careful forger would)."""
    path = release / name
    path.chmod(0o644)
    path.write_text(edit(path.read_text()))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    sums = release / "SHA256SUMS"
    sums.write_text("".join(f"{digest}  {name}\n" if line.endswith(f"  {name}\n") else line
                            for line in sums.read_text().splitlines(keepends=True)))


def test_verify_compares_all_but_the_measured_times(exported, capsys):
    status, _, err = _run(["run"], capsys, exported)
    assert status == 0, err
    release = exported / "out" / "stats"
    assert (release / MEASURED_FILE).is_file()
    locked = {f["name"]: f for f in read_lock(exported / "r.rcp.lock")["outputs"]["out/stats"]["files"]}
    assert {n for n, f in locked.items() if "reproducible" in f} == {"report.json", "report.md", "SHA256SUMS"}

    status, _, err = _run(["verify"], capsys, exported)  # a rebuild measures other times
    assert status == 0, err
    assert "measured, not compared: out/stats: the times and memory in report.json, report.md" in err

    fresh = ["--cache", exported / "fresh-cache"]  # built again: other times, the same reproducible part
    status, _, err = _run(["run", "--locked", *fresh], capsys, exported)
    assert status == 0, err


@pytest.mark.parametrize("name, edit", [
    ("report.json", lambda text: text.replace('"tensors": ', '"tensors": 1', 1)),
    ("report.md", lambda text: text.replace("| tensors | ", "| tensors | 1", 1)),
])
def test_verify_fails_on_a_reproducible_number(exported, capsys, name, edit):
    assert _run(["run"], capsys, exported)[0] == 0
    _rewrite(exported / "out" / "stats", name, edit)
    status, _, err = _run(["verify"], capsys, exported)
    assert status != 0 and f"error[E507]: out/stats: {name} differs besides its measured values" in err, err


def test_verify_fails_on_measured_values_the_release_does_not_list(exported, capsys):
    assert _run(["run"], capsys, exported)[0] == 0
    page = exported / "out" / "stats" / "report.md"
    page.chmod(0o644)
    page.write_text(page.read_text().replace(" ms", " s"))  # a time edited, SHA256SUMS left as it was
    status, _, err = _run(["verify"], capsys, exported)
    assert status != 0 and "SHA256SUMS does not list report.md as it is" in err, err


# --------------------------------------------------------------------------------------- eval in releases

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EVAL_RECIPE = """recipec 1
base   = init("llama", size="tiny", seed=1, tokenizer="tokenizers/llama-chat")
chat   = sft(base, chat("data/tiny_chat.jsonl"), epochs=1, seq_len=32, batch=4, lr=3e-3, warmup=1)
pruned = prune(chat, heads=0.5)
e = eval(base, pruned, corpus=text("data/tiny_corpus.jsonl"))
export pruned to "out/pruned"
export e to "out/eval"
"""


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    """A trained, then pruned model, evaluated beside its base and exported with the report."""
    root = tmp_path_factory.mktemp("eval_release")
    shutil.copytree(EXAMPLES / "tokenizers" / "llama-chat", root / "tokenizers" / "llama-chat")
    shutil.copytree(EXAMPLES / "data", root / "data")
    (root / "r.rcp").write_text(EVAL_RECIPE)
    with pytest.MonkeyPatch.context() as env:  # a module fixture runs before the per-test isolation
        env.setenv("RECIPEC_CACHE", str(root / "cache"))
        env.setenv("HF_HUB_OFFLINE", "1")
        status = main(["run", str(root / "r.rcp")])
    assert status == 0
    return root


def test_the_model_card_holds_its_column_of_the_eval(evaluated):
    card = (evaluated / "out" / "pruned" / "README.md").read_text()
    page = (evaluated / "out" / "eval" / "report.md").read_text()
    assert "## Evaluation: `e`" in card and "| | base (reference) | pruned |" in card.replace("|  |", "| |")
    perplexity = next(line for line in page.splitlines() if line.startswith("| perplexity |"))
    assert perplexity in card  # two models: the card's column pair is the whole table
    assert card.index("lock digest") < card.index("## Evaluation")


def test_the_training_curve_of_a_node_upstream_is_drawn(evaluated):
    data = json.loads((evaluated / "out" / "eval" / "report.json").read_text())
    assert list(data["training"]) == ["chat"]  # pruned was not trained itself; the sft before it was
    assert [m["trained"] for m in data["models"]] == [None, None]
    assert len(data["training"]["chat"]) >= 2 and all("loss" in r for r in data["training"]["chat"])
    assert (evaluated / "out" / "eval" / "training_loss.png").is_file()
