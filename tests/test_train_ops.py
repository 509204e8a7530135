"""The training ops from a user's side: a recipe with `cp`, `inscp` and `sft` runs, its releases load with
transformers and differ from the model they were trained from, a rerun is cached, a wrong process count is a
located error, and the plan's cost follows the op's parameters.

Models are the tiny Llama preset with the examples' word-level tokenizer, data the examples' tiny files, a few
steps each. One recipe holds every op so the training workers start once per node, for the whole module.
Check-time errors are golden cases (tests/golden/diagnostics/train_*.rcp).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from recipec.arch import preset_config
from recipec.cli import main
from recipec.ir.types import Kind, Type
from recipec.ops import REGISTRY
from recipec.ops.sources import signature_of_config
from recipec.ops.train import TEMPLATE_TOKENS_PER_DOCUMENT
from helpers import run_cli

EXAMPLES = Path(__file__).parents[1] / "examples"

RECIPE = """recipec 1
base = init("llama", size="tiny", seed=1, tokenizer="tokenizers/llama-chat")
corpus = text("data/tiny_corpus.jsonl")
tuned = cp(base, corpus, steps=3, seq_len=32, batch=2, lr=3e-3)
wrapped = inscp(base, corpus, steps=3, seq_len=32, batch=2, lr=3e-3, system="w5 w6")
chatted = sft(base, chat("data/tiny_chat.jsonl"), steps=3, seq_len=32, batch=2, lr=3e-3)
export base to "out/base"
export tuned to "out/cp"
export wrapped to "out/inscp"
export chatted to "out/sft"
"""


def workspace(root: Path, recipe: str) -> Path:
    for extra in ("tokenizers", "data"):
        shutil.copytree(EXAMPLES / extra, root / extra, dirs_exist_ok=True)
    (root / "train.rcp").write_text(recipe)
    return root / "train.rcp"


run = run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The recipe run once, with its own cache: (recipe, stderr of the run)."""
    root = tmp_path_factory.mktemp("train")
    recipe = workspace(root, RECIPE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECIPEC_CACHE", str(root / "cache"))
        status = main(["run", str(recipe)])
    assert status == 0
    return recipe


@pytest.mark.parametrize("release", ["cp", "inscp", "sft"])
def test_each_training_op_releases_a_loadable_model_that_learned(trained, release):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trained.parent / "out"
    folder = out / release
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model(torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 1024)
    base, weights = load_file(str(out / "base" / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert weights.keys() == base.keys()
    assert all(weights[n].dtype == base[n].dtype for n in base)
    assert any(not torch.equal(weights[n], base[n]) for n in base)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    # training keeps the tokenizer, its chat template and the generation config
    assert AutoTokenizer.from_pretrained(folder).chat_template == AutoTokenizer.from_pretrained(out / "base").chat_template
    assert (folder / "generation_config.json").read_text() == (out / "base" / "generation_config.json").read_text()
    metrics = [json.loads(line) for line in (folder / "training_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert set(metrics[0]) == {"step", "loss", "lr", "grad_norm", "tokens"}  # nothing that depends on speed
    assert (folder / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert "training_metrics.jsonl" in (folder / "SHA256SUMS").read_text()


def test_the_three_ops_train_on_different_tokens(trained):
    out = trained.parent / "out"
    first = {r: json.loads((out / r / "training_metrics.jsonl").read_text().splitlines()[0]) for r in
             ("cp", "inscp", "sft")}
    assert len({m["loss"] for m in first.values()}) == 3


def test_a_rerun_is_cached(trained, capsys, monkeypatch):
    monkeypatch.setenv("RECIPEC_CACHE", str(trained.parent / "cache"))
    status, _, err = run(["run", str(trained)], capsys)
    assert status == 0, err
    assert "Built 0, 4 cached" in err


def test_a_process_count_other_than_the_recipes_is_a_located_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECIPEC_CACHE", str(tmp_path / "cache"))
    recipe = workspace(tmp_path, RECIPE.split("wrapped =")[0].replace("lr=3e-3)", "lr=3e-3, processes=2)")
                       + 'export tuned to "out/cp"\n')
    status, _, err = run(["run", str(recipe)], capsys)
    assert status == 1
    assert "error[E572]: the run has 1 process(es) but the recipe says processes=2" in err
    assert "train.rcp:4:" in err and "Traceback" not in err


def _cost(op: str, **params):
    sig = signature_of_config(preset_config("llama", "tiny"))
    data = type("Data", (), {"params": {"bytes": 4000, "estimated_tokens": 1000, "estimated_documents": 10}})()
    cls = REGISTRY[op]
    values = cls.Params(seq_len=32, batch=4, lr=1e-3, **params)
    return sig, cls.cost([None, data], values, Type(Kind.MODEL, sig), threads=1)


def test_the_plan_costs_training_by_tokens_and_precision():
    sig, by_steps = _cost("cp", steps=10)
    tokens = 10 * 4 * 32
    attention = 12 * sig.facts.layers * 32 * sig.facts.hidden
    assert by_steps.flops == (6 * sig.params + attention) * tokens
    assert _cost("cp", tokens=tokens)[1].flops == by_steps.flops
    # each of the 10 conversations in the chat template, twice
    per_epoch = 1000 + 10 * TEMPLATE_TOKENS_PER_DOCUMENT
    assert _cost("sft", epochs=2)[1].flops == (6 * sig.params + attention) * 2 * per_epoch
    assert _cost("cp", epochs=2)[1].flops == (6 * sig.params + attention) * 2 * 1000  # plain text: no template
    assert by_steps.accelerator_bytes is None and by_steps.peak_bytes > 16 * sig.params
    _, bf16 = _cost("cp", steps=10, precision="bf16")
    assert bf16.accelerator_bytes is not None and 16 * sig.params < bf16.accelerator_bytes < by_steps.peak_bytes
    # a smaller micro-batch holds fewer activations
    assert _cost("cp", steps=10, grad_accum=4)[1].peak_bytes < by_steps.peak_bytes


def test_the_plan_shows_tokens_steps_and_memory_per_device(tmp_path, capsys):
    recipe = workspace(tmp_path, RECIPE.replace("steps=3, seq_len=32, batch=2", "tokens=8192, seq_len=32, batch=4, "
                                                "grad_accum=2, precision=\"bf16\"", 1))
    status, out, err = run(["plan", str(recipe)], capsys)
    assert status == 0, err
    assert "8.2 K tokens · 64 steps of 4 × 32 · micro-batch 2 × 2 on 1 process · bf16: weights, gradients, AdamW" in out
    # tokens= is trained in whole steps: where that is much more than asked, the plan says so (and "1 step")
    recipe.write_text(recipe.read_text().replace("tokens=8192", "tokens=10", 1))
    status, out, err = run(["plan", str(recipe)], capsys)
    assert status == 0 and "128 tokens (10 asked, rounded up to whole steps) · 1 step of 4 × 32" in out, out


RESUMABLE = """recipec 1
base = init("llama", size="tiny", seed=1, tokenizer="tokenizers/llama-chat")
tuned = cp(base, text("data/tiny_corpus.jsonl"), epochs=3, seq_len=32, batch=2, lr=3e-3, save_every=2)
export tuned to "out/cp"
"""


def _run_process(recipe: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "RECIPEC_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    return subprocess.Popen([sys.executable, "-m", "recipec", "run", str(recipe)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_run_killed_mid_training_resumes_to_the_same_bytes(tmp_path):
    recipe = workspace(tmp_path, RESUMABLE)
    killed = _run_process(recipe, tmp_path / "cache")
    deadline = time.monotonic() + 240
    while not list((tmp_path / "cache").glob("**/checkpoints/step-00000004")):
        assert killed.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "out" / "cp").exists()

    resumed = _run_process(recipe, tmp_path / "cache")
    assert resumed.wait() == 0, resumed.stderr.read().decode()
    weights = (tmp_path / "out" / "cp" / "model.safetensors").read_bytes()
    metrics = (tmp_path / "out" / "cp" / "training_metrics.jsonl").read_text()

    clean = workspace(tmp_path / "clean", RESUMABLE)
    uninterrupted = _run_process(clean, tmp_path / "clean" / "cache")
    assert uninterrupted.wait() == 0, uninterrupted.stderr.read().decode()
    assert (clean.parent / "out" / "cp" / "model.safetensors").read_bytes() == weights
    assert (clean.parent / "out" / "cp" / "training_metrics.jsonl").read_text() == metrics


def test_how_often_a_run_checkpoints_is_not_part_of_its_key(tmp_path, capsys, monkeypatch):
    # Checkpoints never change what is trained, so a new `save_every` reuses the result.
    monkeypatch.setenv("RECIPEC_CACHE", str(tmp_path / "cache"))
    recipe = workspace(tmp_path, RESUMABLE)
    assert run(["run", str(recipe)], capsys)[0] == 0
    weights = (tmp_path / "out" / "cp" / "model.safetensors").read_bytes()

    without = workspace(tmp_path / "without", RESUMABLE.replace(", save_every=2", ""))
    monkeypatch.setenv("RECIPEC_CACHE", str(tmp_path / "without" / "cache"))
    assert run(["run", str(without)], capsys)[0] == 0
    assert (tmp_path / "without" / "out" / "cp" / "model.safetensors").read_bytes() == weights

    monkeypatch.setenv("RECIPEC_CACHE", str(tmp_path / "cache"))
    recipe.write_text(RESUMABLE.replace("save_every=2", "save_every=5"))
    status, _, err = run(["run", str(recipe)], capsys)
    assert status == 0 and "Built 0, 2 cached" in err, err


def test_a_built_model_without_a_chat_template_is_a_located_error_when_run(tmp_path, capsys, monkeypatch):
    # A combination's tokenizer is only known once built, so this is found at run time, not at check time.
    monkeypatch.setenv("RECIPEC_CACHE", str(tmp_path / "cache"))
    recipe = workspace(tmp_path, """recipec 1
a = init("llama", size="tiny", seed=1, tokenizer="tokenizers/llama")
b = init("llama", size="tiny", seed=2, tokenizer="tokenizers/llama")
mixed = 0.5*a + 0.5*b
wrapped = inscp(mixed, text("data/tiny_corpus.jsonl"), steps=1, seq_len=32, batch=2, lr=1e-3)
export wrapped to "out/inscp"
""")
    status, _, err = run(["run", str(recipe)], capsys)
    assert status == 1
    assert "train.rcp:5:11: error[E571]: cannot prepare the data of `wrapped`: the tokenizer has no chat template" in err
    assert "hint: give the op `template=`" in err and "Traceback" not in err


def test_a_tokenizer_whose_chat_template_cannot_be_read_is_no_internal_error_at_check(tmp_path, capsys):
    # Whether a model has a tokenizer (E478) is judged without its chat template; one that cannot be read
    # (a tokenizer_config.json that is not an object, a template that is not UTF-8) is said where it is read.
    recipe = workspace(tmp_path, RECIPE)
    (tmp_path / "tokenizers" / "llama-chat" / "tokenizer_config.json").write_text("[]")
    status, _, err = run(["check", str(recipe)], capsys)
    assert "internal error" not in err and "Traceback" not in err, err
    assert "E478" not in err and err.count("error[E431]") == 2, err  # inscp and sft, which read the template
