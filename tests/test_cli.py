"""The CLI as a user meets it: plan, graph and fmt output against golden files, and the promises
that the light verbs make (no torch import, colour only when wanted, clean exit statuses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipec.cli import main
from helpers import run_cli

ROOT = Path(__file__).parents[1]
GOLDEN = Path(__file__).parent / "golden"


def run(args, capsys, cwd=ROOT):
    return run_cli(args, capsys, cwd)


def golden(path: Path, actual: str) -> None:
    if os.environ.get("RECIPEC_UPDATE_GOLDEN"):
        path.write_text(actual)
    assert actual == path.read_text()


@pytest.mark.parametrize("recipe", ["examples/quickstart.rcp", "recipes/zh_chat.rcp"])
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_plan_golden(recipe, fmt, capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    status, out, err = run(["plan", "--threads", "2", recipe] + (["--json"] if fmt == "json" else []), capsys)
    assert status == 0
    # zh_chat's three hub models are not in the (empty) hub cache: the text plan says how to fetch each.
    assert err.count("note[E408]") == (3 if "zh_chat" in recipe and fmt == "text" else 0)
    golden(GOLDEN / "plan" / f"{Path(recipe).stem}.{'json' if fmt == 'json' else 'txt'}", out)


def test_plan_json_matches_text(capsys):
    _, out, _ = run(["plan", "--json", "examples/quickstart.rcp"], capsys)
    data = json.loads(out)
    assert data["summary"] == {"build": 4, "cached": 0, "exports": 1,
                               "text": "Plan: 4 to build, 0 cached, 1 export."}
    assert [s["label"] for s in data["steps"]] == ["base", "chat", "cp", "model"]
    assert data["steps"][3]["cost"]["bytes_read"] == 3 * data["steps"][0]["signature"]["bytes"]


@pytest.mark.parametrize("fmt", ["dot", "mermaid"])
def test_graph_golden(fmt, capsys):
    status, out, _ = run(["graph", "--format", fmt, "examples/quickstart.rcp"], capsys)
    assert status == 0
    golden(GOLDEN / "plan" / f"quickstart.{fmt}", out)


def test_fmt_golden_and_idempotent(tmp_path, capsys):
    source = GOLDEN / "fmt" / "messy.rcp"
    status, once, _ = run(["fmt", "--stdout", str(source)], capsys)
    assert status == 0
    golden(GOLDEN / "fmt" / "messy.expected", once)
    again = tmp_path / "again.rcp"
    again.write_text(once)
    assert run(["fmt", "--check", str(again)], capsys)[0] == 0


def test_fmt_rewrites_in_place_and_check_reports(tmp_path, capsys):
    path = tmp_path / "r.rcp"
    path.write_text("recipec 1\nx=1\n")
    assert run(["fmt", "--check", str(path)], capsys)[0] == 1
    assert path.read_text() == "recipec 1\nx=1\n"
    assert run(["fmt", str(path)], capsys)[0] == 0
    assert path.read_text() == "recipec 1\nx = 1\n"


def test_fmt_keeps_a_linked_recipe_a_link_and_its_permissions(tmp_path, capsys):
    real = tmp_path / "shared" / "r.rcp"
    real.parent.mkdir()
    real.write_text("recipec 1\nx=1\n")
    real.chmod(0o600)
    link = tmp_path / "r.rcp"
    link.symlink_to(real)
    assert run(["fmt", str(link)], capsys)[0] == 0
    assert link.is_symlink() and real.read_text() == "recipec 1\nx = 1\n"
    assert real.stat().st_mode & 0o777 == 0o600


def test_output_cut_short_by_its_reader_is_not_an_error_report():
    # `recipec explain codes | head -1`: the reader goes away before recipec has written.
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "recipec", "explain", "codes"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    child.stdout.close()
    err = child.stderr.read()
    assert child.wait(timeout=60) == 141 and err == "", err


def test_shipped_recipes_are_formatted(capsys):
    for recipe in sorted(ROOT.glob("examples/*.rcp")) + sorted(ROOT.glob("recipes/*.rcp")):
        assert run(["fmt", "--check", str(recipe)], capsys)[0] == 0, recipe


@pytest.mark.parametrize("verb", [["check"], ["plan"], ["plan", "--json"], ["graph"], ["fmt", "--stdout"]])
def test_light_verbs_never_import_torch(verb):
    code = ("import sys, io, contextlib\nfrom recipec.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            f"    status = main({verb + ['examples/quickstart.rcp']!r})\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'accelerate'))\n"
            "print(status, heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0 []"
    explain = subprocess.run([sys.executable, "-c", code.replace(repr(verb + ['examples/quickstart.rcp']),
                                                                 "['explain', 'E301']")],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert explain.strip() == "0 []"


def test_colour_only_when_asked(capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    _, out, _ = run(["plan", "examples/quickstart.rcp"], capsys)
    assert "\x1b[" in out
    monkeypatch.setenv("NO_COLOR", "1")
    _, out, _ = run(["plan", "examples/quickstart.rcp"], capsys)
    assert "\x1b[" not in out


def test_version_and_missing_file(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("recipec ")
    status, _, err = run(["check", "does/not/exist.rcp"], capsys)
    assert status == 66 and "does/not/exist.rcp: No such file" in err and "Traceback" not in err


def test_explain_lists_ops(capsys):
    status, out, _ = run(["explain", "ops"], capsys)
    assert status == 0 and "combine:" in out and "init:" in out
    status, out, _ = run(["explain", "merge"], capsys)
    assert status == 0 and out.startswith("merge: ") and "density" in out and "init:" not in out
    status, out, err = run(["explain", "mrge"], capsys)
    assert status == 2 and out == "" and "did you mean `merge`?" in err


def test_a_run_with_everything_cached_never_imports_torch(tmp_path, capsys):
    import shutil

    shutil.copy(ROOT / "examples" / "quickstart.rcp", tmp_path / "quickstart.rcp")
    shutil.copytree(ROOT / "examples" / "tokenizers", tmp_path / "tokenizers")
    recipe = str(tmp_path / "quickstart.rcp")
    assert run(["run", recipe], capsys)[0] == 0  # builds (torch is used here)
    code = ("import sys, io, contextlib\nfrom recipec.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            f"    status = main(['run', {recipe!r}])\n"
            "print(status, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0 []"
