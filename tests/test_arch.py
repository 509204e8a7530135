"""recipec.arch checked against transformers itself: real saves for small configs, meta-device models for big ones."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from recipec import arch

# The copies save_pretrained leaves out when tie_word_embeddings is true.
TIED_COPIES = {"lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}


def build(config: dict, device: str = "cpu") -> torch.nn.Module:
    """The head model transformers builds from a config.json dict."""
    auto = AutoModelForMaskedLM if config["model_type"] == "bert" else AutoModelForCausalLM
    with torch.device(device):
        return auto.from_config(AutoConfig.for_model(**config))


def saved_tensors(model: torch.nn.Module, directory: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """save_pretrained the model and read back each tensor's shape and dtype from the safetensors header."""
    model.save_pretrained(directory)
    assert sorted(p.name for p in directory.glob("*.safetensors")) == ["model.safetensors"]
    with safe_open(directory / "model.safetensors", "pt") as f:
        return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}


def assert_signature_matches_save(config: dict, directory: Path) -> None:
    model = build(config)
    assert type(model).__name__ == config["architectures"][0]
    saved = saved_tensors(model, directory)
    shapes = arch.tensor_shapes(config)
    assert shapes == {name: shape for name, (shape, _) in saved.items()}
    # Same order as the model's state_dict, so a signature reads like the model.
    assert list(shapes) == [name for name in model.state_dict() if name in saved]
    assert {dtype for _, dtype in saved.values()} == {arch.config_dtype(config)}


def assert_signature_matches_meta(config: dict) -> None:
    state = {name: tuple(t.shape) for name, t in build(config, "meta").state_dict().items()}
    shapes = arch.tensor_shapes(config)
    assert shapes == {name: state[name] for name in shapes}
    assert set(state) - set(shapes) <= TIED_COPIES


def preset(arch_name: str, size: str = "tiny", **overrides) -> dict:
    return arch.preset_config(arch_name, size) | overrides


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("arch_name", arch.ARCHS)
def test_preset_signature_is_what_save_pretrained_writes(arch_name, size, tmp_path):
    assert_signature_matches_save(preset(arch_name, size), tmp_path)


@pytest.mark.parametrize(
    ("arch_name", "overrides", "head_tensors"),
    [
        ("llama", {"tie_word_embeddings": True}, set()),
        ("llama", {"tie_word_embeddings": False}, {"lm_head.weight"}),
        ("gpt2", {"tie_word_embeddings": False}, {"lm_head.weight"}),
        ("bert", {"tie_word_embeddings": False},
         {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}),
    ],
)
def test_tied_copies_are_not_saved(arch_name, overrides, head_tensors, tmp_path):
    config = preset(arch_name, **overrides)
    assert_signature_matches_save(config, tmp_path)
    assert set(arch.tensor_shapes(config)) & TIED_COPIES == head_tensors


@pytest.mark.parametrize(
    ("arch_name", "overrides"),
    [
        ("llama", {"head_dim": 32}),  # q/k/v/o widths follow head_dim, not hidden / heads
        ("llama", {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 1}),
        ("llama", {"dtype": "bfloat16"}),
        ("gpt2", {"n_inner": 100, "dtype": "float16"}),
        ("bert", {"type_vocab_size": 3}),
    ],
)
def test_config_variants_match_save(arch_name, overrides, tmp_path):
    assert_signature_matches_save(preset(arch_name, **overrides), tmp_path)


def test_custom_head_dim_shapes():
    shapes = arch.tensor_shapes(preset("llama", head_dim=32))
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (4 * 32, 64)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (2 * 32, 64)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (64, 4 * 32)


@pytest.mark.parametrize("size", ["base", "1b"])
@pytest.mark.parametrize("arch_name", arch.ARCHS)
def test_large_preset_signature_on_meta_device(arch_name, size):
    # The meta device gives the real modules' shapes without allocating a byte.
    assert_signature_matches_meta(preset(arch_name, size))


def test_known_parameter_counts():
    def count(arch_name, size):
        return arch.param_count(arch.tensor_shapes(arch.preset_config(arch_name, size)))

    assert count("llama", "1b") == 1_100_048_384  # TinyLlama-1.1B
    assert count("gpt2", "base") == 124_439_808  # GPT-2 small
    assert count("bert", "base") == 109_514_298  # bert-base-uncased as BertForMaskedLM
    assert 0.9e9 < count("gpt2", "1b") < 1.2e9
    assert 0.9e9 < count("bert", "1b") < 1.2e9
    for arch_name in arch.ARCHS:
        counts = [count(arch_name, size) for size in arch.SIZES]
        assert counts == sorted(counts) and counts[0] < 300_000


@pytest.mark.parametrize(
    "config",
    [
        # Only a model_type: every key takes the HF config class default (a 7B llama, GPT-2 small, bert-base).
        {"model_type": "llama"},
        {"model_type": "gpt2"},
        {"model_type": "bert"},
        # Nulls mean "derived", as in configs HF writes itself.
        {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
         "num_key_value_heads": None, "head_dim": None, "vocab_size": 100},
        # gpt2 accepts the generic key names as aliases of n_embd, n_layer, n_head and n_positions.
        {"model_type": "gpt2", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
         "max_position_embeddings": 32, "vocab_size": 100, "bos_token_id": 99, "eos_token_id": 99},
    ],
    ids=["llama-defaults", "gpt2-defaults", "bert-defaults", "llama-nulls", "gpt2-aliases"],
)
def test_partial_configs_use_hf_defaults(config):
    assert_signature_matches_meta(config)


@st.composite
def small_configs(draw):
    arch_name = draw(st.sampled_from(arch.ARCHS))
    heads = draw(st.sampled_from([1, 2, 4]))
    hidden = heads * draw(st.sampled_from([8, 16]))
    vocab = draw(st.integers(10, 300))
    config = {"model_type": arch_name, "vocab_size": vocab, "tie_word_embeddings": draw(st.booleans())}
    if arch_name == "llama":
        return config | {
            "hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": draw(st.integers(1, 3)),
            "num_key_value_heads": draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])),
            "head_dim": draw(st.sampled_from([None, 8, 24])), "intermediate_size": draw(st.integers(1, 100)),
            "attention_bias": draw(st.booleans()), "mlp_bias": draw(st.booleans()),
        }
    if arch_name == "gpt2":
        return config | {
            "n_embd": hidden, "n_head": heads, "n_layer": draw(st.integers(1, 3)),
            "n_inner": draw(st.sampled_from([None, 7, 50])), "n_positions": draw(st.integers(1, 64)),
            "bos_token_id": vocab - 1, "eos_token_id": vocab - 1,
        }
    return config | {
        "hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": draw(st.integers(1, 3)),
        "intermediate_size": draw(st.integers(1, 100)), "max_position_embeddings": draw(st.integers(1, 64)),
        "type_vocab_size": draw(st.integers(1, 3)), "pad_token_id": 0,
    }


@settings(max_examples=60, deadline=None)
@given(small_configs())
def test_random_configs_match_meta_model(config):
    assert_signature_matches_meta(config)


@pytest.mark.parametrize("size", arch.SIZES)
@pytest.mark.parametrize("arch_name", arch.ARCHS)
def test_preset_config_is_kept_by_transformers(arch_name, size):
    config = arch.preset_config(arch_name, size)
    written = AutoConfig.for_model(**config).to_dict()
    assert {key: written.get(key) for key in config} == config
    assert arch.config_dtype(config) == "F32"


def test_preset_config_returns_a_fresh_dict():
    arch.preset_config("llama", "tiny")["rope_parameters"]["rope_theta"] = 1.0
    assert arch.preset_config("llama", "tiny")["rope_parameters"]["rope_theta"] == 10000.0


def test_tiny_presets_are_tiny():
    for arch_name in arch.ARCHS:
        config = AutoConfig.for_model(**arch.preset_config(arch_name, "tiny"))
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
        assert config.vocab_size == 1024 and config.max_position_embeddings == 128
    assert arch.preset_config("llama", "tiny")["num_key_value_heads"] == 2


def test_tinyllama_shape():
    config = arch.preset_config("llama", "1b")
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                                   "num_key_value_heads", "vocab_size")} == {
        "hidden_size": 2048, "num_hidden_layers": 22, "intermediate_size": 5632, "num_attention_heads": 32,
        "num_key_value_heads": 4, "vocab_size": 32000}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch_name", arch.ARCHS)
def test_vocab_tensors_are_exactly_the_vocabulary_sized_ones(arch_name, tied):
    config = preset(arch_name, tie_word_embeddings=tied)
    shapes = arch.tensor_shapes(config)
    # The tiny vocabulary (1024) is no other dimension of the model, so the first dimension identifies them.
    assert set(arch.vocab_tensors(config)) == {name for name, shape in shapes.items() if shape[0] == 1024}
    expected = {("llama", True): 1, ("llama", False): 2, ("gpt2", True): 1, ("gpt2", False): 2,
                ("bert", True): 2, ("bert", False): 4}
    assert len(arch.vocab_tensors(config)) == expected[arch_name, tied]


@pytest.mark.parametrize("arch_name", arch.ARCHS)
def test_is_norm_tensor_finds_the_norm_modules(arch_name):
    model = build(preset(arch_name))
    norm_modules = [name for name, module in model.named_modules()
                    if isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")]
    expected = {f"{module}.{param}" for module in norm_modules for param in ("weight", "bias")}
    shapes = arch.tensor_shapes(preset(arch_name))
    assert {name for name in shapes if arch.is_norm_tensor(name)} == expected & set(shapes)
    assert len(expected & set(shapes)) == {"llama": 5, "gpt2": 10, "bert": 12}[arch_name]


def test_is_norm_tensor_examples():
    for name in ("model.norm.weight", "model.layers.3.input_layernorm.weight",
                 "model.layers.3.post_attention_layernorm.weight", "model.layers.0.self_attn.q_norm.weight",
                 "transformer.ln_f.bias", "transformer.h.1.ln_2.weight", "bert.embeddings.LayerNorm.weight"):
        assert arch.is_norm_tensor(name), name
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "transformer.h.0.mlp.c_fc.bias", "bert.encoder.layer.0.attention.output.dense.weight",
                 "cls.predictions.bias", "model.norm_proj.weight", "model.norm"):
        assert not arch.is_norm_tensor(name), name


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, "F32"),
        ({"dtype": "bfloat16"}, "BF16"),
        ({"torch_dtype": "float16"}, "F16"),
        ({"torch_dtype": "torch.bfloat16"}, "BF16"),
        ({"dtype": "float16", "torch_dtype": "float32"}, "F16"),
        ({"dtype": None, "torch_dtype": None}, "F32"),
    ],
)
def test_config_dtype(config, expected):
    assert arch.config_dtype(config) == expected


@pytest.mark.parametrize("value", ["auto", "int8", 16, {"text": "float16"}])
def test_config_dtype_rejects_unknown(value):
    with pytest.raises(ValueError, match="unsupported dtype"):
        arch.config_dtype({"dtype": value})


def test_preset_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown architecture 'mistral'.*llama, bert, gpt2"):
        arch.preset_config("mistral", "tiny")
    with pytest.raises(ValueError, match="unknown size 'huge'.*tiny, small, base, 1b"):
        arch.preset_config("llama", "huge")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "t5"}, "unsupported model_type 't5'"),
        ({}, "unsupported model_type None"),
        (preset("bert", architectures=["BertForSequenceClassification"]), "BertForMaskedLM only"),
        (preset("llama", quantization_config={"quant_method": "bitsandbytes"}), "quantized"),
        (preset("gpt2", add_cross_attention=True), "cross-attention"),
        (preset("llama", num_key_value_heads=3), "not a multiple of 3 key/value heads"),
        (preset("bert", hidden_size=66), "hidden size 66 is not a multiple of 4"),
        (preset("gpt2", n_embd=66), "hidden size 66 is not a multiple of 4"),
        (preset("llama", hidden_size=64.0), "hidden_size must be a positive integer"),
        (preset("llama", num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
        (preset("bert", vocab_size=True), "vocab_size must be a positive integer"),
        (preset("gpt2", tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
    ],
)
def test_tensor_shapes_rejects_what_it_cannot_describe(config, message):
    with pytest.raises(ValueError, match=message):
        arch.tensor_shapes(config)


def test_param_count():
    assert arch.param_count({"a": (2, 3), "b": (4,), "scalar": ()}) == 11
    assert arch.param_count({}) == 0


def test_import_does_not_load_heavy_libraries():
    src = str(Path(arch.__file__).parents[1])
    code = ("import sys, recipec.arch; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'safetensors') if m in sys.modules))")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"
