"""`plan`'s peak memory is a bound: every example, run at 1 and 2 threads, stays within what was planned.

The run happens in its own process, as a user runs it; its private memory (RssAnon) is sampled every few
milliseconds by the benchmarks' meter. The planned figure includes the interpreter and torch, as the
measured one does. benchmarks/plan_memory.py does the same on larger models, method by method.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from recipec.cli import main

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import procmeter  # noqa: E402
from helpers import SLOW_EXAMPLES  # noqa: E402


def planned_peak(recipe: Path, threads: int, capsys) -> int:
    assert main(["plan", "--json", "--threads", str(threads), str(recipe)]) == 0
    return json.loads(capsys.readouterr().out)["totals"]["peak_bytes"]


# chain_tiny and train_tiny build nothing that compress_tiny and inscp_tiny do not, but for eval and ONNX.
REPEATS = {"chain_tiny.rcp", "train_tiny.rcp"}


@pytest.mark.parametrize(("example", "threads"), [
    (p.name, threads) for p in sorted((ROOT / "examples").glob("*.rcp")) if p.name not in REPEATS
    for threads in ((2,) if p.name in SLOW_EXAMPLES else (1, 2))])
def test_examples_stay_within_planned_peak(example, threads, tmp_path, capsys, monkeypatch):
    for extra in ("tokenizers", "configs", "data"):
        shutil.copytree(ROOT / "examples" / extra, tmp_path / extra)
    recipe = Path(shutil.copy(ROOT / "examples" / example, tmp_path / example))
    planned = planned_peak(recipe, threads, capsys)
    monkeypatch.setattr(procmeter, "POLL_SECONDS", 0.005)
    result = procmeter.measure_process([sys.executable, "-m", "recipec", "run", "--threads", str(threads),
                                        str(recipe)])
    assert result["returncode"] == 0, result["output_tail"]
    assert result["samples"] > 0
    assert planned >= result["peak_anon_bytes"], (
        f"planned {planned / 2**20:.0f} MiB, measured {result['peak_anon_bytes'] / 2**20:.0f} MiB")


def test_plan_follows_threads_and_says_what_peak_means(capsys):
    recipe = ROOT / "examples" / "merge_methods.rcp"
    one, four = planned_peak(recipe, 1, capsys), planned_peak(recipe, 4, capsys)
    assert four > one  # four workers hold four tensors' temporaries at once
    assert main(["plan", "--threads", "4", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "Peak: private memory of `recipec run --threads 4`, Python and torch included" in out
    assert "memory-mapped inputs not counted" in out


def test_plan_defaults_to_the_threads_run_uses(capsys, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    assert main(["plan", "--json", str(ROOT / "examples" / "quickstart.rcp")]) == 0
    assert json.loads(capsys.readouterr().out)["threads"] == 3


def test_plan_time_counts_imports_once_a_launched_step_every_time_and_fixed_work(tmp_path, capsys):
    # A step's fixed part: the libraries its process has not imported yet (transformers: once per run in
    # process, every time in a launched training worker), and its op's fixed work (ONNX tracing), which a
    # tiny model's time is all of. Its memory: the libraries' too, for a report or an ONNX model as well.
    from recipec.check import lower_file
    from recipec.ops.export import ONNX_FIXED_SECONDS
    from recipec.plan import make_plan
    from recipec.plan.plan import IMPORTS, PROCESS_BYTES, PROCESS_START_SECONDS, measured_speed

    shutil.copytree(ROOT / "examples" / "tokenizers", tmp_path / "tokenizers")
    (tmp_path / "c.jsonl").write_text('{"text": "a b c"}\n' * 50)
    (tmp_path / "r.rcp").write_text(
        'recipec 1\na = init("llama", size="tiny", seed=1, tokenizer="tokenizers/llama")\n'
        'b = init("llama", size="tiny", seed=2, tokenizer="tokenizers/llama")\n'
        'c = cp(a, text("c.jsonl"), epochs=1, seq_len=8, batch=1, lr=1e-3)\n'
        'd = cp(b, text("c.jsonl"), epochs=1, seq_len=8, batch=1, lr=1e-3)\n'
        'export onnx(c) to "out/c.onnx"\nexport d to "out/d"\n'
        's = stats(a, seq_len=8)\nexport s to "out/s"\n')
    steps = {s.node.label: s for s in make_plan(lower_file(tmp_path / "r.rcp").graph, "r.rcp", threads=2).steps}
    transformers = IMPORTS["torch"][0] + IMPORTS["transformers"][0]
    assert steps["a"].seconds >= transformers > steps["b"].seconds  # imported once, by the first
    worker = PROCESS_START_SECONDS + transformers + IMPORTS["accelerate"][0]
    assert steps["c"].seconds >= worker and steps["d"].seconds >= worker  # each in a process of its own
    onnx = next(s for s in steps.values() if s.node.op == "onnx")
    assert onnx.seconds >= ONNX_FIXED_SECONDS + IMPORTS["torch.export"][0] and onnx.seconds < ONNX_FIXED_SECONDS + 10
    assert onnx.cost.peak_bytes >= PROCESS_BYTES + sum(IMPORTS[lib][1] for lib in ("transformers", "torch.export"))
    assert steps["s"].cost.peak_bytes >= PROCESS_BYTES + IMPORTS["transformers"][1]  # a report has a peak too
    # A build's speed is its work's: start-up taken out, and only when its work is long enough to tell.
    assert measured_speed(seconds=20.0, work=0.2, startup=9.0) is None
    assert measured_speed(seconds=30.0, work=10.0, startup=10.0) == pytest.approx(2.0)
