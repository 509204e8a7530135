"""The training loop behind cp, inscp and sft: packing, loss, schedule, checkpoints, resume, failures.

Models are tiny (hidden 64, 2 layers, vocabulary 256) and runs a handful of steps, in fp32 on one thread.
Run as a script it is a process of a test: `killed WORK STEP` (the run the resume test kills) or `pair WORK`
(one of the two processes of the gloo test).
"""

from __future__ import annotations

import itertools
import math
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipec.backends.train import (
    Document,
    TrainConfig,
    TrainingError,
    batch_shape,
    pack,
    packing_isolates,
    read_metrics,
    render_loss_curve,
    total_steps,
    train,
)
from recipec.backends.train.packing import IGNORE, Row, collate, row_stream
from recipec.backends.train.schedule import decay_groups, lr_factor

VOCAB = 256


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128))


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=0, eos_token_id=0))


def corpus(count: int = 40, longest: int = 50, seed: int = 1):
    """A document source: the same seeded documents on every pass, some longer than the tests' seq_len."""
    def documents():
        rng = random.Random(seed)
        for _ in range(count):
            yield Document([rng.randrange(VOCAB) for _ in range(rng.randrange(1, longest))])
    return documents


def config(**overrides) -> TrainConfig:
    settings = {"seq_len": 16, "batch": 4, "lr": 3e-3, "steps": 6, "warmup": 2, "seed": 0}
    return TrainConfig(**{**settings, **overrides})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def weights_bytes(model) -> dict[str, bytes]:
    return {name: t.detach().contiguous().numpy().tobytes() for name, t in model.state_dict().items()}


# --- packing -------------------------------------------------------------------------------------------

def test_packing_keeps_every_token_and_splits_long_documents_into_new_ones():
    docs = [Document(list(range(1, 6))), Document(list(range(10, 30))), Document([7])]
    rows = list(pack(docs, 8))
    assert [len(r.ids) for r in rows] == [8, 8, 8, 2]  # 26 tokens: three full rows and a short last one
    assert sum((r.ids for r in rows), ()) == tuple(range(1, 6)) + tuple(range(10, 30)) + (7,)
    # The second document starts at position 0, and each piece of it in a later row restarts at 0.
    assert rows[0].positions == (0, 1, 2, 3, 4, 0, 1, 2)
    assert rows[1].positions == tuple(range(8))
    assert rows[2].positions == tuple(range(8))
    assert rows[3].positions == (0, 0)


def test_labels_follow_the_loss_mask_and_never_cross_a_document():
    row = Row(ids=(5, 6, 7, 8, 9), positions=(0, 1, 2, 0, 1), targets=(0, 0, 1, 1, 1))
    batch = collate([row, Row((3, 4), (0, 1), (1, 1))], pad_id=0)
    # 7 is a target of 6; 8 starts a new document so nothing predicts it; 9 is a target of 8.
    assert batch.labels[0].tolist() == [IGNORE, 7, IGNORE, 9, IGNORE]
    assert batch.labels[1].tolist() == [4, IGNORE, IGNORE, IGNORE, IGNORE]
    assert batch.position_ids[1].tolist() == [0, 1, 0, 1, 2]  # padding is a document of its own
    assert (batch.tokens, batch.target_tokens) == (7, 3)


def test_a_mask_of_the_wrong_length_is_refused():
    with pytest.raises(TrainingError, match="document 0 has 3 tokens but a loss mask of 2"):
        list(pack([Document([1, 2, 3], [1, 1])], 8))


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_packed_logits_equal_each_document_alone(make_model):
    model = make_model().eval()
    docs = [Document([random.Random(n).randrange(VOCAB) for _ in range(n)]) for n in (5, 11, 3, 20, 1)]
    rows = list(pack(docs, 16))
    batch = collate(rows)
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None,
                       use_cache=False).logits
        checked = 0
        for r, row in enumerate(rows):
            starts = [t for t, p in enumerate(row.positions) if p == 0] + [len(row.ids)]
            for start, end in itertools.pairwise(starts):
                alone = model(input_ids=torch.tensor([row.ids[start:end]])).logits[0]
                torch.testing.assert_close(packed[r, start:end], alone, atol=1e-5, rtol=1e-4)
                checked += 1
    assert checked == 6  # the 20-token document was split in two
    assert packing_isolates(model)


@pytest.mark.parametrize("per_document", [True, False], ids=["per-document", "masked"])
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_attention_document_by_document_equals_the_block_diagonal_mask(make_model, per_document, monkeypatch):
    """What the loop trains with (each document attended to on its own; short rows with transformers' mask)
    gives the logits and gradients of transformers' packed-sequence mask; other calls are left to it."""
    from recipec.backends.train import attention
    from recipec.backends.train.attention import packed_attention

    monkeypatch.setattr(attention, "PER_DOCUMENT_FROM", 0 if per_document else 10**9)

    docs = [Document([random.Random(n).randrange(VOCAB) for _ in range(n)]) for n in (5, 11, 3, 20, 1, 16)]
    batch = collate(list(pack(docs, 16)))

    def logits_and_grads(model):
        model.zero_grad()
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None,
                       use_cache=False).logits
        (logits.square().mean()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    model = make_model().eval()  # no dropout: the two must see the same computation
    expected, expected_grads = logits_and_grads(model)
    with packed_attention(model) as used:
        assert used and model.config._attn_implementation == "recipec_packed"
        actual, grads = logits_and_grads(model)
        assert packing_isolates(model)
        with torch.no_grad():  # a left-padded batch with its mask goes to transformers' attention
            ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
            mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
            padded = model(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(padded, model(input_ids=ids, attention_mask=mask).logits)


def test_attention_document_by_document_without_sdpa_grouping(monkeypatch):
    """Before torch 2.5, SDPA cannot group query heads over key/value heads: they are repeated instead."""
    from recipec.backends.train import attention

    monkeypatch.setattr(attention, "PER_DOCUMENT_FROM", 0)
    monkeypatch.setattr(attention, "_SDPA_GROUPS", False)
    batch = collate(list(pack([Document(list(range(1, n + 1))) for n in (5, 11, 3, 20)], 16)))
    model = tiny_llama().eval()  # 4 query heads over 2 key/value heads
    with torch.no_grad():
        expected = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        with attention.packed_attention(model):
            actual = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


class LeakyModel(torch.nn.Module):
    """A causal LM that ignores position_ids: every token sees all earlier tokens of its row."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"max_position_embeddings": 64})()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=False):
        hidden = self.embed(input_ids).cumsum(1)
        return type("Output", (), {"logits": self.head(hidden)})()


def test_a_model_that_leaks_across_packed_documents_is_refused(tmp_path):
    assert not packing_isolates(LeakyModel())
    with pytest.raises(TrainingError, match="LeakyModel lets packed documents attend to each other"):
        train(LeakyModel(), corpus(), config(), tmp_path)


def test_data_order_depends_on_the_seed_only():
    def order(seed):
        return [row.ids for row in row_stream(corpus(), 16, passes=2, seed=seed, buffer=8)]
    assert order(0) == order(0)
    assert order(0) != order(1)
    first = order(0)
    assert sorted(first[:len(first) // 2]) == sorted(first[len(first) // 2:])  # each pass holds every row once


# --- batches, schedule, optimizer ----------------------------------------------------------------------

def test_micro_batch_and_accumulation_follow_from_batch():
    assert batch_shape(config(batch=8), 1).per_process == 8
    assert (batch_shape(config(batch=8, micro_batch=2), 2).grad_accum) == 2
    assert (batch_shape(config(batch=8, grad_accum=4), 1).micro_batch) == 2
    with pytest.raises(TrainingError, match="does not split over 3 processes"):
        batch_shape(config(batch=8), 3)
    with pytest.raises(TrainingError, match=r"^micro_batch=3 does not divide batch=8 \(8 per process\)$"):
        batch_shape(config(batch=8, micro_batch=3), 1)
    with pytest.raises(TrainingError, match=r"^grad_accum=4 does not divide batch=12 over 2 processes \(6 per"):
        batch_shape(config(batch=12, grad_accum=4), 2)
    with pytest.raises(TrainingError, match=r"^batch=8 is not micro_batch=2 × grad_accum=2$"):
        batch_shape(config(batch=8, micro_batch=2, grad_accum=2), 1)


def test_exactly_one_of_steps_epochs_tokens():
    with pytest.raises(ValueError, match="exactly one of steps, epochs, tokens"):
        config(epochs=1)
    with pytest.raises(ValueError, match="got none"):
        config(steps=None)
    assert total_steps(config(steps=None, tokens=100), corpus_tokens := 1000) == math.ceil(100 / 64)
    assert total_steps(config(steps=None, epochs=2), corpus_tokens) == math.ceil(2 * math.ceil(1000 / 16) / 4)


def test_warmup_then_schedule():
    assert [lr_factor(s, 2, 10, "constant") for s in (0, 1, 5)] == [0.5, 1.0, 1.0]
    assert lr_factor(2, 2, 10, "cosine") == 1.0 and lr_factor(6, 2, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(6, 2, 10, "linear") == pytest.approx(0.5)
    assert 0 < lr_factor(9, 2, 10, "cosine") < 0.05


def test_no_weight_decay_on_norms_and_biases():
    decayed, exempt = decay_groups(tiny_gpt2(), 0.1)
    assert decayed["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"]) and all(p.ndim == 1 for p in exempt["params"])
    assert exempt["params"]  # GPT-2 has biases and LayerNorm scales


# --- training ------------------------------------------------------------------------------------------

def test_training_learns_and_leaves_metrics_and_a_loss_curve(tmp_path):
    repeated = lambda: (Document(list(range(16))) for _ in range(40))  # one text, quickly learnt
    progress = []
    model, summary = train(tiny_llama(), repeated, config(steps=8), tmp_path, on_progress=progress.append)
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 9)) and [p.step for p in progress] == list(range(1, 9))
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(metrics[0])
    assert progress[-1].total == 8 and progress[-1].eta_s == 0 and progress[-1].tokens_per_s > 0
    assert summary.steps == 8 and summary.tokens == 8 * 4 * 16 and summary.final_loss == metrics[-1]["loss"]
    assert metrics[0]["lr"] == pytest.approx(3e-3 / 2)  # the first warmup step
    render_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    render_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "again.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "loss.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    assert isinstance(model, type(tiny_llama()))


def test_loss_is_normalized_over_all_targets_of_a_step_not_per_micro_batch(tmp_path):
    # Rows with very different target counts: averaging per micro-batch would weigh them differently.
    documents = [Document(list(range(1, 17)), [1] * 16), Document(list(range(20, 36)), [0] * 14 + [1] * 2),
                 Document(list(range(40, 56)), [1] * 16), Document(list(range(60, 76)), [0] * 15 + [1])]
    model = tiny_llama()
    with torch.no_grad():
        summed = sum(torch.nn.functional.cross_entropy(model(torch.tensor([d.ids])).logits[0, :-1],
                                                       torch.tensor(d.ids[1:]), reduction="none")
                     [torch.tensor(d.loss_mask[1:]) == 1].sum() for d in documents)
    expected_loss = float(summed) / sum(sum(d.loss_mask[1:]) for d in documents)
    first_steps = []
    for name, shape in (("whole", {}), ("micro", {"micro_batch": 1})):
        train(tiny_llama(), lambda: iter(documents), config(steps=1, warmup=0, max_grad_norm=None, **shape),
              tmp_path / name)
        first_steps.append(read_metrics(tmp_path / name / "metrics.jsonl")[0])
    whole, micro = first_steps
    assert whole["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert micro["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert micro["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)


def test_a_damaged_checkpoint_is_passed_over_and_reported(tmp_path):
    expected, _ = train(tiny_llama(), corpus(), config(save_every=2), tmp_path / "clean")

    def crash_after(step):
        def on_progress(progress):
            if progress.step == step:
                raise KeyboardInterrupt
        return on_progress
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_llama(), corpus(), config(save_every=2), work, on_progress=crash_after(5))
    weights = work / "checkpoints" / "step-00000004" / "model.safetensors"
    written = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    notices = []
    model, summary = train(tiny_llama(), corpus(), config(save_every=2), work, on_notice=notices.append)
    assert summary.resumed_from == 2
    assert notices == [(f"checkpoint step-00000004 is damaged (model.safetensors has {written - 100} bytes, "
                        f"{written} were written); passed over"),
                       "resuming from step-00000002"]
    assert summary.notices == notices
    assert weights_bytes(model) == weights_bytes(expected)
    assert [m["step"] for m in read_metrics(work / "metrics.jsonl")] == list(range(1, 7))


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_checkpoint(tmp_path):
    model = tiny_llama()

    def poison(progress):
        if progress.step == 3:
            with torch.no_grad():
                model.get_input_embeddings().weight[:] = math.nan
    with pytest.raises(TrainingError, match=r"loss became nan \(gradient norm nan\) at step 4") as caught:
        train(model, corpus(), config(save_every=2), tmp_path, on_progress=poison)
    assert "last good checkpoint" in caught.value.hint
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]
    # The checkpoint holds the weights from before the poisoning: a rerun resumes and finishes.
    _, summary = train(tiny_llama(), corpus(), config(save_every=2), tmp_path)
    assert summary.resumed_from == 2 and math.isfinite(summary.final_loss)


@pytest.mark.parametrize("settings, documents, message", [
    ({}, lambda: iter([Document([])]), "the corpus holds no tokens"),
    ({"steps": None, "tokens": 10**6}, corpus(), r"tokens=1000000 is more than the corpus holds \(\d+ tokens\)"),
    ({"steps": 1000}, corpus(), "steps=1000 at batch=4 needs 4000 sequences of 16 tokens; the corpus fills"),
    ({"seq_len": 512}, corpus(), "seq_len=512 is beyond the model's 128 positions"),
    ({"steps": 1, "batch": 1}, lambda: iter([Document([1, 2, VOCAB + 5])]), "token ids beyond the model's vocabulary of 256"),
])
def test_bad_input_is_a_clear_error(tmp_path, settings, documents, message):
    with pytest.raises(TrainingError, match=message) as caught:
        train(tiny_llama(), documents, config(**settings), tmp_path)
    assert caught.value.hint


def test_a_finished_run_called_again_returns_at_once(tmp_path):
    _, first = train(tiny_llama(), corpus(), config(steps=2, save_every=2), tmp_path)
    _, again = train(tiny_llama(), corpus(), config(steps=2, save_every=2), tmp_path)
    assert (again.resumed_from, again.steps, again.final_loss) == (2, 2, first.final_loss)
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2


def test_a_work_directory_from_other_settings_is_refused(tmp_path):
    train(tiny_llama(), corpus(), config(steps=2, save_every=2), tmp_path)
    with pytest.raises(TrainingError, match="saved by a run with other settings"):
        train(tiny_llama(), corpus(), config(steps=2, save_every=2, lr=1e-4), tmp_path)


# --- resume after SIGKILL ------------------------------------------------------------------------------

RESUME_STEPS, RESUME_SAVE_EVERY, KILL_AT = 7, 2, 5


def _resume_config() -> TrainConfig:
    return config(steps=RESUME_STEPS, save_every=RESUME_SAVE_EVERY, micro_batch=2)


def _script_env(**extra: str) -> dict[str, str]:
    source = str(Path(__file__).parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]), **extra}


def _killed_run(work: Path, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, "killed", str(work), str(kill_at)], env=_script_env(),
                          capture_output=True, text=True, timeout=300, check=False)


def test_a_killed_run_resumes_to_the_same_bytes(tmp_path):
    killed = _killed_run(tmp_path / "work", kill_at=KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "work" / "checkpoints" / "step-00000004").is_dir()
    assert [m["step"] for m in read_metrics(tmp_path / "work" / "metrics.jsonl")] == list(range(1, KILL_AT + 1))

    resumed, summary = train(tiny_llama(seed=7), corpus(), _resume_config(), tmp_path / "work")
    uninterrupted, _ = train(tiny_llama(), corpus(), _resume_config(), tmp_path / "uninterrupted")
    assert summary.resumed_from == 4  # and not the seed-7 weights it was handed
    assert weights_bytes(resumed) == weights_bytes(uninterrupted)
    steps = [m["step"] for m in read_metrics(tmp_path / "work" / "metrics.jsonl")]
    assert steps == list(range(1, RESUME_STEPS + 1))


# --- two processes ------------------------------------------------------------------------------------

def _pair_config() -> TrainConfig:
    return config(steps=4, batch=4, micro_batch=1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_match_one_with_doubled_accumulation(tmp_path):
    port = str(_free_port())
    workers = [subprocess.Popen([sys.executable, __file__, "pair", str(tmp_path / "pair")], env=_script_env(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outcomes = [worker.communicate(timeout=300) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], outcomes
    assert "world 2" in outcomes[0][0]

    train(tiny_llama(), corpus(), _pair_config(), tmp_path / "single")
    pair = read_metrics(tmp_path / "pair" / "metrics.jsonl")
    single = read_metrics(tmp_path / "single" / "metrics.jsonl")
    assert [m["step"] for m in pair] == [1, 2, 3, 4]
    for two, one in zip(pair, single):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
        assert two["tokens"] == one["tokens"]


def _killed_script(work: Path, kill_at: int) -> None:
    def on_progress(progress):
        if progress.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    train(tiny_llama(), corpus(), _resume_config(), work, on_progress=on_progress)


def _pair_script(work: Path) -> None:
    from accelerate import PartialState

    train(tiny_llama(), corpus(), _pair_config(), work)
    print(f"world {PartialState().num_processes}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "killed":
        _killed_script(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        _pair_script(Path(sys.argv[2]))
