"""distill: the objective against a hand computation, a student that learns from its teacher through the training
loop, resume after SIGKILL to the same bytes, and the op from a recipe (a shallower student of the teacher).

Models are tiny (hidden 64, 2 layers, vocabulary 256) and runs a handful of steps, in fp32 on one thread. Run as
a script it is the process the resume test kills: `killed WORK STEP`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from test_train_loop import corpus, tiny_llama, weights_bytes  # the loop tests' tiny pieces

from recipec.backends.train import TrainConfig, read_metrics, train
from recipec.backends.train.distill import TeacherObjective, distillation_loss
from recipec.backends.train.packing import IGNORE
from recipec.cli import main

EXAMPLES = Path(__file__).parents[1] / "examples"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _softmax(values: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


@pytest.mark.parametrize("temperature, alpha", [(1.0, 1.0), (2.0, 1.0), (2.0, 0.25), (0.5, 0.0)])
def test_the_objective_is_the_hand_computed_kl_and_cross_entropy(temperature, alpha):
    student = [[[0.5, -1.0, 2.0], [1.0, 0.0, -0.5], [3.0, 3.0, 3.0]]]
    teacher = [[[1.5, 0.0, 0.2], [-1.0, 2.0, 0.5], [9.0, -9.0, 0.0]]]
    labels = [[2, 1, IGNORE]]  # the last position predicts nothing: it must not count
    expected = 0.0
    for s, t, label in zip(student[0][:2], teacher[0][:2], labels[0][:2]):
        p, q = _softmax(t, temperature), _softmax(s, temperature)
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        cross_entropy = -math.log(_softmax(s, 1.0)[label])
        expected += alpha * temperature ** 2 * kl + (1 - alpha) * cross_entropy
    got = distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), temperature, alpha)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_the_objective_is_zero_when_the_student_is_the_teacher_and_computed_in_fp32():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    assert float(distillation_loss(logits, logits, labels, 1.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, logits, labels, 1.0, 1.0).dtype == torch.float32


def config(**overrides) -> TrainConfig:
    settings = {"seq_len": 16, "batch": 4, "lr": 3e-3, "steps": 10, "warmup": 1, "seed": 0, "schedule": "constant"}
    return TrainConfig(**{**settings, **overrides})


def _kl_to_teacher(student, teacher) -> float:
    """The mean KL of the student from the teacher on fixed held-out sequences."""
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(9))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE
    with torch.no_grad():
        summed = distillation_loss(student.eval()(input_ids=ids).logits, teacher(input_ids=ids).logits, labels, 1, 1)
    return float(summed) / int((labels != IGNORE).sum())


def test_a_student_learns_its_teachers_distributions(tmp_path):
    teacher = tiny_llama(seed=3).eval().requires_grad_(False)
    student = tiny_llama(seed=5)
    before = _kl_to_teacher(student, teacher)
    student.train()
    trained, summary = train(student, corpus(count=80), config(), tmp_path,
                             objective=TeacherObjective(teacher, 1.0, 1.0))
    losses = [m["loss"] for m in read_metrics(tmp_path / "metrics.jsonl")]
    assert summary.steps == 10 and losses[-1] < 0.7 * losses[0], losses
    assert _kl_to_teacher(trained, teacher) < 0.7 * before


# --- resume after SIGKILL ------------------------------------------------------------------------------

RESUME = {"steps": 7, "save_every": 2, "micro_batch": 2}
KILL_AT = 5


def _objective() -> TeacherObjective:
    return TeacherObjective(tiny_llama(seed=3).eval().requires_grad_(False), 2.0, 0.5)


def test_a_killed_distillation_resumes_to_the_same_bytes(tmp_path):
    source = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, __file__, "killed", str(tmp_path / "work"), str(KILL_AT)], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [m["step"] for m in read_metrics(tmp_path / "work" / "metrics.jsonl")] == list(range(1, KILL_AT + 1))

    resumed, summary = train(tiny_llama(seed=7), corpus(), config(**RESUME), tmp_path / "work", objective=_objective())
    whole, _ = train(tiny_llama(), corpus(), config(**RESUME), tmp_path / "whole", objective=_objective())
    assert summary.resumed_from == 4  # and not the seed-7 weights it was handed
    assert weights_bytes(resumed) == weights_bytes(whole)
    assert [m["loss"] for m in read_metrics(tmp_path / "work" / "metrics.jsonl")] == \
        [m["loss"] for m in read_metrics(tmp_path / "whole" / "metrics.jsonl")]


def _killed_script(work: Path, kill_at: int) -> None:
    def on_progress(progress):
        if progress.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    train(tiny_llama(), corpus(), config(**RESUME), work, on_progress=on_progress, objective=_objective())


# --- the op, from a recipe -------------------------------------------------------------------------------

RECIPE = """recipec 1
teacher = init("llama", size="tiny", seed=1, tokenizer="tokenizers/llama-chat")
docs = text("data/tiny_corpus.jsonl")
student = distill(teacher, drop_layers(teacher, keep=1), docs, steps=4, seq_len=32, batch=2, lr=3e-3, temperature=2, alpha=0.5)
export student to "out/student"
"""


def test_distill_from_a_recipe_releases_a_trained_shallower_student(tmp_path):
    from transformers import AutoModelForCausalLM

    for extra in ("tokenizers", "data"):
        shutil.copytree(EXAMPLES / extra, tmp_path / extra)
    (tmp_path / "d.rcp").write_text(RECIPE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECIPEC_CACHE", str(tmp_path / "cache"))
        assert main(["run", str(tmp_path / "d.rcp")]) == 0
    out = tmp_path / "out" / "student"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1
    assert model(torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 1024)
    metrics = [json.loads(line) for line in (out / "training_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert (out / "loss_curve.png").is_file()


def test_a_teacher_whose_tokens_differ_is_refused_when_the_run_reads_them(tmp_path, capsys):
    for extra in ("tokenizers", "data"):
        shutil.copytree(EXAMPLES / extra, tmp_path / extra)
    # The same size, two ids swapped: check time cannot tell, the run must.
    other = tmp_path / "tokenizers" / "swapped"
    shutil.copytree(tmp_path / "tokenizers" / "llama-chat", other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["w10"], vocab["w11"] = vocab["w11"], vocab["w10"]
    (other / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "d.rcp").write_text(RECIPE.replace('tokenizer="tokenizers/llama-chat")', 'tokenizer="tokenizers/swapped")\n'
                                                   'plain = init("llama", size="tiny", seed=1, tokenizer='
                                                   '"tokenizers/llama-chat")').replace("drop_layers(teacher", "drop_layers(plain"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECIPEC_CACHE", str(tmp_path / "cache"))
        status, _, err = run_cli(["run", tmp_path / "d.rcp"], capsys)
    assert status == 1 and "error[E596]" in err and "for the teacher `teacher`" in err


if __name__ == "__main__":
    torch.set_num_threads(1)
    _killed_script(Path(sys.argv[2]), int(sys.argv[3]))


@pytest.mark.parametrize("gpu, precision", [(False, "fp32"), (True, "bf16")])
def test_auto_precision_is_keyed_as_this_machine_trains(tmp_path, monkeypatch, gpu, precision):
    # bf16 and fp32 students differ in their bytes: `auto` must not key them alike on a GPU and a CPU.
    from recipec.check.lower import lower_file
    from recipec.ops.train_config import Device

    for extra in ("tokenizers", "data"):
        shutil.copytree(EXAMPLES / extra, tmp_path / extra)
    (tmp_path / "d.rcp").write_text(RECIPE)
    device = Device("NVIDIA H100 80GB HBM3", 80 << 30, bf16=True) if gpu else Device(None, 16 << 30)
    monkeypatch.setattr("recipec.ops.distill.this_machine", lambda: device)
    program = lower_file(tmp_path / "d.rcp")
    student = next(n for n in program.graph.reachable() if n.op == "distill")
    assert student.params["precision"] == precision
