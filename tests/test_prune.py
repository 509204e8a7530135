"""`prune` from a user's side and in its math: every pruned output of llama, gpt2 and bert (with and without its
head) reloads with `import recipec` + transformers and runs; structured pruning equals zeroing the removed heads'
and neurons' output columns; magnitude pruning zeroes exactly the smallest weights with a threshold that does
not depend on threads; N:M patterns hold; chains with the chat vector work one way and are refused the other.

One recipe holds every pruned model, so the workers start once for the module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from helpers import run_cli, safetensors_bytes, write_model
from safetensors.torch import load_file

import recipec  # noqa: F401  (registers recipec's model classes)
from recipec.arch import preset_config
from recipec.backends.prune import keep_n_of_m, kth_magnitude
from recipec.cli import main
from recipec.ops.prune import LAYER_WEIGHT

EXAMPLES = Path(__file__).parents[1] / "examples"

RECIPE = """recipec 1
llama = init("llama", size="tiny", seed=1, tokenizer="tokenizers/llama-chat")
gpt2 = init("gpt2", size="tiny", seed=1)
bert = init("bert", size="tiny", seed=1)
bert_tok = init("bert", size="tiny", seed=2, tokenizer="tokenizers/llama-chat")
encoder = load("models/encoder")
corpus = text("data/tiny_corpus.jsonl")
export llama to "out/llama"
export gpt2 to "out/gpt2"
export bert to "out/bert"
export prune(llama, heads=0.5) to "out/llama_heads"
export prune(llama, ffn=0.25) to "out/llama_ffn"
export prune(llama, heads=0, ffn=0) to "out/llama_zero"
export prune(llama, heads=0.5, ffn=0.5, score="gradient", data=corpus, uniform=false, seq_len=16) to "out/llama_grad"
export prune(gpt2, heads=0.25, ffn=0.5) to "out/gpt2_pruned"
export prune(gpt2, heads=0.5, uniform=false) to "out/gpt2_global"
export prune(bert, heads=0.5, ffn=0.5) to "out/bert_pruned"
export bert_tok to "out/bert_tok"
export prune(bert_tok, heads=0.25, ffn=0.25, score="gradient", data=corpus, seq_len=16) to "out/bert_grad"
export prune(bert, sparsity=0.5, pattern="2:4") to "out/bert_2_4"
export prune(encoder, heads=0.25, ffn=0.25) to "out/encoder_pruned"
export prune(llama, sparsity=0.3) to "out/llama_sparse"
export prune(llama, sparsity=0.5, pattern="4:8") to "out/llama_4_8"
export prune(gpt2, sparsity=0.5, scope="layer") to "out/gpt2_layer"
"""

HEAD_OUTPUT = {"llama": ("self_attn.o_proj.weight", 1), "gpt2": ("attn.c_proj.weight", 0),
               "bert": ("attention.output.dense.weight", 1)}
FFN_OUTPUT = {"llama": ("mlp.down_proj.weight", 1), "gpt2": ("mlp.c_proj.weight", 0), "bert": ("output.dense.weight", 1)}
PREFIX = {"llama": "model.layers.{}.", "gpt2": "transformer.h.{}.", "bert": "bert.encoder.layer.{}."}


def _encoder(root: Path) -> None:
    """A headless BertModel as encoders are published: unprefixed names, a pooler."""
    config = transformers.BertConfig(**{k: v for k, v in preset_config("bert", "tiny").items()
                                        if k not in ("model_type", "architectures")})
    torch.manual_seed(3)
    transformers.BertModel(config).save_pretrained(root)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prune")
    for extra in ("tokenizers", "data"):
        shutil.copytree(EXAMPLES / extra, root / extra)
    _encoder(root / "models" / "encoder")
    (root / "prune.rcp").write_text(RECIPE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECIPEC_CACHE", str(root / "cache"))
        assert main(["run", str(root / "prune.rcp")]) == 0
    return root / "out"


def _load(folder: Path):
    config = json.loads((folder / "config.json").read_text())
    head = config["architectures"][0]
    headless = head.removeprefix("Recipec") in ("LlamaModel", "GPT2Model", "BertModel")
    auto = (transformers.AutoModel if headless else transformers.AutoModelForMaskedLM
            if "Masked" in head else transformers.AutoModelForCausalLM)
    return auto.from_pretrained(folder, attn_implementation="eager").eval(), config


def _outputs(model, ids):
    result = model(input_ids=ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@pytest.mark.parametrize("name", ["llama_heads", "llama_ffn", "llama_zero", "llama_grad", "gpt2_pruned", "bert_grad",
                                  "gpt2_global", "bert_pruned", "bert_2_4", "encoder_pruned", "llama_sparse",
                                  "llama_4_8", "gpt2_layer"])
def test_every_pruned_output_reloads_and_runs(out, name):
    model, config = _load(out / name)
    assert torch.isfinite(_outputs(model, torch.randint(5, 200, (2, 9)))).all()
    assert "auto_map" in config if config["model_type"].startswith("recipec_") else "auto_map" not in config
    assert (out / name / "modeling_recipec.py").is_file() == config["model_type"].startswith("recipec_")


def test_shapes_and_configs_say_what_was_removed(out):
    llama = json.loads((out / "llama_heads" / "config.json").read_text())
    assert (llama["model_type"], llama["num_attention_heads"], llama["num_key_value_heads"]) == ("llama", 2, 1)
    gpt2 = json.loads((out / "gpt2_pruned" / "config.json").read_text())
    assert gpt2["model_type"] == "recipec_gpt2" and gpt2["recipec_heads"] == [3, 3]
    assert gpt2["recipec_intermediate"] == [64, 64]
    grad = json.loads((out / "llama_grad" / "config.json").read_text())
    assert sum(grad["recipec_kv_heads"]) == 2 and sum(grad["recipec_intermediate"]) == 128
    assert all(h == 2 * kv for h, kv in zip(grad["recipec_heads"], grad["recipec_kv_heads"]))  # GQA ratio kept
    weights = load_file(str(out / "llama_heads" / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (32, 64)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (16, 64)
    encoder = load_file(str(out / "encoder_pruned" / "model.safetensors"))
    assert encoder["encoder.layer.0.attention.self.query.weight"].shape == (48, 64)
    assert "pooler.dense.weight" in encoder


def test_zero_fractions_change_no_tensor_byte(out):
    before = load_file(str(out / "llama" / "model.safetensors"))
    after = load_file(str(out / "llama_zero" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(before[n].numpy().tobytes() == after[n].numpy().tobytes() for n in before)


def _kept(original: torch.Tensor, pruned: torch.Tensor, dim: int) -> list[int]:
    """Which slices of `original` along `dim` survive in `pruned` (random weights: matched exactly)."""
    slices = [original.select(dim, i) for i in range(original.shape[dim])]
    return [next(i for i, s in enumerate(slices) if torch.equal(s, pruned.select(dim, j)))
            for j in range(pruned.shape[dim])]


@pytest.mark.parametrize("family, name, base", [("llama", "llama_heads", "llama"), ("llama", "llama_ffn", "llama"),
                                                ("llama", "llama_grad", "llama"),
                                                ("gpt2", "gpt2_pruned", "gpt2"), ("bert", "bert_pruned", "bert"),
                                                ("bert", "bert_grad", "bert_tok")])
def test_structured_pruning_equals_zeroing_the_removed_output_columns(out, family, name, base):
    original, config = _load(out / base)
    pruned, _ = _load(out / name)
    pruned_weights = load_file(str(out / name / "model.safetensors"))
    state = original.state_dict()
    with torch.no_grad():
        for i in range(config.get("num_hidden_layers") or config["n_layer"]):
            for suffix, dim in (HEAD_OUTPUT[family], FFN_OUTPUT[family]):
                tensor_name = PREFIX[family].format(i) + suffix
                kept = set(_kept(state[tensor_name], pruned_weights[tensor_name], dim))
                removed = [k for k in range(state[tensor_name].shape[dim]) if k not in kept]
                state[tensor_name].index_fill_(dim, torch.tensor(removed, dtype=torch.long), 0.0)
    ids = torch.randint(5, 200, (2, 11))
    assert torch.allclose(_outputs(original, ids), _outputs(pruned, ids), atol=1e-5)


def _targeted(weights: dict) -> list[str]:
    return sorted(n for n, t in weights.items() if t.dim() == 2 and LAYER_WEIGHT.search(n))


def test_global_magnitude_zeroes_exactly_the_smallest(out):
    before = load_file(str(out / "llama" / "model.safetensors"))
    after = load_file(str(out / "llama_sparse" / "model.safetensors"))
    names = _targeted(before)
    total = sum(before[n].numel() for n in names)
    zeroed = torch.cat([before[n][after[n] == 0].abs() for n in names])
    kept = torch.cat([before[n][after[n] != 0].abs() for n in names])
    assert zeroed.numel() == round(0.3 * total) and zeroed.max() <= kept.min()
    assert all(torch.equal(before[n], after[n]) for n in before if n not in names)  # embeddings, norms, head


def test_per_tensor_scope_prunes_each_tensor_to_the_fraction(out):
    after = load_file(str(out / "gpt2_layer" / "model.safetensors"))
    for name in _targeted(after):
        assert int((after[name] == 0).sum()) == round(0.5 * after[name].numel())


@pytest.mark.parametrize("name, n, m, conv1d", [("bert_2_4", 2, 4, False), ("llama_4_8", 4, 8, False)])
def test_n_of_m_pattern_holds(out, name, n, m, conv1d):
    after = load_file(str(out / name / "model.safetensors"))
    for tensor_name in _targeted(after):
        groups = after[tensor_name].reshape(-1, m)
        assert ((groups != 0).sum(1) <= n).all(), tensor_name


def test_n_of_m_runs_along_conv1d_inputs():
    weight = torch.randn(8, 6)  # Conv1D: (in, out)
    pruned = keep_n_of_m(weight, 2, 4, dim=0)
    groups, kept = weight.T.reshape(-1, 4), pruned.T.reshape(-1, 4)
    expected = torch.zeros_like(groups).scatter(1, groups.abs().topk(2, dim=1).indices, 1.0) * groups
    assert torch.equal(kept, expected)
    ties = keep_n_of_m(torch.tensor([[1.0, -1.0, 1.0, 1.0]]), 2, 4, dim=1)
    assert ties.tolist() == [[1.0, -1.0, 0.0, 0.0]]  # equal magnitudes: the earlier weights stay


def test_threshold_is_exact_and_the_same_at_any_thread_count():
    torch.manual_seed(0)
    tensors = [torch.randn(300, 257).to(torch.bfloat16), torch.randn(1000).to(torch.bfloat16)]  # many ties
    k = 40_000
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(kth_magnitude(lambda: iter(tensors), k))
    torch.set_num_threads(1)
    assert results[0] == results[1]
    threshold, ties = results[0]
    magnitudes = torch.cat([t.float().abs().reshape(-1) for t in tensors])
    value = torch.tensor([threshold], dtype=torch.int32).view(torch.float32)
    assert value == magnitudes.sort().values[k - 1]
    assert int((magnitudes < value).sum()) + ties == k


def test_chat_vector_then_prune_then_export_and_the_design_card_line(tmp_path, capsys):
    for extra in ("tokenizers", "data"):
        shutil.copytree(EXAMPLES / extra, tmp_path / extra)
    (tmp_path / "card.rcp").write_text(
        'recipec 1\n'
        'base = init("llama", size="tiny", seed=1, tokenizer="tokenizers/llama-chat")\n'
        'chat = init("llama", size="tiny", seed=2, tokenizer="tokenizers/llama-chat")\n'
        'corpus = text("data/tiny_corpus.jsonl")\n'
        'model = prune(cp(base, corpus, steps=2, seq_len=32, batch=2, lr=3e-3) + 0.8*(chat - base), heads=0.5)\n'
        'export model to "out/model"\n')
    for verb in ("check", "plan"):
        status, stdout, _ = run_cli([verb, tmp_path / "card.rcp"], capsys)
        assert status == 0
    assert "prune → Model[llama]" in stdout
    status, _, _ = run_cli(["run", tmp_path / "card.rcp"], capsys)
    assert status == 0
    model, config = _load(tmp_path / "out" / "model")
    assert config["num_attention_heads"] == 2 and model(torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 1024)


def test_prune_then_chat_vector_is_a_signature_error(tmp_path, capsys):
    (tmp_path / "bad.rcp").write_text(
        'recipec 1\nbase = init("llama", size="tiny", seed=1)\nchat = init("llama", size="tiny", seed=2)\n'
        'model = prune(base, heads=0.5) + 0.8*(chat - base)\nexport model to "out/model"\n')
    status, _, stderr = run_cli(["check", tmp_path / "bad.rcp"], capsys)
    assert status == 65 and "E303" in stderr and "self_attn.k_proj.weight` has shape [16, 64] vs [32, 64]" in stderr


def test_bad_inputs_are_located_errors_with_hints(tmp_path, capsys):
    write_model(tmp_path / "odd", preset_config("llama", "tiny") | {"intermediate_size": 100})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 10}))
    (tmp_path / "other" / "model.safetensors").write_bytes(safetensors_bytes({"shared.weight": ("F32", (10, 4))}))
    cases = {
        'prune(odd, sparsity=0.5, pattern="4:8")': ("E451", "mlp.down_proj.weight"),
        "prune(odd, heads=0.25)": ("E452", "valid fractions: 0, 0.5"),
        "prune(odd, ffn=0.999)": ("E453", "remove all"),
        "prune(other, heads=0.5)": ("E455", "llama"),
        "prune(lowrank(odd, ratio=0.5), ffn=0.5)": ("E455", "prune heads and neurons before `lowrank`"),
        "prune(odd)": ("E456", "sparsity="),
        'prune(odd, sparsity=0.5, targets=["nothing.*"])': ("E457", "targets"),
        'prune(odd, heads=0.5, score="gradient")': ("E454", "data="),
        "prune(odd, sparsity=1.0)": ("E450", "[0, 1)"),
    }
    for call, (code, text) in cases.items():
        (tmp_path / "r.rcp").write_text(f'recipec 1\nodd = load("odd")\nother = load("other")\nm = {call}\n'
                                        'export m to "out/m"\n')
        status, _, stderr = run_cli(["check", tmp_path / "r.rcp"], capsys)
        assert status == 65 and code in stderr and text in stderr and "hint:" in stderr, (call, stderr)


def test_gradient_scores_need_the_models_tokenizer(tmp_path, capsys):
    shutil.copytree(EXAMPLES / "data", tmp_path / "data")
    (tmp_path / "r.rcp").write_text('recipec 1\ngpt2 = init("gpt2", size="tiny", seed=1)\n'
                                    'm = prune(gpt2, heads=0.5, score="gradient", data=text("data/tiny_corpus.jsonl"))\n'
                                    'export m to "out/m"\n')
    status, _, stderr = run_cli(["run", tmp_path / "r.rcp"], capsys)
    assert status == 1 and "error[E590]: gradient scores need the model's tokenizer" in stderr


def test_a_heads_fraction_rounds_to_whole_heads_only_when_near():
    from recipec.arch import ArchFacts
    from recipec.ops.prune import heads_removed, rounding_note

    llama2 = ArchFacts(layers=2, hidden=4096, heads=(32, 32), kv_heads=(32, 32), head_dim=128,
                       intermediate=(11008, 11008), vocab=32000, tied=False)
    assert heads_removed(llama2, 0.3) == [10, 10]  # the design card's heads=0.3: 10 of 32 (0.3125)
    assert rounding_note(llama2, 0.3, [10, 10]) == "heads=0.3 removes whole heads: 10 of 32 heads = 0.3125 in every layer"
    assert rounding_note(llama2, 0.25, heads_removed(llama2, 0.25)) is None
    gqa = ArchFacts(layers=1, hidden=64, heads=(4,), kv_heads=(2,), head_dim=16, intermediate=(128,), vocab=8,
                    tied=False)
    assert "valid fractions: 0, 0.5" in heads_removed(gqa, 0.25)  # one of two groups is not "a quarter"
    assert "would leave it empty" in heads_removed(gqa, 0.99)
