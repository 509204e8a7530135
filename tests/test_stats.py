"""`stats` as the measuring instrument of compression, and `recipec inspect DIR`: MACs counted while the
model runs equal the architecture's count, latency and memory are measured, dense zeros are called what
they are, and the report's digest leaves the measured times out so that the lock and `verify` hold."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from helpers import run_cli, safetensors_bytes, write_model

from recipec import arch
from recipec.backends.analysis import reproducible
from recipec.cli import main
from recipec.ops.analysis import macs_per_token
from recipec.store.filehash import content_digest
from recipec.store.lockfile import read_lock

ROOT = Path(__file__).resolve().parents[1]
FAST = "seq_len=16, repeats=2, decode_tokens=4"


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> tuple[Path, dict, str]:
    """One run of stats over a tiny llama, gpt2 and bert and an all-zero llama: (dir, report data, page)."""
    root = tmp_path_factory.mktemp("stats")
    write_model(root / "zeros", arch.preset_config("llama", "tiny"))
    (root / "r.rcp").write_text(
        'recipec 1\nl = init("llama", size="tiny", seed=1)\ng = init("gpt2", size="tiny", seed=1)\n'
        f'b = init("bert", size="tiny", seed=1)\ns = stats(l, g, b, load("zeros"), {FAST})\n')
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(["run", "--json", str(root / "r.rcp")])
    assert status == 0, err.getvalue()
    page = next((root / ".recipec").rglob("report.md")).read_text()
    return root, json.loads(out.getvalue())["reports"]["s"], page


def test_counted_macs_equal_the_architecture_count(measured):
    _, data, page = measured
    llama, gpt2, bert, zeros = data["models"]
    for model in (llama, gpt2, bert, zeros):
        assert model["macs_check"] == "equal" and model["macs_counted_with"] == "eager attention"
        assert model["macs_per_token"] == model["macs_per_token_architecture"] > 0
    facts = arch.facts_from_config(arch.preset_config("llama", "tiny"))
    assert llama["macs_per_token"] == macs_per_token("llama", facts, 16)
    # A decoded token attends to the 16 cached positions and itself.
    assert llama["decode_macs_per_token"] == llama["decode_macs_per_token_architecture"] == macs_per_token("llama", facts, 17)
    assert gpt2["decode_macs_per_token"] == gpt2["decode_macs_per_token_architecture"]
    assert bert["causal"] is False and bert["decode_macs_per_token"] is None
    assert zeros["macs_per_token"] == llama["macs_per_token"]  # zeros are multiplied all the same
    assert "equal the count the architecture implies" in page


def test_latency_and_memory_are_measured(measured):
    _, data, page = measured
    assert data["settings"] == {"seq_len": 16, "batch": 1, "threads": 1, "repeats": 2, "decode_tokens": 4,
                                "onnx": False, "dtype": "float32", "warmup": 1}
    for model in data["models"]:
        times = model["measured"]
        assert times["prefill_seconds"] > 0 and times["prefill_tokens_per_second"] > 0
        assert times["peak_memory_bytes"] >= 4 * model["params"]  # the fp32 weights are in it
        assert times["timed"] == "in rotating rounds with the other models"  # tiny models fit together
        if model["causal"]:
            assert times["decode_seconds_per_token"] > 0 and times["decode_tokens_per_second"] > 0
        else:
            assert times["decode_seconds_per_token"] is None
    assert set(data["measurement"]) >= {"machine", "processor", "threads", "torch", "transformers"}
    assert "| prefill latency (1 × 16 tokens) |" in page and "| decode latency per token |" in page
    assert "| MACs per token (prefill of 16) | 143,360 |" in page  # llama tiny: 139,264 + 2·4·16·16·2


def test_zero_weights_are_reported_with_no_speed_up(measured):
    _, data, page = measured
    zeros = data["models"][3]
    assert zeros["nonzero"] == 0 and zeros["zero_share"] == 1.0 and zeros["matrix_zero_share"] == 1.0
    assert data["models"][0]["zero_share"] == 0.0
    assert ("`model 4`: 100.0% of its matrix weights are zeros stored in dense tensors. Dense zeros bring no "
            "speed-up") in page
    assert "`l`:" not in page  # a dense model gets no such note


def test_the_digest_is_the_reproducible_part(measured):
    root, data, _ = measured
    lock = read_lock(root / "r.rcp.lock")
    assert lock["nodes"]["s"]["digest"] == content_digest(reproducible(data))
    assert "measured" not in json.dumps(reproducible(data)) and "measurement" not in reproducible(data)


def test_a_rebuild_verifies_although_the_times_differ(tmp_path, capsys):
    write_model(tmp_path / "zeros", arch.preset_config("gpt2", "tiny"))
    recipe = tmp_path / "r.rcp"
    recipe.write_text(f'recipec 1\ns = stats(load("zeros"), {FAST})\n')
    assert run_cli(["run", recipe], capsys)[0] == 0
    status, _, err = run_cli(["verify", recipe], capsys)
    assert status == 0 and "verified: 1 node" in err, err


def test_plan_says_stats_runs_the_model(tmp_path, capsys):
    recipe = tmp_path / "r.rcp"
    recipe.write_text('recipec 1\nm = init("llama", size="tiny")\ns = stats(m, m, seq_len=32, threads=2)\n')
    status, out, _ = run_cli(["plan", recipe], capsys)
    assert status == 0
    assert "runs each of 2 models: 1 warm-up + 5 timed prefills of 1 × 32 tokens and 16 decode steps on 2 threads" in out
    node = next(s for s in json.loads(run_cli(["plan", "--json", recipe], capsys)[1])["steps"] if s["label"] == "s")
    assert node["cost"]["flops"] > 2 * 6 * 32 * 139_264  # six prefills of 32 tokens of each model, at least


def test_bad_parameters_are_check_time_errors_with_hints(tmp_path, capsys):
    recipe = tmp_path / "r.rcp"
    recipe.write_text('recipec 1\nm = init("bert", size="tiny")\ns = stats(m, threads=0)\n'
                      't = stats(m, seq_len=129)\nu = stats(m, seq_len=128, decode_tokens=64)\n')
    status, _, err = run_cli(["check", recipe], capsys)
    assert status == 65
    assert "error[E203]: `threads` must be > 0, got 0" in err
    assert "hint: `threads` is the torch threads latency is measured with" in err
    assert "error[E482]: `m`: seq_len=129 is beyond the model's 128 positions" in err
    assert "hint: set `seq_len` to at most 128" in err
    assert err.count("E482") == 1  # an encoder decodes nothing: 128 positions hold seq_len=128


def test_architecture_count_follows_per_layer_shapes():
    facts = arch.facts_from_config(arch.preset_config("llama", "tiny"))  # 4 heads in 2 groups, head_dim 16
    pruned = facts.with_heads((4, 2)).with_intermediate((128, 64))
    hidden, d = facts.hidden, facts.head_dim
    removed_heads = 2 * (2 * hidden * d) + 2 * hidden * 1 * d + 2 * 2 * d * 10  # q, o; k, v of a group; scores
    removed_ffn = 3 * hidden * 64
    assert macs_per_token("llama", pruned, 10) == macs_per_token("llama", facts, 10) - removed_heads - removed_ffn
    assert macs_per_token("recipec_llama", pruned, 10) == macs_per_token("llama", pruned, 10)
    assert macs_per_token("t5", facts, 10) is None


@pytest.fixture(scope="module")
def factored(tmp_path_factory) -> tuple[dict, str]:
    """stats over a tiny llama, a low-rank copy bound to a name and an unbound one, timed in onnxruntime too."""
    root = tmp_path_factory.mktemp("stats_lowrank")
    (root / "r.rcp").write_text(
        'recipec 1\nl = init("llama", size="tiny", seed=1)\nhalf = lowrank(l, ratio=0.5)\n'
        f's = stats(l, half, lowrank(l, ratio=0.25), {FAST}, onnx=true)\n')
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(["run", "--json", str(root / "r.rcp")])
    assert status == 0, err.getvalue()
    page = next((root / ".recipec").rglob("report.md")).read_text()
    return json.loads(out.getvalue())["reports"]["s"], page


def test_low_rank_macs_from_the_architecture_count_the_factors(factored):
    data, page = factored
    dense, half, quarter = data["models"]
    for model in (half, quarter):
        assert model["model_type"] == "recipec_llama" and model["macs_check"] == "equal"
        assert model["macs_per_token"] == model["macs_per_token_architecture"] < dense["macs_per_token"]
        assert model["decode_macs_per_token"] == model["decode_macs_per_token_architecture"]
    assert quarter["macs_per_token"] < half["macs_per_token"]
    assert "equal the count the architecture implies" in page


def test_models_are_named_as_the_recipe_binds_them(factored):
    data, page = factored
    assert [m["name"] for m in data["models"]] == ["l", "half", "model 3"]
    assert "|  | l (llama) | half (recipec_llama) | model 3 (recipec_llama) |" in page


def test_onnxruntime_prefill_is_timed_beside_torch_and_left_out_of_the_digest(factored):
    data, page = factored
    assert data["settings"]["onnx"] is True and "onnxruntime" in data["measurement"]
    for model in data["models"]:
        times = model["measured"]
        assert times["onnxruntime_prefill_seconds"] > 0 and times["onnxruntime_prefill_tokens_per_second"] > 0
        assert times["onnxruntime_vs_torch"] == pytest.approx(
            times["onnxruntime_prefill_seconds"] / times["prefill_seconds"], rel=1e-2)
    assert "| prefill latency in onnxruntime (1 × 16 tokens) |" in page
    assert "| onnxruntime / PyTorch prefill |" in page and "its output checked against PyTorch" in page
    assert "onnxruntime" not in json.dumps(reproducible(data))


def test_inspect_prints_the_report_of_a_folder(tmp_path, capsys):
    folder = write_model(tmp_path / "gpt2", arch.preset_config("gpt2", "tiny"))
    status, out, _ = run_cli(["inspect", folder, "--seq-len", "8", "--repeats", "1", "--decode-tokens", "2"], capsys)
    assert status == 0
    assert out.startswith("# Model statistics") and "| model 1 (gpt2) |" in out
    assert "| MACs per token (prefill of 8) | 133,120 |" in out and "Dense zeros bring no speed-up" in out
    status, out, _ = run_cli(["inspect", "--json", folder, "--seq-len", "8", "--repeats", "1"], capsys)
    data = json.loads(out)
    assert status == 0 and data["kind"] == "stats" and len(data["models"]) == 1
    model = data["models"][0]
    assert {"params", "nonzero", "zero_share", "macs_per_token", "macs_per_token_architecture", "measured",
            "ratios"} <= set(model)
    assert set(model["measured"]) >= {"prefill_seconds", "decode_seconds_per_token", "peak_memory_bytes"}
    assert model["measured"]["timed"] == "alone"
    assert data["settings"]["seq_len"] == 8 and data["settings"]["decode_tokens"] == 16


def test_inspect_refuses_what_it_cannot_measure(tmp_path, capsys):
    folder = write_model(tmp_path / "gpt2", arch.preset_config("gpt2", "tiny"))
    status, _, err = run_cli(["inspect", folder, "--seq-len", "120"], capsys)
    assert status == 65 and "error[E482]: seq_len=120 + decode_tokens=16 is beyond the model's 128 positions" in err
    assert "hint: set --seq-len to at most 112" in err
    status, _, err = run_cli(["inspect", tmp_path], capsys)
    assert status == 66 and "error[E401]" in err
    status, _, err = run_cli(["inspect", tmp_path / "gtp2"], capsys)  # a typo: no recipe to be relative to
    assert status == 66 and "does not exist" in err and "relative to where you run recipec" in err, err
    exported = tmp_path / "m.onnx"
    exported.mkdir()
    (exported / "model.onnx").write_bytes(b"onnx")
    status, _, err = run_cli(["inspect", exported], capsys)
    assert status == 66 and "is an ONNX model: inspect reads Hugging Face model folders" in err, err
    strange = write_model(tmp_path / "strange", arch.preset_config("gpt2", "tiny"))
    (strange / "config.json").write_text(json.dumps(arch.preset_config("gpt2", "tiny") | {"model_type": "nonesuch"}))
    status, _, err = run_cli(["inspect", strange], capsys)
    assert status == 1 and f"error[E610]: transformers cannot load {strange}: " in err
    lacking = write_model(tmp_path / "lacking", arch.preset_config("gpt2", "tiny"))
    shapes = arch.tensor_shapes(arch.preset_config("gpt2", "tiny"))
    del shapes["transformer.h.1.mlp.c_fc.weight"]
    (lacking / "model.safetensors").write_bytes(safetensors_bytes({n: ("F32", s) for n, s in shapes.items()}))
    status, _, err = run_cli(["inspect", lacking], capsys)
    assert status == 1 and ("lacks 1 tensor(s) its GPT2LMHeadModel needs (first: `transformer.h.1.mlp.c_fc.weight`); "
                            "transformers would fill them with random values") in err


def _benchmark():
    spec = importlib.util.spec_from_file_location("compression_table", ROOT / "benchmarks/compression_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_benchmark_dense_row_runs_and_missing_ops_are_named(tmp_path, capsys):
    bench = _benchmark()
    out = tmp_path / "table.md"
    status = bench.main(["--rows", "dense", "--size", "tiny", "--seq-len", "8", "--repeats", "1",
                         "--decode-tokens", "2", "--out", str(out), "--workdir", str(tmp_path / "work"),
                         "--skip-prune-memory"])
    assert status == 0
    page = out.read_text()
    assert "# Compression table: llama tiny (205,120 parameters)" in page
    assert "| dense | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | – |" in page
    assert bench.missing_ops([bench.Row("x", "nonesuch", "nonesuch(dense)", True)]) == {"nonesuch": ["x"]}
    text = bench.recipe_text(list(bench.ROWS), "llama", "base", {"seq_len": 8})
    assert 'row5 = prune(dense, sparsity=0.5, pattern="2:4")' in text
    assert "table = stats(row0, row1, row2, row3, row4, row5, row6, row7, seq_len=8)" in text


def test_benchmark_table_judges_rows_by_measured_ratios():
    bench = _benchmark()

    def model(params, nonzero, macs, prefill):
        return {"params": params, "nonzero": nonzero, "macs_per_token": macs, "macs_check": "equal",
                "measured": {"prefill_seconds": prefill, "decode_seconds_per_token": prefill / 10,
                             "peak_memory_bytes": 4 * params}}

    report = {"models": [model(100, 100, 80, 1.0), model(50, 50, 40, 0.55), model(75, 75, 60, 0.9),
                         model(100, 50, 80, 1.02)],
              "settings": {"batch": 1, "seq_len": 8, "decode_tokens": 2, "repeats": 1, "threads": 1},
              "measurement": {"processor": "cpu", "torch": "t", "transformers": "x"}}
    rows = [bench.ROWS[0], bench.ROWS[7], bench.ROWS[3], bench.ROWS[4]]  # dense, layers, ffn, sparsity
    table = bench.table_rows(rows, report)
    assert table[1]["macs"] == 0.5 and table[1]["efficiency"] == pytest.approx(0.9) and table[1]["meets_target"]
    assert table[2]["efficiency"] == pytest.approx(0.4) and table[2]["meets_target"] is False
    assert table[3]["meets_target"] is None  # unstructured: no speed-up is expected, none is claimed
    page = bench.markdown(table, report, "llama", "base")
    assert "| layers 0.5 | 0.500 | 0.500 | 0.500 | 0.550 | 0.550 | 0.500 | 0.900 ✓ |" in page
    assert "| ffn 0.5 | 0.750 | 0.750 | 0.750 | 0.900 | 0.900 | 0.750 | 0.400 ✗ (target 0.8) |" in page
    assert ("sparsity 0.5: 50% fewer non-zeros, stored as zeros in dense tensors; MACs 1.000×, prefill latency "
            "1.020× the dense model's") in page


def test_models_that_do_not_fit_together_are_timed_one_after_another(tmp_path, monkeypatch):
    from recipec.backends import measure

    monkeypatch.setattr(measure, "_available_bytes", lambda: 0)
    roots = [write_model(tmp_path / name, arch.preset_config("llama", "tiny")) for name in ("a", "b")]
    results, together = measure.measure_models(roots, measure.Settings(seq_len=8, repeats=1, decode_tokens=2),
                                               ["a", "b"], [10, 10])
    assert not together and all(r.prefill_seconds > 0 and r.decode_seconds > 0 for r in results)


def test_a_model_that_fails_while_timed_with_others_is_named(tmp_path, monkeypatch):
    from recipec.backends import measure
    from recipec.backends.job import RunFailure

    roots = [write_model(tmp_path / "a", arch.preset_config("llama", "tiny")),
             write_model(tmp_path / "b", arch.preset_config("gpt2", "tiny"))]
    real = measure._run_once

    def failing(model, causal, ids, settings):
        if model.config.model_type == "gpt2":
            raise RuntimeError("out of memory")
        return real(model, causal, ids, settings)

    monkeypatch.setattr(measure, "_run_once", failing)
    with pytest.raises(RunFailure) as caught:
        measure.measure_models(roots, measure.Settings(seq_len=8, repeats=1, decode_tokens=2), ["`a`", "`b`"],
                               [10, 10])
    assert caught.value.code == "E611"
    assert "`b` failed while measured: RuntimeError: out of memory" in caught.value.message


def test_renaming_a_model_rebuilds_the_report_that_shows_its_name(tmp_path, capsys):
    """A report shows its models by the names the recipe binds them to, so a renamed binding is a new key;
    an edit that moves the plan's node numbers (a line above) is not: no report shows `%id`."""
    for name in ("m", "n"):
        write_model(tmp_path / name, arch.preset_config("gpt2", "tiny"))
    recipe = tmp_path / "r.rcp"

    def run(text: str) -> dict:
        recipe.write_text("recipec 1\n" + text)
        status, out, err = run_cli(["run", "--json", recipe], capsys)
        assert status == 0, err
        return json.loads(out)

    def status(result: dict, label: str) -> str:
        return next(n["status"] for n in result["nodes"] if n["label"] == label)

    first = run(f's = stats(load("m"), load("n"), {FAST})\n')
    renamed = run(f'base = load("m")\ns = stats(base, load("n"), {FAST})\n')
    moved = run(f'base = load("m")\nt = stats(base, repeats=1, decode_tokens=0, seq_len=8)\ns = stats(base, load("n"), {FAST})\n')
    assert [m["name"] for m in first["reports"]["s"]["models"]] == ["model 1", "model 2"]
    assert [m["name"] for m in renamed["reports"]["s"]["models"]] == ["base", "model 2"]
    assert status(renamed, "s") == "built" and (status(moved, "s"), status(moved, "t")) == ("cached", "built")


def test_nodes_upstream_of_a_report_are_named_without_plan_numbers(tmp_path):
    from recipec.check import lower_file
    from recipec.ops.base import upstream_names

    for name in ("m", "n", "o"):
        write_model(tmp_path / name, arch.preset_config("gpt2", "tiny"))
    (tmp_path / "m" / "tokenizer_config.json").write_text("{}")  # cp trains it: it needs a tokenizer
    (tmp_path / "c.jsonl").write_text('{"text": "a b c"}\n')
    (tmp_path / "r.rcp").write_text(
        'recipec 1\nbase = load("m")\nhalf = combine(0.5*base + 0.5*load("n"))\ncorpus = text("c.jsonl")\n'
        's = stats(half, combine(0.5*base + 0.5*load("o")), cp(base, corpus, steps=1, seq_len=8, batch=1, lr=1e-3), seq_len=8)\n')
    program = lower_file(tmp_path / "r.rcp")
    s = next(n for n in program.graph.reachable() if n.label == "s")
    names = upstream_names(s.inputs)
    assert [names[n.id] for n in s.inputs] == ["half", "model 2", "model 3"]
    assert sorted(names.values()) == ["base", "half", "load 1", "load 2", "model 2", "model 3"]  # no corpus
