"""Iterative pruning, `prune(..., steps=, retrain=)`: the schedule of each round, zeros that stay exactly zero
through recovery training (unstructured and 2:4), heads and neurons removed over rounds with the smaller model
trained, a run killed by SIGKILL in round 2's training that resumes to the same bytes, the plan's rounds ×
training cost, and every bad schedule refused at check time.

One recipe holds the pruned models, run once for the module; models are tiny llamas, rounds a few steps.
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
import transformers
from helpers import run_cli
from safetensors.torch import load_file
from test_train_loop import corpus, tiny_llama

import recipec  # noqa: F401  (registers recipec's model classes)
from recipec.arch import facts_from_config, preset_config
from recipec.backends.prune import Pass
from recipec.backends.prune_iterative import _hold_zeros, round_pass
from recipec.backends.train import TrainConfig, train
from recipec.cli import main
from recipec.ops.prune import LAYER_WEIGHT, Prune

EXAMPLES = Path(__file__).parents[1] / "examples"
SOURCE = Path(__file__).parents[1] / "src"
RETRAIN = "retrain=corpus, train_steps=6, save_every=2, seq_len=32, batch=2, lr=3e-3"
HEADER = """recipec 1
llama = init("llama", size="tiny", seed=1, tokenizer="tokenizers/llama-chat")
corpus = text("data/tiny_corpus.jsonl")
"""
SPARSE = f'export prune(llama, sparsity=0.5, steps=2, {RETRAIN}) to "out/sparse"\n'
RECIPE = HEADER + SPARSE + f"""mha = init("llama", config="configs/mha.json", seed=2, tokenizer="tokenizers/llama-chat")
export prune(llama, sparsity=0.5) to "out/sparse_once"
export prune(llama, sparsity=0.5, pattern="2:4", steps=2, {RETRAIN}) to "out/two_four"
export prune(mha, heads=0.5, ffn=0.5, steps=2, {RETRAIN}) to "out/structured"
export prune(mha, heads=0.5, ffn=0.5) to "out/structured_once"
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _workspace(root: Path, recipe: str) -> Path:
    for extra in ("tokenizers", "data"):
        shutil.copytree(EXAMPLES / extra, root / extra)
    (root / "configs").mkdir()
    (root / "configs" / "mha.json").write_text(json.dumps(preset_config("llama", "tiny") | {"num_key_value_heads": 4}))
    (root / "p.rcp").write_text(recipe)
    return root / "p.rcp"


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("iterative")
    recipe = _workspace(root, RECIPE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECIPEC_CACHE", str(root / "cache"))
        assert main(["run", str(recipe)]) == 0
    return root / "out"


def _targeted(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: w for name, w in weights.items() if w.dim() == 2 and LAYER_WEIGHT.search(name)}


def _metrics(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "training_metrics.jsonl").read_text().splitlines()]


# --- the schedule --------------------------------------------------------------------------------------


def test_each_round_goes_an_equal_increment_towards_the_target():
    facts = facts_from_config(preset_config("llama", "tiny") | {"num_key_value_heads": 4})
    sparse = Prune.Params(sparsity=0.6, steps=3)
    assert [round_pass(sparse, None, r, 3).sparsity for r in (1, 2, 3)] == pytest.approx([0.2, 0.4, 0.6])
    four_eight = Prune.Params(sparsity=0.5, pattern="4:8", steps=4)
    assert [round_pass(four_eight, None, r, 4).keep for r in (1, 2, 3, 4)] == [(7, 8), (6, 8), (5, 8), (4, 8)]
    structured = Prune.Params(heads=0.5, ffn=0.5, steps=2)
    assert [round_pass(structured, facts, r, 2) for r in (1, 2)] == [Pass(heads=[1, 1], ffn=[32, 32])] * 2
    ranked = Prune.Params(heads=0.75, uniform=False, steps=3)  # 6 of 8 groups across layers, 2 a round
    assert [round_pass(ranked, facts, r, 3).heads for r in (1, 2, 3)] == [2, 2, 2]


# --- sparsity: zeros stay zeros --------------------------------------------------------------------------


def test_retrained_sparse_weights_keep_exactly_the_final_rounds_zeros(out):
    weights, once = load_file(out / "sparse" / "model.safetensors"), load_file(out / "sparse_once" / "model.safetensors")
    targeted = _targeted(weights)
    total = sum(w.numel() for w in targeted.values())
    # The last round zeroes exactly half, then trains: had any zero moved, fewer than half would be zero.
    assert sum(int((w == 0).sum()) for w in targeted.values()) == total // 2
    # Training happened: the kept weights and the untargeted embeddings differ from pruning once.
    assert not torch.equal(weights["model.layers.0.mlp.up_proj.weight"], once["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(weights["model.embed_tokens.weight"], once["model.embed_tokens.weight"])
    metrics = _metrics(out / "sparse")
    assert [(m["round"], m["step"]) for m in metrics] == [(1, s) for s in range(1, 7)] + [(2, s) for s in range(7, 13)]
    tokens = [m["tokens"] for m in metrics]
    assert tokens == sorted(set(tokens)) and tokens[-1] <= 12 * 2 * 32  # counted on across rounds
    assert (out / "sparse" / "loss_curve.png").is_file()


def test_retrained_two_four_weights_keep_the_pattern(out):
    targeted = _targeted(load_file(out / "two_four" / "model.safetensors"))
    for name, weight in targeted.items():
        kept = (weight.reshape(-1, 4) != 0).sum(dim=1)
        assert int(kept.max()) <= 2, name
    assert sum(int((w == 0).sum()) for w in targeted.values()) == sum(w.numel() for w in targeted.values()) // 2


def test_masked_gradients_hold_zeros_through_adamw_with_decay(tmp_path):
    model = tiny_llama(seed=4)
    weight = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        weight[:, ::3] = 0
    zeros = weight == 0
    before = weight.detach().clone()
    _hold_zeros(model, ["model.layers.0.mlp.up_proj.weight"])
    config = TrainConfig(seq_len=32, batch=2, lr=1e-2, steps=4, weight_decay=0.1, precision="fp32")
    trained, _ = train(model, corpus(), config, tmp_path)
    after = trained.model.layers[0].mlp.up_proj.weight
    assert torch.equal(after == 0, zeros)  # exactly the pruned weights, no more and none fewer
    assert not torch.equal(after[~zeros], before[~zeros])


# --- heads and neurons: removed each round, the smaller model trained ----------------------------------


def test_heads_and_neurons_go_over_rounds_and_the_smaller_model_is_trained(out):
    config = json.loads((out / "structured" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (2, 2, 64)
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "structured")
    assert model(torch.tensor([[1, 5, 6]])).logits.shape[:2] == (1, 3)
    trained, once = load_file(out / "structured" / "model.safetensors"), \
        load_file(out / "structured_once" / "model.safetensors")
    assert trained.keys() == once.keys()
    assert all(trained[n].shape == once[n].shape for n in trained)
    assert not torch.equal(trained["model.layers.1.self_attn.o_proj.weight"],
                           once["model.layers.1.self_attn.o_proj.weight"])
    assert {m["round"] for m in _metrics(out / "structured")} == {1, 2}


# --- resume after SIGKILL ------------------------------------------------------------------------------


def test_a_run_killed_in_round_two_resumes_to_the_same_bytes(out, tmp_path):
    recipe = _workspace(tmp_path, HEADER + SPARSE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE), os.environ.get("PYTHONPATH", "")]),
           "RECIPEC_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "recipec", "run", str(recipe)], env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = None
    deadline = time.monotonic() + 240
    while checkpoint is None and run.poll() is None and time.monotonic() < deadline:
        checkpoint = next((tmp_path / "cache").glob("**/round-2/train/checkpoints/step-00000002"), None)
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGKILL)  # the run and any worker it started
    run.wait()
    assert checkpoint is not None, run.stderr.read().decode()
    work = checkpoint.parents[3]
    assert (work / "round-1" / "trained").is_dir() and not (tmp_path / "out").exists()

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECIPEC_CACHE", str(tmp_path / "cache"))
        assert main(["run", str(recipe)]) == 0
    for name in ("model.safetensors", "training_metrics.jsonl", "loss_curve.png"):
        assert (tmp_path / "out" / "sparse" / name).read_bytes() == (out / "sparse" / name).read_bytes(), name


# --- plan and check ------------------------------------------------------------------------------------


def test_the_plan_shows_rounds_times_training(tmp_path, capsys):
    recipe = _workspace(tmp_path, HEADER + SPARSE)
    status, text, _ = run_cli(["plan", recipe], capsys)
    assert status == 0
    assert "2 rounds × (prune, then 384 tokens · 6 steps of 2 × 32 of recovery training) = 768 tokens" in text


BAD = HEADER + """bert = init("bert", size="tiny")
gpt2 = init("gpt2", size="tiny")
a = prune(llama, sparsity=0.5, steps=2)
b = prune(llama, sparsity=0.5, retrain=corpus)
c = prune(llama, sparsity=0.5, steps=0, retrain=corpus, train_steps=2, lr=1e-3)
d = prune(bert, sparsity=0.5, steps=2, retrain=corpus, train_steps=2, lr=1e-3)
e = prune(llama, sparsity=0.5, steps=2, retrain=corpus, lr=1e-3)
f = prune(llama, sparsity=0.5, steps=2, retrain=corpus, train_steps=2)
g = prune(llama, sparsity=0.5, pattern="2:4", steps=3, retrain=corpus, train_steps=2, lr=1e-3)
h = prune(llama, heads=0.5, steps=2, retrain=corpus, train_steps=2, lr=1e-3)
i = prune(llama, sparsity=0.5, lr=1e-3)
j = prune(gpt2, sparsity=0.5, steps=2, retrain=corpus, train_steps=2, lr=1e-3, seq_len=4096)
"""


BAD_CALLS = {  # the call bound to each name: its error's code and words
    "a": ("E488", "it needs `retrain=`"),
    "b": ("E488", "`retrain=` is read by iterative pruning only"),
    "c": ("E488", "must be at least 1, got 0"),
    "d": ("E489", "this bert model is an encoder"),
    "e": ("E488", "it needs one of `train_steps=`, `epochs=`, `tokens=` (per round)"),
    "f": ("E488", "it needs `lr=` (a learning rate)"),
    "g": ("E488", "valid steps: 1, 2"),
    "h": ("E488", "valid steps: 1"),
    "i": ("E488", "`lr=` is read by iterative pruning only"),
    "j": ("E433", "seq_len=4096 is beyond the model's 128 positions"),
}


def test_bad_schedules_are_refused_at_check_time(tmp_path, capsys):
    exports = "".join(f'export {name} to "out/{name}"\n' for name in BAD_CALLS)
    status, _, err = run_cli(["check", _workspace(tmp_path, BAD + exports)], capsys)
    assert status == 65 and "Traceback" not in err
    blocks = err.split("\n\n")
    for name, (code, words) in BAD_CALLS.items():
        block = next(b for b in blocks if f"  {name} = prune(" in b)
        assert f"error[{code}]" in block and words in block, block
    assert len([b for b in blocks if "error[" in b]) == len(BAD_CALLS)


def test_every_problem_of_a_schedule_is_reported_at_once(tmp_path, capsys):
    recipe = HEADER + """a = prune(llama, sparsity=0.5, steps=0, retrain=corpus, train_steps=2, epochs=1)
b = prune(llama, sparsity=0.5, retrain=corpus, lr=1e-3, warmup=2)
c = prune(llama, sparsity=0.5, steps=2)
export a to "out/a"
export b to "out/b"
export c to "out/c"
"""
    status, _, err = run_cli(["check", _workspace(tmp_path, recipe)], capsys)
    assert status == 65 and "Traceback" not in err
    blocks = [b for b in err.split("\n\n") if "error[" in b]
    said = {name: [b for b in blocks if f"  {name} = prune(" in b] for name in "abc"}
    assert len(said["a"]) == 3 and any("must be at least 1, got 0" in b for b in said["a"])
    assert any("it needs `lr=` (a learning rate)" in b for b in said["a"])
    assert any("takes exactly one of `train_steps=`, `epochs=`, `tokens=` per round (got train_steps, epochs)" in b
               for b in said["a"])
    assert [b.split("`")[1] for b in said["b"]] == ["retrain=", "lr=", "warmup="]  # each stray, at its argument
    (only,) = said["c"]  # what the rounds lack, in one message
    assert ("it needs `retrain=` (a corpus to train on), one of `train_steps=`, `epochs=`, `tokens=` (per round) "
            "and `lr=` (a learning rate)") in only
