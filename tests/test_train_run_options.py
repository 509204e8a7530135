"""How a training node runs, from the command line: as two processes under `run --launch` (gloo on CPU),
with accelerate's trackers (`--log-with`), and what an out-of-memory error says.

The two-process run must give the loss curve of one process accumulating twice as many micro-batches:
the loss of a step is normalized over all its target tokens, whichever process holds them.
"""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

from recipec.artifacts import Artifact
from recipec.backends.job import Job, RunFailure
from recipec.ir.graph import Node
from recipec.ir.types import Kind, Type
from recipec.ops import REGISTRY
from recipec.ops.train_config import Device
from helpers import run_cli

EXAMPLES = Path(__file__).parents[1] / "examples"

TWO = """recipec 1
base = init("llama", size="tiny", seed=1, tokenizer="tokenizers/llama-chat")
tuned = cp(base, text("data/tiny_corpus.jsonl"), steps=4, seq_len=32, batch=4, micro_batch=1, lr=3e-3, {extra})
export tuned to "out/cp"
"""


def workspace(root: Path, recipe: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for extra in ("tokenizers", "data"):
        shutil.copytree(EXAMPLES / extra, root / extra, dirs_exist_ok=True)
    (root / "train.rcp").write_text(recipe)
    return root / "train.rcp"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _curve(root: Path) -> list[dict]:
    lines = (root / "out" / "cp" / "training_metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_two_launched_processes_match_one_with_doubled_accumulation(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    pair = workspace(tmp_path / "pair", TWO.format(extra="processes=2"))
    status, _, err = run_cli(["run", pair, "--launch", shlex.join(launcher)], capsys)
    assert status == 0, err
    single = workspace(tmp_path / "single", TWO.format(extra="grad_accum=4"))  # 2 per process × 2 processes
    status, _, err = run_cli(["run", single], capsys)
    assert status == 0, err

    two, one = _curve(tmp_path / "pair"), _curve(tmp_path / "single")
    assert [m["step"] for m in two] == [1, 2, 3, 4] == [m["step"] for m in one]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["tokens"] == b["tokens"]


def test_an_unknown_tracker_is_a_located_error_before_training(tmp_path, capsys):
    recipe = workspace(tmp_path, TWO.format(extra="seed=0"))
    status, _, err = run_cli(["run", recipe, "--log-with", "no_such_tracker"], capsys)
    assert status == 1
    assert "train.rcp:3:9: error[E586]: cannot log to no_such_tracker: unknown tracker 'no_such_tracker'" in err
    assert not (tmp_path / "out").exists()


def test_tensorboard_receives_the_metrics(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    recipe = workspace(tmp_path, TWO.format(extra="seed=0"))
    status, _, err = run_cli(["run", recipe, "--log-with", "tensorboard"], capsys)
    assert status == 0, err
    events = list((tmp_path / "runs" / "tuned").glob("**/events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


# --- out of memory ---------------------------------------------------------------------------------------

def _cp_job(tmp_path: Path) -> Job:
    """A `cp` job on a tiny Llama saved by transformers and a two-document corpus, as the engine makes one."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from recipec.arch import preset_config
    from recipec.ops.sources import signature_of_config

    config = preset_config("llama", "tiny")
    model_dir = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(str(EXAMPLES / "tokenizers" / "llama-chat")).save_pretrained(model_dir)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "records.jsonl").write_text('{"text": "w5 w6 w7"}\n{"text": "w8 w9"}\n')
    params = REGISTRY["cp"].Params(steps=1, seq_len=16, batch=2, lr=1e-3, precision="fp32")
    node = Node(1, "cp", (), params.model_dump(mode="json"), Type(Kind.MODEL, signature_of_config(config)),
                names=["tuned"])
    (tmp_path / "out").mkdir()
    inputs = [Artifact(Kind.MODEL, model_dir, "m"), Artifact(Kind.CORPUS, corpus, "c")]
    return Job(node, inputs, tmp_path / "out", tmp_path / "work", 1)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 8589934592 bytes")])
def test_out_of_memory_names_the_node_and_the_plans_estimate(tmp_path, monkeypatch, error):
    from recipec.backends.train import rules

    def exhausted(*args, **kwargs):
        raise error
    monkeypatch.setattr(rules, "train", exhausted)
    monkeypatch.setattr(rules, "this_machine", lambda: Device(None, 16 << 30))
    with pytest.raises(RunFailure) as caught:
        rules.build_train(_cp_job(tmp_path))
    failure = caught.value
    assert failure.code == "E585"
    assert failure.message.startswith("training `tuned` ran out of memory at micro-batch 2 × 16 tokens; the plan "
                                      "estimated ")
    assert "per device (weights, gradients, AdamW 3.1 MiB + activations" in failure.message
    assert failure.message.endswith("this machine has 16.0 GiB of RAM")
    assert "micro_batch=" in failure.hint


def test_another_runtime_error_is_not_called_out_of_memory(tmp_path, monkeypatch):
    from recipec.backends.train import rules

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")
    monkeypatch.setattr(rules, "train", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        rules.build_train(_cp_job(tmp_path))
