"""The plan of training at full size: `recipes/inscp_zh.rcp` (Llama-2-7b-chat, 0.1B tokens) plans offline,
and with the model's files at hand the plan says what the run needs on this kind of machine.

The 7B model is a sparse file: its real safetensors header, the data a hole (nothing is written), in a
hub cache of the test's own. The machine is fixed by replacing `this_machine`, so the golden file does not
depend on where the test runs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from recipec import arch
from recipec.dtypes import DTYPE_BYTES
from recipec.ops.train_config import Device
from helpers import run_cli

ROOT = Path(__file__).parents[1]
GOLDEN = Path(__file__).parent / "golden" / "plan"
RECIPE = ROOT / "recipes" / "inscp_zh.rcp"
CHAT_ID, CHAT_COMMIT = "meta-llama/Llama-2-7b-chat-hf", "f5db02db724555f92da89c216ac04704f23d4590"
LLAMA2_7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
# Llama-2-chat's turns, as its tokenizer_config.json writes them (shortened: no system prompt handling).
LLAMA2_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] "
                   "+ ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
CPU_ONLY = Device(None, 128 << 30)
H100 = Device("NVIDIA H100 80GB HBM3", 80 << 30, bf16=True)


def sparse_model(root: Path, config: dict, dtype: str = "F16") -> None:
    """A model directory whose safetensors header is real and whose data is a hole (no disk used), with a
    tokenizer as hub models have (training needs one; its content does not matter to check and plan)."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    (root / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    header, offset = {}, 0
    for name, shape in sorted(arch.tensor_shapes(config).items()):
        size = DTYPE_BYTES[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(root / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)


@pytest.fixture
def hub_chat(isolated_caches):
    snapshot = isolated_caches / "hub" / ("models--" + CHAT_ID.replace("/", "--")) / "snapshots" / CHAT_COMMIT
    sparse_model(snapshot, LLAMA2_7B)
    (snapshot / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": LLAMA2_TEMPLATE}))
    return snapshot


def plan(capsys, monkeypatch, device: Device, *extra: str) -> str:
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setattr("recipec.ops.train.this_machine", lambda: device)
    status, out, err = run_cli(["plan", "--threads", "2", *extra, RECIPE.relative_to(ROOT)], capsys, ROOT)
    assert status == 0, err
    return out


def golden(name: str, actual: str) -> None:
    import os

    if os.environ.get("RECIPEC_UPDATE_GOLDEN"):
        (GOLDEN / name).write_text(actual)
    assert actual == (GOLDEN / name).read_text()


def test_inscp_zh_plans_offline_without_the_model(capsys, monkeypatch):
    out = plan(capsys, monkeypatch, CPU_ONLY)
    assert "cost unknown until its inputs are fetched" in out
    golden("inscp_zh.txt", out)


def test_on_a_cpu_only_machine_the_plan_says_years_and_what_a_gpu_run_needs(hub_chat, capsys, monkeypatch):
    out = plan(capsys, monkeypatch, CPU_ONLY)
    assert "this machine has no GPU: training here would take" in out and " years. A GPU run needs ≈ " in out
    assert "GPU-hours on an H100-class GPU at 40% MFU, bf16" in out
    assert "· fp32: weights" in out  # precision="auto" is this machine's: fp32 on a CPU
    golden("inscp_zh_cpu.txt", out)


def test_on_a_gpu_auto_is_bf16_and_the_micro_batch_follows_from_memory(hub_chat, capsys, monkeypatch):
    out = plan(capsys, monkeypatch, H100)
    assert "no GPU" not in out and "· bf16: weights" in out
    data = json.loads(plan(capsys, monkeypatch, H100, "--json"))
    step = next(s for s in data["steps"] if s["label"] == "zh_chat")
    assert step["cost"]["accelerator_bytes"] <= 0.8 * H100.memory_bytes or "micro-batch 1 × 64" in out


def test_the_design_cards_line_checks_and_plans_at_full_size(isolated_caches, capsys, monkeypatch):
    # model = prune(cp(llama2, corpus_zh) + 0.8*(llama2_chat - llama2), heads=0.3), in recipes/zh_chat.rcp
    hub = isolated_caches / "hub"
    for repo, commit, vocab in (("meta-llama/Llama-2-7b-hf", "01c7f73d771dfac7d292323805ebc428287df4f9", 32000),
                                (CHAT_ID, CHAT_COMMIT, 32000), ("hfl/chinese-llama-2-7b", "c" * 40, 55296)):
        folder = hub / ("models--" + repo.replace("/", "--"))
        sparse_model(folder / "snapshots" / commit, {**LLAMA2_7B, "vocab_size": vocab})
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(commit)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setattr("recipec.ops.train.this_machine", lambda: CPU_ONLY)
    recipe = (ROOT / "recipes" / "zh_chat.rcp").relative_to(ROOT)
    status, out, err = run_cli(["check", recipe], capsys, ROOT)
    assert status == 0, err
    assert "warning[E419]: heads=0.3 removes whole heads: 10 of 32 heads = 0.3125 in every layer" in err
    status, out, err = run_cli(["plan", "--threads", "2", "--json", recipe], capsys, ROOT)
    assert status == 0, err
    steps = {s["label"]: s for s in json.loads(out)["steps"]}
    assert steps["model"]["op"] == "prune" and steps["model"]["cost"] is not None
    assert steps["model"]["signature"]["params"] < steps["zh_chat"]["signature"]["params"]
    cp = next(s for s in steps.values() if s["op"] == "cp")
    assert "years" in json.dumps(cp)  # a billion tokens on a CPU-only machine
