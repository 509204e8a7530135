"""Config facts in the signature: read from config.json alone; per-layer variants (what pruning and layer
dropping will produce) give the tensors transformers builds for each layer's values."""

from __future__ import annotations

import pytest

from helpers import write_model
from recipec import arch
from recipec.arch import ArchFacts, facts_from_config, tensor_shapes_from_facts
from recipec.check import lower_file


@pytest.mark.parametrize("model_type", arch.ARCHS)
@pytest.mark.parametrize("size", arch.SIZES)
def test_stock_facts_give_the_stock_tensor_table(model_type, size):
    config = arch.preset_config(model_type, size)
    facts = facts_from_config(config)
    assert tensor_shapes_from_facts(model_type, facts) == arch.tensor_shapes(config)
    assert facts.uniform and len(facts.heads) == len(facts.intermediate) == facts.layers


def test_facts_read_from_a_llama_config():
    facts = facts_from_config(arch.preset_config("llama", "tiny"))
    assert facts == ArchFacts(layers=2, hidden=64, heads=(4, 4), kv_heads=(2, 2), head_dim=16,
                              intermediate=(128, 128), vocab=1024, tied=False)


def test_facts_fill_in_transformers_defaults():
    facts = facts_from_config({"model_type": "gpt2", "n_embd": 64, "n_layer": 3, "n_head": 4})
    assert (facts.intermediate, facts.head_dim, facts.positions, facts.tied) == ((256,) * 3, 16, 1024, True)


def test_heads_keep_their_groups_and_layers_keep_their_values():
    facts = facts_from_config(arch.preset_config("llama", "small"))  # 4 layers, 4 heads, 2 kv heads
    pruned = facts.with_heads((4, 2, 2, 4)).with_intermediate((688, 344, 344, 688))
    assert pruned.kv_heads == (2, 1, 1, 2) and not pruned.uniform
    kept = pruned.with_layers((0, 2))
    assert (kept.layers, kept.heads, kept.kv_heads, kept.intermediate) == (2, (4, 2), (2, 1), (688, 344))
    shapes = tensor_shapes_from_facts("llama", kept)
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (2 * 64, 256)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (1 * 64, 256)
    assert shapes["model.layers.1.self_attn.o_proj.weight"] == (256, 2 * 64)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (256, 344)
    assert "model.layers.2.mlp.up_proj.weight" not in shapes


@pytest.mark.parametrize("change, message", [
    (lambda f: f.with_heads((4, 0)), "positive"),
    (lambda f: f.with_heads((3, 4)), "groups of 2"),
    (lambda f: f.with_heads((4,)), "1 values for 2 layers"),
    (lambda f: f.with_heads((4, 4), kv_heads=(3, 2)), "not a multiple"),
    (lambda f: f.with_intermediate((128, -1)), "positive"),
    (lambda f: f.with_layers(()), "keep distinct layers"),
    (lambda f: f.with_layers((1, 0)), "increasing order"),
    (lambda f: f.with_layers((0, 2)), "within 0..1"),
])
def test_impossible_shapes_are_refused_with_a_reason(change, message):
    with pytest.raises(ValueError, match=message):
        change(facts_from_config(arch.preset_config("llama", "tiny")))


def _transformers_layer(model_type: str, config: dict, layer_prefix: str) -> dict[str, tuple[int, ...]]:
    """The shapes of layer 0 of the model transformers builds for `config` (names without the prefix)."""
    import torch
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config)
    auto = transformers.AutoModelForMaskedLM if model_type == "bert" else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(hf_config)
    prefix = layer_prefix.format(0)
    return {k[len(prefix):]: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefix)}


LAYER_PREFIX = {"llama": "model.layers.{}.", "gpt2": "transformer.h.{}.", "bert": "bert.encoder.layer.{}."}
INTERMEDIATE_KEY = {"llama": "intermediate_size", "gpt2": "n_inner", "bert": "intermediate_size"}


@pytest.mark.parametrize("model_type", arch.ARCHS)
def test_each_layer_of_a_per_layer_table_is_what_transformers_builds_for_its_values(model_type):
    """transformers has no per-layer shapes for these families, so each layer is held against a stock
    model built with that layer's values (llama: heads, kv heads and width; gpt2 and bert, whose head
    size is hidden/heads: width)."""
    config = arch.preset_config(model_type, "tiny")
    facts = facts_from_config(config).with_intermediate((128, 96))
    if model_type == "llama":
        facts = facts.with_heads((4, 2))
    table = tensor_shapes_from_facts(model_type, facts)
    for i in range(facts.layers):
        stock = dict(config, **{INTERMEDIATE_KEY[model_type]: facts.intermediate[i]})
        if model_type == "llama":
            stock.update(num_attention_heads=facts.heads[i], num_key_value_heads=facts.kv_heads[i],
                         head_dim=facts.head_dim)
        prefix = LAYER_PREFIX[model_type].format(i)
        ours = {k[len(prefix):]: v for k, v in table.items() if k.startswith(prefix)}
        assert ours == _transformers_layer(model_type, stock, LAYER_PREFIX[model_type]), (model_type, i)


def test_signatures_carry_the_facts_of_init_and_load(tmp_path):
    config = arch.preset_config("gpt2", "tiny")
    write_model(tmp_path / "models" / "g", config)
    (tmp_path / "r.rcp").write_text('recipec 1\na = init("llama", size="tiny", seed=1)\nb = load("models/g")\n'
                                    'd = init("llama", size="tiny", seed=2)\nc = 0.5*a + 0.5*d\nexport c to "out"\nexport b to "out2"\n')
    graph = lower_file(tmp_path / "r.rcp").graph
    by_op = {n.op: n.type.signature.facts for n in graph.nodes}
    assert by_op["init"] == by_op["combine"] == facts_from_config(arch.preset_config("llama", "tiny"))
    assert by_op["load"] == facts_from_config(config)
