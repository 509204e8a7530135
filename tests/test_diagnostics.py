"""Every diagnostic class, end to end: a broken recipe in, the exact text and exit status out.

Golden files live beside the recipes in tests/golden/diagnostics (`NAME.rcp` -> `NAME.stderr`). Set
RECIPEC_UPDATE_GOLDEN=1 to rewrite them after an intended change, then read the diff.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest

from helpers import safetensors_bytes, tiny_llama, write_model
from recipec.arch import preset_config
from recipec.cli import main
from helpers import run_cli as run_in

GOLDEN = Path(__file__).parent / "golden" / "diagnostics"
CASES = sorted(p.stem for p in GOLDEN.glob("*.rcp"))


def _broken_models(models: Path) -> None:
    truncated = tiny_llama(models / "truncated") / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (tiny_llama(models / "badjson") / "model.safetensors").write_bytes(struct.pack("<Q", 8) + b"{not json")
    overlap = safetensors_bytes({"a": ("F32", (4,)), "b": ("F32", (4,))})
    (tiny_llama(models / "overlap") / "model.safetensors").write_bytes(
        overlap.replace(b'"data_offsets":[16,32]', b'"data_offsets":[8, 24]'))
    evil = tiny_llama(models / "evil")
    (evil / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../../../etc/passwd"}}))
    (tiny_llama(models / "badconfig") / "config.json").write_text("{\"model_type\": ")
    stringvocab = tiny_llama(models / "stringvocab") / "config.json"
    stringvocab.write_text(json.dumps(json.loads(stringvocab.read_text()) | {"vocab_size": "1000"}))
    split = write_model(models / "split", preset_config("llama", "tiny"), shards=2)
    index = json.loads((split / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    (split / "model.safetensors.index.json").write_text(json.dumps(index))
    withcode = tiny_llama(models / "withcode")
    code_reference = {"auto_map": {"AutoModel": "m.M"}}
    (withcode / "config.json").write_text(json.dumps(preset_config("llama", "tiny") | code_reference))
    (tiny_llama(models / "linked") / "tokenizer.json").symlink_to(models.parent / "configs" / "llama_tiny.json")
    write_model(models / "fp8", preset_config("llama", "tiny"), dtype="F8_E4M3")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diagnostics")
    shutil.copytree(GOLDEN, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.stderr"))
    _broken_models(root / "models")
    (root / "data").mkdir()
    return root


def run_cli(args: list[str], cwd: Path, capsys) -> tuple[int, str, str]:
    status, out, err = run_in(args, capsys, cwd)
    return status, out.replace(str(cwd), "<tmp>"), err.replace(str(cwd), "<tmp>")


@pytest.mark.parametrize("case", CASES)
def test_golden_diagnostics(case, workspace, capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    status, _, err = run_cli(["check", f"{case}.rcp"], workspace, capsys)
    actual = f"exit status: {status}\n{err}"
    golden = GOLDEN / f"{case}.stderr"
    if os.environ.get("RECIPEC_UPDATE_GOLDEN"):
        golden.write_text(actual)
    assert actual == golden.read_text()
    assert "Traceback" not in err


def test_every_check_error_code_has_a_golden_case():
    from recipec.codes import CODES

    seen = set()
    for golden in GOLDEN.glob("*.stderr"):
        seen.update(re.findall(r"(?:error|warning|note)\[(E\d{3})\]", golden.read_text()))
    check_phase = {code for code in CODES if code[1] in "01234"}  # E5xx happen at run time: see test_run.py
    assert check_phase - seen == set()


def test_json_diagnostics_carry_ranges(workspace, capsys):
    status, out, err = run_cli(["check", "--json", "unknown_name.rcp"], workspace, capsys)
    assert status == 65 and err == ""
    data = json.loads(out)
    assert data["format_version"] == 1
    (d,) = data["diagnostics"]
    assert d["code"] == "E101" and d["severity"] == "error"
    assert d["range"]["start"] == {"line": 4, "column": 9, "byte": d["range"]["start"]["byte"]}
    assert d["range"]["end"]["column"] - d["range"]["start"]["column"] == len("bsae")
    assert d["snippet"] == "model = bsae + 0.5*(chat - base)"
    assert d["hint"] == "did you mean `base`?"


def test_explain_every_code(capsys):
    from recipec.codes import CODES

    for code in CODES:
        assert main(["explain", code.lower()]) == 0
        assert capsys.readouterr().out.startswith(f"{code}: ")
    assert main(["explain", "E999"]) == 2
