"""Diagnostics a new user meets (issue 6, items 8, 9 and 11): each test is a recipe or a command line a
user would write, and the exact thing recipec must say back. Exact texts of check-time diagnostics
are golden cases in tests/golden/diagnostics; these tests cover what goldens cannot (run, plan, fmt,
argument parsing, ordering)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli, tiny_llama, write_model
from recipec.arch import preset_config
from recipec.cli import main


run = run_cli


def recipe(tmp_path: Path, text: str, name: str = "r.rcp") -> Path:
    path = tmp_path / name
    path.write_text("recipec 1\n" + text)
    return path


# --- item 8: a mistyped local path is caught, hub ids keep working ------------------------------------


def test_a_mistyped_local_path_is_an_error_with_the_nearest_directory(tmp_path, capsys):
    tiny_llama(tmp_path / "out" / "m3")
    r = recipe(tmp_path, 'f = "out/m33"\nexport f to "release/f"\n')
    status, _, err = run(["check", str(r)], capsys)
    assert status == 66
    assert "error[E401]: no model directory 'out/m33'" in err and "did you mean 'out/m3'?" in err
    status, _, err = run(["plan", str(r)], capsys)
    assert status == 66 and "unknown" not in err


def test_a_mistyped_first_folder_reads_as_a_hub_id_with_a_warning_naming_the_local_one(tmp_path, capsys):
    tiny_llama(tmp_path / "models" / "qs")
    r = recipe(tmp_path, 'f = "mdoels/qs"\ng = hf("mdoels/qs2")\nexport f to "out/f"\nexport g to "out/g"\n')
    status, _, err = run(["check", str(r)], capsys)
    assert status == 0 and err.count("warning[E408]") == 1 and err.count("note[E408]") == 1, err
    assert "r.rcp:2:5: warning[E408]" in err and "did you mean the local directory 'models/qs'?" in err, err


def test_explicitly_relative_and_absolute_paths_are_never_hub_ids(tmp_path, capsys):
    r = recipe(tmp_path, 'a = "./base"\nb = "/no/such/model"\nexport 0.5*a + 0.5*b to "out/m"\n')
    status, _, err = run(["check", str(r)], capsys)
    assert status == 66 and err.count("error[E401]") == 2 and "hub" not in err


def test_hub_ids_still_work_as_strings_and_through_hf(tmp_path, capsys):
    r = recipe(tmp_path, 'a = "org/name"\nb = hf("org/other", revision="v2")\nexport 0.5*a + 0.5*b to "out/m"\n')
    status, out, err = run(["check", "--json", str(r)], capsys)
    data = json.loads(out)
    assert status == 0 and data["ok"] and [d["code"] for d in data["diagnostics"]] == ["E408", "E408"]


# --- item 9: hub models not in the local cache ------------------------------------------------------------


def test_check_and_plan_say_how_to_fetch_each_uncached_hub_model(tmp_path, capsys):
    r = recipe(tmp_path, 'a = hf("org/one", revision="v1")\nb = hf("org/two")\nexport 0.5*a + 0.5*b to "out/m"\n')
    for verb in ("check", "plan"):
        status, _, err = run([verb, str(r)], capsys)
        assert status == 0
        assert f"`recipec lock {r}` while online, or `hf download org/one --revision v1`" in err
        assert "`hf download org/two`" in err


def test_plan_json_says_unknown_instead_of_zero_and_keeps_full_descriptions(tmp_path, capsys):
    long_id = "org/" + "x" * 90
    r = recipe(tmp_path, f'a = hf("{long_id}")\nb = hf("org/two")\nm = 0.5*a + 0.5*b\nexport m to "out/m"\n')
    status, out, _ = run(["plan", "--json", str(r)], capsys)
    data = json.loads(out)
    assert status == 0
    steps = {s["label"]: s for s in data["steps"]}
    assert steps["a"]["description"] == f'hf("{long_id}")'
    assert steps["m"]["unknown"] is True and steps["m"]["cost"] is None
    assert data["totals"]["unknown"] is True and data["totals"]["bytes_written"] is None


@pytest.mark.parametrize("switch", ["--offline", "HF_HUB_OFFLINE"])
def test_run_reports_every_missing_hub_model_at_once_with_one_hint(tmp_path, capsys, monkeypatch, switch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if switch == "HF_HUB_OFFLINE" else "0")
    r = recipe(tmp_path, 'a = hf("org/one")\nb = hf("org/two", revision="v2")\nexport 0.5*a + 0.5*b to "out/m"\n')
    status, _, err = run(["run", str(r)] + (["--offline"] if switch == "--offline" else []), capsys)
    assert status == 66
    assert "error[E501]: hub model org/one@main is not in the local Hugging Face cache" in err
    assert "error[E501]: hub model org/two@v2 is not in the local Hugging Face cache" in err
    assert f"`recipec lock {r}` while online, or `hf download org/two --revision v2`" in err
    assert "huggingface_hub" not in err and "LocalEntryNotFound" not in err


# --- item 11: calls, ordering, options ----------------------------------------------------------------------


def test_diagnostics_come_in_text_order_whatever_order_they_were_found(tmp_path, capsys):
    # Evaluating `m` reaches `a` (line 4) before `b` (line 3).
    r = recipe(tmp_path, 'm = 0.5*a + 0.5*b\nb = load("missing_b")\na = load("missing_a")\nexport m to "out/m"\n')
    _, _, err = run(["check", str(r)], capsys)
    assert err.index("r.rcp:3:") < err.index("r.rcp:4:")
    _, out, _ = run(["check", "--json", str(r)], capsys)
    lines = [d["range"]["start"]["line"] for d in json.loads(out)["diagnostics"]]
    assert lines == sorted(lines) == [3, 4]


def test_a_model_directory_missing_several_files_is_reported_once_for_all(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    sharded = write_model(tmp_path / "sharded", preset_config("llama", "tiny"), shards=3)
    for shard in ("model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        (sharded / shard).unlink()
    r = recipe(tmp_path, 'a = load("empty")\nb = load("sharded")\nexport 0.5*a + 0.5*b to "out/m"\n')
    _, _, err = run(["check", str(r)], capsys)
    assert "has neither config.json nor safetensors weights" in err
    assert "lists 2 shards (model-00001-of-00003.safetensors, model-00003-of-00003.safetensors)" in err


@pytest.mark.parametrize("value", ["-3", "0", "many"])
def test_threads_must_be_a_positive_number(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--threads", value, str(tmp_path / "r.rcp")])
    assert exit_.value.code == 2
    assert f"--threads: must be a whole number of at least 1, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("code", ["E105", "E307"])
def test_explain_says_a_warning_keeps_the_exit_status(capsys, code):
    assert main(["explain", code]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "warning" in first and "65" not in first


def test_check_json_prints_one_document_for_a_clean_recipe(tmp_path, capsys):
    r = recipe(tmp_path, 'm = init("llama", size="tiny")\nexport m to "out/m"\n')
    status, out, err = run(["check", "--json", str(r)], capsys)
    assert status == 0 and err == ""
    assert json.loads(out) == {"format_version": 1, "ok": True, "diagnostics": [], "nodes": 1, "exports": 1}


def test_check_counts_with_plurals_right(tmp_path, capsys):
    r = recipe(tmp_path, 'm = init("llama", size="tiny")\nexport m to "out/m"\n')
    assert run(["check", str(r)], capsys)[2].endswith("ok (1 node, 1 export)\n")


def test_the_progress_bar_uses_binary_units_as_plan_does(tmp_path, monkeypatch):
    from recipec import cli
    from recipec.backends.job import Meter

    r = recipe(tmp_path, 'm = init("llama", size="tiny")\nexport m to "out/m"\n')
    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: True, raising=False)
    progress, show = cli._progress(cli.build_parser().parse_args(["run", str(r)]))
    meter = Meter("m", total=3 * 2**20, sink=show)
    meter(2**20)
    [task] = progress.tasks
    rendered = [str(c.render(task)) for c in progress.columns if hasattr(c, "render")]
    assert "1.0 MiB / 3.0 MiB" in rendered and not any("MB" in r for r in rendered)
    assert task.description == "building m"


def test_graph_labels_say_what_each_node_does(capsys):
    status, out, _ = run(["graph", "examples/merge_methods.rcp"], capsys, cwd=Path(__file__).parents[1])
    assert status == 0
    assert '%5\\nmerge method=\\"ties\\" density=0.3 normalize=true\\n' in out  # unnamed, yet it says what it does


def test_recipes_that_are_not_utf8_are_refused_at_check_and_by_fmt(tmp_path, capsys):
    utf16 = tmp_path / "u16.rcp"
    utf16.write_bytes('recipec 1\nexport init("llama", size="tiny") to "out/m"\n'.encode("utf-16"))
    latin = tmp_path / "latin.rcp"
    latin.write_bytes('recipec 1\n# café\nexport init("llama", size="tiny") to "out/m"\n'.encode("latin-1"))
    for verb in (["check"], ["fmt"], ["run"]):
        status, _, err = run(verb + [str(utf16)], capsys)
        assert status == 65 and "error[E108]: this file is UTF-16; recipes are UTF-8 text" in err
        status, _, err = run(verb + [str(latin)], capsys)
        assert status == 65 and "latin.rcp:2:6: error[E108]: byte 0xe9 is not UTF-8" in err
    assert not (tmp_path / "out").exists()


def test_an_out_of_range_folded_coefficient_says_where_it_came_from(tmp_path, capsys):
    tiny_llama(tmp_path / "a")
    tiny_llama(tmp_path / "b")
    steps = "".join(f"v{i} = 0.5*v{i - 1} + 0.5*b\n" for i in range(1, 1001))
    r = recipe(tmp_path, f'b = "b"\nv0 = load("a")\n{steps}export v1000 to "out/v"\n')
    status, _, err = run(["check", str(r)], capsys)
    assert status == 65
    assert "error[E302]: folding this expression gives `v0` the coefficient 7.47e-301, out of range" in err
    assert "coefficients multiply through nested arithmetic" in err


def test_use_of_something_that_is_not_a_recipe_never_quotes_it(tmp_path, capsys):
    (tmp_path / "models").mkdir()
    (tmp_path / "secrets.rcp").write_text("root:x:0:0:root:/root:/bin/bash\n")
    r = recipe(tmp_path, 'use "models"\nuse "secrets.rcp"\nuse "/etc/passwd"\n')
    status, _, err = run(["check", str(r)], capsys)
    assert status == 65 and err.count("error[E109]") == 3
    assert "it is a directory, not a recipe" in err
    assert "root:" not in err


def test_config_fields_the_signature_reads_are_validated(tmp_path, capsys):
    model = tiny_llama(tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    for field, value in (("vocab_size", "1024"), ("num_hidden_layers", 2.0), ("hidden_size", True)):
        (model / "config.json").write_text(json.dumps(config | {field: value}))
        r = recipe(tmp_path, 'export load("m") to "out/m"\n')
        status, _, err = run(["check", str(r)], capsys)
        assert status == 65 and f"error[E404]: config.json: `{field}` must be a positive integer" in err


# --- item 12: the grammar-table cache ---------------------------------------------------------------------


def test_grammar_table_cache_honours_xdg_cache_home(tmp_path, monkeypatch):
    from recipec.syntax.parser import _table_cache_path, grammar_text

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _table_cache_path(grammar_text()).parent == tmp_path / "xdg" / "recipec"


def test_a_broken_tokenizer_or_generation_file_is_refused_at_check_not_shipped(tmp_path, capsys):
    model = tiny_llama(tmp_path / "models" / "m")
    (model / "generation_config.json").write_text('{"do_sample": false}\nextra')
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{")
    (tmp_path / "r.rcp").write_text('recipec 1\na = load("models/m")\n'
                                    'b = init("llama", size="tiny", tokenizer="tok")\nexport a to "out/a"\n')
    status, _, err = run_cli(["check", str(tmp_path / "r.rcp")], capsys)
    assert status == 65 and "Traceback" not in err
    assert "r.rcp:2:10: error[E404]: generation_config.json is not valid JSON" in err
    assert "r.rcp:3:42: error[E404]: tokenizer.json is not valid JSON" in err


def test_every_problem_of_one_call_s_arguments_is_reported_at_once(tmp_path, capsys):
    (tmp_path / "zh.txt").write_text("一些文字\n")
    (tmp_path / "r.rcp").write_text('recipec 1\nbase = init("llama", size="tiny")\n'
                                    'a = prune(base, sparsity=1.5, heads=0.3, batch=0)\n'
                                    'b = cp(base, text("zh.txt"), seq_len=64, batch=3, micro_batch=2, lr=1e-3)\n'
                                    'export a to "out/a"\nexport b to "out/b"\n')
    status, _, err = run_cli(["check", str(tmp_path / "r.rcp")], capsys)
    assert status == 65
    for code in ("E456", "E454", "E450"):  # both ways of pruning, a batch of 0, a fraction above 1
        assert f"error[{code}]" in err
    assert "r.rcp:4:5: error[E430]" in err and "r.rcp:4:48: error[E434]: micro_batch=2 does not divide batch=3" in err
    assert "5 errors found" in err
