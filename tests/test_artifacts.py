"""Artifact kinds as data: open kinds, each kind's digest and release, reports built and printed by `run`
without a model export, and exports refused for kinds that cannot be released."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_cli, write_model
from recipec import arch
from recipec.artifacts import Artifact, ArtifactError, ReleaseInfo, artifact_kind
from recipec.artifacts.onnx import ONNX_MODEL
from recipec.artifacts.report import REPORT, Report, Table, write_report
from recipec.artifacts.tokenizer import TOKENIZER
from recipec.ir.types import Kind

SRC = Path(__file__).resolve().parents[1] / "src"
INFO = ReleaseInfo("r.rcp", "recipec 1\n", "sha256:lock")


run = run_cli


def test_kinds_are_open_and_interned():
    tally = Kind.register("Widget")
    assert Kind.register("Widget") is tally and Kind("Widget") is tally
    assert copy.deepcopy(Kind.MODEL) is Kind.MODEL and Kind("Model") is Kind.MODEL
    assert Kind.MODEL == "Model" and Kind.MODEL.value == "Model" and str(Kind.CORPUS) == "Corpus"
    with pytest.raises(ValueError):
        Kind("NoSuchKind")


def test_onnx_kind_digests_graph_and_external_data(tmp_path):
    kind = artifact_kind(ONNX_MODEL)
    with pytest.raises(ArtifactError):
        kind.read(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "model.onnx.data").write_bytes(b"weights")
    first = kind.digest(tmp_path)
    (tmp_path / "model.onnx.data").write_bytes(b"weightz")
    assert kind.digest(tmp_path) != first
    files = kind.release_files(Artifact(ONNX_MODEL, tmp_path, first), INFO, "onnx")
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"] and kind.formats == ("onnx",)


def test_tokenizer_kind_covers_only_tokenizer_files(tmp_path):
    kind = artifact_kind(TOKENIZER)
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("not part of it")
    first = kind.digest(tmp_path)
    (tmp_path / "notes.txt").write_text("changed")
    assert kind.digest(tmp_path) == first
    assert [p.name for p in kind.read(tmp_path)] == ["tokenizer.json"]


def test_report_figures_are_deterministic_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    report = Report("T", {"x": [1, 2]}, [Table(["a", "b"], [["1", "2"]])],
                    {"curve": lambda axes: axes.plot([0, 1, 2], [1, 4, 9])})
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        write_report(report, tmp_path / name)
    png = (tmp_path / "one/curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and png == (tmp_path / "two/curve.png").read_bytes()
    assert "![curve](curve.png)" in (tmp_path / "one/report.md").read_text()
    kind = artifact_kind(REPORT)
    assert kind.digest(tmp_path / "one") == kind.digest(tmp_path / "two")
    files = kind.release_files(Artifact(REPORT, tmp_path / "one", ""), INFO, "report")
    assert [f.name for f in files] == ["curve.png", "report.json", "report.md"]


def _models(root: Path) -> None:
    config = arch.preset_config("llama", "tiny")
    write_model(root / "zeros", config)  # all +0.0
    write_model(root / "half", config, dtype="BF16")
    # -0.0 everywhere counts as zero: only the sign bit is set
    neg = root / "neg"
    write_model(neg, config)
    data = bytearray((neg / "model.safetensors").read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = b"\x00\x00\x00\x80" * ((len(data) - start) // 4)
    (neg / "model.safetensors").write_bytes(bytes(data))
    ones = root / "ones"
    write_model(ones, config)
    data = bytearray((ones / "model.safetensors").read_bytes())
    data[start:] = b"\x00\x00\x80\x3f" * ((len(data) - start) // 4)  # 1.0
    (ones / "model.safetensors").write_bytes(bytes(data))


def test_stats_report_is_built_printed_and_exported_without_a_model_export(tmp_path, capsys):
    _models(tmp_path)
    recipe = tmp_path / "r.rcp"
    recipe.write_text('recipec 1\ns = stats(load("ones"), load("half"), load("neg"))\nexport s to "out/stats"\n'
                      'alone = stats(load("zeros"))\n')
    status, out, err = run(["check", str(recipe)], capsys)
    assert status == 0 and "E105" not in err  # a bound report is used: `run` shows it
    status, out, _ = run(["plan", str(recipe)], capsys)
    assert out.count("stats → Report · printed by `run`") == 2
    status, out, err = run(["run", str(recipe)], capsys)
    assert status == 0, err
    assert "| parameters | 205,120 | 205,120 (1.00×) | 205,120 (1.00×) |" in out
    assert "| bytes | 820,480 | 410,240 (0.50×) | 820,480 (1.00×) |" in out
    assert "| non-zero parameters | 205,120 | 0 (0.00×) | 0 (0.00×) |" in out
    assert out.count("# Model statistics") == 2  # the exported report and the one only bound
    release = tmp_path / "out/stats"
    assert sorted(os.listdir(release)) == [".recipec-release", "SHA256SUMS", "measured.json", "report.json",
                                           "report.md"]
    data = json.loads((release / "report.json").read_text())
    assert [m["dtypes"] for m in data["models"]][1] == {"BF16": {"params": 205120, "bytes": 410240}}
    assert data["models"][0]["layers"] == 2 and data["models"][0]["tensors"] == 21

    status, out, _ = run(["run", "--json", str(recipe)], capsys)
    doc = json.loads(out)
    assert doc["built"] == 0 and doc["reports"]["alone"]["models"][0]["nonzero"] == 0

    # A fully cached report run imports no torch.
    code = ("import sys, io, contextlib\nfrom recipec.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            f"    status = main(['run', {str(recipe)!r}])\n"
            "print(status, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "0 []"


def test_exporting_what_cannot_be_released_says_what_can(tmp_path, capsys):
    _models(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    recipe = tmp_path / "r.rcp"
    recipe.write_text('recipec 1\nc = text("d.jsonl")\nexport c to "out/c"\n'
                      'export stats(load("ones")) to "out/s" as hf\n')
    status, _, err = run(["check", str(recipe)], capsys)
    assert status == 65
    assert "r.rcp:3:8: error[E305]: cannot export a corpus: it is not a result that can be released" in err
    assert "export takes " in err and "Model (hf)" in err and "Report (report)" in err
    assert "error[E305]: export format `hf` is not supported for a report" in err
