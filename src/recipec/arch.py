"""Architecture knowledge, without torch: config presets and the tensors a config implies.

`init(arch, size)` in a recipe makes a randomly initialised model from an HF config preset. The planner must
know that model's signature — every tensor name, shape and dtype — to check and cost a recipe, and
`recipec plan` must never import torch or build a model. So this module keeps that knowledge as plain data
and arithmetic: the `config.json` presets, and the exact tensors `save_pretrained` writes for a config.
It imports only the standard library (and recipec.modeling's torch-free config convention, for pruned and
low-rank `recipec_*` configs).

Each architecture has one head class, the one `init` builds: llama -> LlamaForCausalLM, gpt2 -> GPT2LMHeadModel,
bert -> BertForMaskedLM (a masked-LM head and no pooler, as in the published bert-base checkpoints).
`tensor_shapes` also describes each family's headless base class (LlamaModel, GPT2Model, BertModel with its
pooler), whose tensor names lack the base-model prefix.

What `save_pretrained` writes (checked against transformers 5.24 by tests/test_arch.py):
- With `tie_word_embeddings` true it omits the tied copies: `lm_head.weight` for llama and gpt2, and for bert
  both `cls.predictions.decoder.weight` and `cls.predictions.decoder.bias`; the latter is tied to
  `cls.predictions.bias` by the same flag, so an untied bert saves three vocabulary-sized head tensors.
- gpt2 uses Conv1D, whose weight is stored (in_features, out_features): transposed against nn.Linear.
- No buffers are saved (rotary `inv_freq`, gpt2's causal mask, bert's `position_ids` are non-persistent).

Presets, all float32; parameters counted as saved (tied weights once). tiny and small are for tests and CPU
runs; every llama preset uses grouped-query attention (kv < heads).

    arch   size   hidden  layers  heads  kv  inter   vocab  positions     parameters
    llama  tiny       64       2      4   2    128    1024        128        205,120
    llama  small     256       4      4   2    688    8192        512      7,096,576
    llama  base      768      12     12   4   2048   32000       2048    124,668,672
    llama  1b       2048      22     32   4   5632   32000       2048  1,100,048,384
    gpt2   tiny       64       2      4   4    128    1024        128        140,800
    gpt2   small     256       4      4   4   1024    8192        512      5,387,776
    gpt2   base      768      12     12  12   3072   50257       1024    124,439,808
    gpt2   1b       2048      20     16  16   8192   50257       1024  1,112,193,024
    bert   tiny       64       2      4   4    128    1024        128        146,240
    bert   small     256       4      4   4   1024    8192        512      5,462,784
    bert   base      768      12     12  12   3072   30522        512    109,514,298
    bert   1b       2048      20     16  16   8192   30522        512  1,074,962,234

llama 1b is TinyLlama-1.1B's shape; gpt2 base is GPT-2 small and bert base is bert-base-uncased (as
BertForMaskedLM), exactly. The gpt2 and bert 1b shapes are synthetic (20 layers, 16 heads of 128) to land near
1B: published GPT-2 sizes jump from 774M (large) to 1.5B (xl), and BERT stops at 335M (large).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from . import modeling

ARCHS: tuple[str, ...] = ("llama", "bert", "gpt2")
SIZES: tuple[str, ...] = ("tiny", "small", "base", "1b")

# (hidden, layers, heads, kv_heads, intermediate, vocab, max_positions)
_LLAMA_PRESETS = {
    "tiny": (64, 2, 4, 2, 128, 1024, 128),
    "small": (256, 4, 4, 2, 688, 8192, 512),
    "base": (768, 12, 12, 4, 2048, 32000, 2048),
    "1b": (2048, 22, 32, 4, 5632, 32000, 2048),
}
# (hidden, layers, heads, intermediate, vocab, max_positions); gpt2 and bert differ only in the vocabulary and
# context, which follow their published checkpoints from "base" up.
_GPT2_PRESETS = {
    "tiny": (64, 2, 4, 128, 1024, 128),
    "small": (256, 4, 4, 1024, 8192, 512),
    "base": (768, 12, 12, 3072, 50257, 1024),
    "1b": (2048, 20, 16, 8192, 50257, 1024),
}
_BERT_PRESETS = {
    "tiny": (64, 2, 4, 128, 1024, 128),
    "small": (256, 4, 4, 1024, 8192, 512),
    "base": (768, 12, 12, 3072, 30522, 512),
    "1b": (2048, 20, 16, 8192, 30522, 512),
}

_HEAD_CLASS = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM"}
# Headless checkpoints (encoders are often published as `BertModel`): the base model's tensors without the
# base-model prefix and without the head; BertModel adds its pooler.
_BASE_CLASS = {"llama": "LlamaModel", "gpt2": "GPT2Model", "bert": "BertModel"}
_BASE_PREFIX = {"llama": "model.", "gpt2": "transformer.", "bert": "bert."}

# The HF config classes' defaults for every key that shapes a tensor: a config.json may omit any of them.
# None means "derived" (kv heads = heads, head_dim = hidden / heads, n_inner = 4 * hidden).
_DEFAULTS = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None,
              "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False},
    "gpt2": {"vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024,
             "n_inner": None, "add_cross_attention": False, "tie_word_embeddings": True},
    "bert": {"vocab_size": 30522, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 512, "type_vocab_size": 2,
             "add_cross_attention": False, "tie_word_embeddings": True},
}
# GPT2Config.attribute_map: HF accepts the generic names as aliases of gpt2's own keys.
_ALIASES = {"gpt2": {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                     "n_positions": "max_position_embeddings"}}

# Candidates in state_dict order; vocab_tensors keeps those a config actually saves (tied copies are not).
_VOCAB_TENSORS = {
    "llama": ("model.embed_tokens.weight", "lm_head.weight"),
    "gpt2": ("transformer.wte.weight", "lm_head.weight"),
    "bert": ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias",
             "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
}

_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}

# The module owning a weight/bias is a norm when its name ends in "norm" (input_layernorm, norm, LayerNorm,
# q_norm, ...) or is gpt2's ln_1 / ln_2 / ln_f.
_NORM_TENSOR = re.compile(r"(?:^|\.)(?:\w*norm|ln_\w+)\.(?:weight|bias)$", re.IGNORECASE)


def preset_config(arch: str, size: str) -> dict:
    """A complete HF config.json dict for a random-init model of `arch` at preset `size`."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of: {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for {arch}; expected one of: {', '.join(SIZES)}")
    if arch == "llama":
        return _llama_config(*_LLAMA_PRESETS[size])
    if arch == "gpt2":
        return _gpt2_config(*_GPT2_PRESETS[size])
    return _bert_config(*_BERT_PRESETS[size])


def _llama_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                  positions: int) -> dict:
    return {
        "architectures": [_HEAD_CLASS["llama"]],
        "model_type": "llama",
        "dtype": "float32",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": positions,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "attention_bias": False,
        "mlp_bias": False,
        # Untied, like Llama 2 and TinyLlama: lm_head.weight is its own tensor.
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
    }


def _gpt2_config(hidden: int, layers: int, heads: int, intermediate: int, vocab: int, positions: int) -> dict:
    return {
        "architectures": [_HEAD_CLASS["gpt2"]],
        "model_type": "gpt2",
        "dtype": "float32",
        "vocab_size": vocab,
        "n_embd": hidden,
        "n_layer": layers,
        "n_head": heads,
        "n_inner": intermediate,
        "n_positions": positions,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        # GPT-2 ties lm_head to wte, so save_pretrained writes no lm_head.weight.
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        # GPT-2's <|endoftext|> is its last token; keep it inside a preset's smaller vocabulary.
        "bos_token_id": vocab - 1,
        "eos_token_id": vocab - 1,
        "pad_token_id": None,
    }


def _bert_config(hidden: int, layers: int, heads: int, intermediate: int, vocab: int, positions: int) -> dict:
    return {
        "architectures": [_HEAD_CLASS["bert"]],
        "model_type": "bert",
        "dtype": "float32",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "max_position_embeddings": positions,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        # The MLM decoder (weight and bias) is tied to the word embeddings and cls.predictions.bias.
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "pad_token_id": 0,
    }


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape `save_pretrained` writes for `config`, in state_dict order."""
    facts = facts_from_config(config)
    shapes = tensor_shapes_from_facts(config.get("model_type"), facts)
    if is_headless(config):
        shapes = _headless_shapes(modeling.family(config["model_type"]), shapes, facts.hidden)
    return with_low_rank(shapes, config.get("recipec_low_rank") or {}, config.get("model_type"))


def is_headless(config: dict) -> bool:
    """Whether a config names its family's base model class (no task head, unprefixed tensor names)."""
    fam = modeling.family(config.get("model_type"))
    names = modeling.stock_config(config).get("architectures")
    return fam is not None and names == [_BASE_CLASS[fam]]


def _headless_shapes(fam: str, shapes: dict[str, tuple[int, ...]], hidden: int) -> dict[str, tuple[int, ...]]:
    prefix = _BASE_PREFIX[fam]
    out = {name.removeprefix(prefix): shape for name, shape in shapes.items() if name.startswith(prefix)}
    if fam == "bert":
        out |= _linear("pooler.dense", hidden, hidden, True)
    return out


def with_low_rank(shapes: dict[str, tuple[int, ...]], ranks: dict[str, int],
                  model_type: str) -> dict[str, tuple[int, ...]]:
    """`shapes` with each linear named in `ranks` (module path -> rank) stored as two factors, as recipec's
    model classes do: `<path>.a.weight` (rank, in), `<path>.b.weight` (out, rank), `<path>.b.bias`."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        path, _, leaf = name.rpartition(".")
        rank = ranks.get(path)
        if rank is None:
            out[name] = shape
        elif leaf == "weight":
            out_features, in_features = shape[::-1] if model_type.endswith("gpt2") else shape
            out[f"{path}.a.weight"] = (rank, in_features)
            out[f"{path}.b.weight"] = (out_features, rank)
        else:
            out[f"{path}.b.bias"] = shape
    return out


@dataclass(frozen=True)
class ArchFacts:
    """What a config says about a model's shape, per layer where layers may differ (pruned models).

    Read from config.json alone (`facts_from_config`); ops that change shapes derive their output's facts
    with `with_heads`, `with_intermediate` and `with_layers`, and its tensors with `tensor_shapes_from_facts`.
    """

    layers: int
    hidden: int
    heads: tuple[int, ...]  # query heads, per layer
    kv_heads: tuple[int, ...]  # key/value heads, per layer (= heads without grouped-query attention)
    head_dim: int
    intermediate: tuple[int, ...]  # FFN width, per layer
    vocab: int
    tied: bool  # the output projection is the input embedding
    positions: int | None = None  # learned position embeddings (gpt2, bert); None: rotary (llama)
    type_vocab: int | None = None  # bert's token types
    attention_bias: bool = False  # llama's q/k/v/o biases (gpt2 and bert always have them)
    mlp_bias: bool = False

    def with_heads(self, heads: tuple[int, ...], kv_heads: tuple[int, ...] | None = None) -> ArchFacts:
        """These facts with `heads` query heads per layer; key/value heads keep each layer's group size
        (queries per key/value head) unless given. Raises ValueError for a layer left without heads or a
        count that breaks its groups."""
        heads = self._per_layer("heads", heads)
        if kv_heads is None:
            groups = [h // kv for h, kv in zip(self.heads, self.kv_heads)]
            for i, (h, g) in enumerate(zip(heads, groups)):
                if h % g:
                    raise ValueError(f"layer {i}: {h} heads do not fill groups of {g} queries per key/value head")
            kv_heads = tuple(h // g for h, g in zip(heads, groups))
        kv_heads = self._per_layer("kv_heads", kv_heads)
        for i, (h, kv) in enumerate(zip(heads, kv_heads)):
            if h % kv:
                raise ValueError(f"layer {i}: {h} heads are not a multiple of {kv} key/value heads")
        return replace(self, heads=heads, kv_heads=kv_heads)

    def with_intermediate(self, intermediate: tuple[int, ...]) -> ArchFacts:
        """These facts with an FFN width per layer."""
        return replace(self, intermediate=self._per_layer("intermediate", intermediate))

    def with_layers(self, kept: tuple[int, ...]) -> ArchFacts:
        """These facts with only the layers `kept` (indices into the current layers, in order)."""
        if not kept or list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= self.layers:
            raise ValueError(f"keep distinct layers in increasing order, within 0..{self.layers - 1}; got {list(kept)}")
        pick = lambda values: tuple(values[i] for i in kept)  # noqa: E731
        return replace(self, layers=len(kept), heads=pick(self.heads), kv_heads=pick(self.kv_heads),
                       intermediate=pick(self.intermediate))

    @property
    def uniform(self) -> bool:
        """Whether every layer has the same heads and width (a shape stock transformers can load)."""
        return len({*zip(self.heads, self.kv_heads, self.intermediate)}) <= 1

    def _per_layer(self, what: str, values) -> tuple[int, ...]:
        values = tuple(values)
        if len(values) != self.layers:
            raise ValueError(f"{what}: {len(values)} values for {self.layers} layers")
        if any(type(v) is not int or v <= 0 for v in values):
            raise ValueError(f"{what}: every layer needs a positive count, got {list(values)}")
        return values


def facts_from_config(config: dict) -> ArchFacts:
    """The shape facts of a llama, gpt2 or bert config.json (defaults filled in as transformers does).
    Raises ValueError for a config recipec has no tensor table for."""
    if str(config.get("model_type")).startswith(modeling.PREFIX):
        return _recipec_facts(config)
    model_type, s = _settings(config)
    if model_type == "llama":
        hidden, heads = s["hidden_size"], s["num_attention_heads"]
        _check_heads(hidden, heads, "llama")
        kv = s["num_key_value_heads"] or heads
        if heads % kv:
            raise ValueError(f"llama config: {heads} attention heads are not a multiple of {kv} key/value heads")
        layers = s["num_hidden_layers"]
        return ArchFacts(layers, hidden, (heads,) * layers, (kv,) * layers, s["head_dim"] or hidden // heads,
                         (s["intermediate_size"],) * layers, s["vocab_size"], s["tie_word_embeddings"],
                         attention_bias=s["attention_bias"], mlp_bias=s["mlp_bias"])
    if model_type == "gpt2":
        hidden, heads, layers = s["n_embd"], s["n_head"], s["n_layer"]
        _check_heads(hidden, heads, "gpt2")
        return ArchFacts(layers, hidden, (heads,) * layers, (heads,) * layers, hidden // heads,
                         (s["n_inner"] or 4 * hidden,) * layers, s["vocab_size"], s["tie_word_embeddings"],
                         positions=s["n_positions"])
    hidden, heads, layers = s["hidden_size"], s["num_attention_heads"], s["num_hidden_layers"]
    _check_heads(hidden, heads, "bert")
    return ArchFacts(layers, hidden, (heads,) * layers, (heads,) * layers, hidden // heads,
                     (s["intermediate_size"],) * layers, s["vocab_size"], s["tie_word_embeddings"],
                     positions=s["max_position_embeddings"], type_vocab=s["type_vocab_size"])


def _recipec_facts(config: dict) -> ArchFacts:
    # A recipec_* config is its family's stock geometry with per-layer counts (see recipec.modeling).
    facts = facts_from_config(modeling.stock_config(config))
    try:
        if config.get("recipec_heads") is not None:
            facts = facts.with_heads(tuple(config["recipec_heads"]), config.get("recipec_kv_heads")
                                     and tuple(config["recipec_kv_heads"]))
        if config.get("recipec_intermediate") is not None:
            facts = facts.with_intermediate(tuple(config["recipec_intermediate"]))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config['model_type']} config: {err}") from None
    return facts


def tensor_shapes_from_facts(model_type: str, facts: ArchFacts) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a `model_type` model with these facts, in state_dict order: what
    `save_pretrained` writes for a stock config, and what a shape-changing op writes for derived facts."""
    shapes = {"llama": _llama_shapes, "gpt2": _gpt2_shapes, "bert": _bert_shapes}.get(modeling.family(model_type))
    if shapes is None:
        raise ValueError(f"unsupported model_type {model_type!r}; recipec knows the tensors of: "
                         f"{', '.join(sorted(_DEFAULTS))}")
    return shapes(facts)


def _settings(config: dict) -> tuple[str, dict]:
    """The config's model_type and its shape-determining keys, defaults filled in and validated."""
    model_type = config.get("model_type")
    if model_type not in _DEFAULTS:
        raise ValueError(f"unsupported model_type {model_type!r}; recipec knows the tensors of: "
                         f"{', '.join(sorted(_DEFAULTS))}")
    architectures = config.get("architectures")
    if architectures is not None and (not isinstance(architectures, list) or architectures not in
                                      ([_HEAD_CLASS[model_type]], [_BASE_CLASS[model_type]])):
        raise ValueError(f"{model_type} config names architectures {architectures!r}; recipec knows the "
                         f"tensors of {_BASE_CLASS[model_type]} and {_HEAD_CLASS[model_type]} only")
    if config.get("quantization_config") is not None:
        raise ValueError(f"{model_type} config is quantized; recipec knows the tensors of unquantized models only")
    settings = {}
    for key, default in _DEFAULTS[model_type].items():
        alias = _ALIASES.get(model_type, {}).get(key)
        value = config.get(key, config.get(alias) if alias else None)
        settings[key] = default if value is None else value
    for key, value in settings.items():
        if isinstance(_DEFAULTS[model_type][key], bool):
            if not isinstance(value, bool):
                raise ValueError(f"{model_type} config: {key} must be true or false, got {value!r}")
        elif value is not None and (type(value) is not int or value <= 0):
            raise ValueError(f"{model_type} config: {key} must be a positive integer, got {value!r}")
    if settings.get("add_cross_attention"):
        raise ValueError(f"{model_type} config has add_cross_attention; recipec knows the tensors of "
                         f"{_HEAD_CLASS[model_type]} without cross-attention only")
    return model_type, settings


def _check_heads(hidden: int, heads: int, model_type: str) -> None:
    # transformers refuses these configs when it builds the model (llama: already in the config class).
    if hidden % heads:
        raise ValueError(f"{model_type} config: hidden size {hidden} is not a multiple of "
                         f"{heads} attention heads")


def _linear(name: str, in_features: int, out_features: int, bias: bool) -> dict[str, tuple[int, ...]]:
    # nn.Linear stores its weight (out_features, in_features).
    shapes = {f"{name}.weight": (out_features, in_features)}
    if bias:
        shapes[f"{name}.bias"] = (out_features,)
    return shapes


def _conv1d(name: str, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    # transformers' Conv1D stores its weight (in_features, out_features), the transpose of nn.Linear.
    return {f"{name}.weight": (in_features, out_features), f"{name}.bias": (out_features,)}


def _layer_norm(name: str, size: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (size,), f"{name}.bias": (size,)}


def _llama_shapes(f: ArchFacts) -> dict[str, tuple[int, ...]]:
    hidden, d = f.hidden, f.head_dim
    shapes = {"model.embed_tokens.weight": (f.vocab, hidden)}
    for i in range(f.layers):
        p = f"model.layers.{i}."
        heads, kv, inter = f.heads[i], f.kv_heads[i], f.intermediate[i]
        shapes |= _linear(p + "self_attn.q_proj", hidden, heads * d, f.attention_bias)
        shapes |= _linear(p + "self_attn.k_proj", hidden, kv * d, f.attention_bias)
        shapes |= _linear(p + "self_attn.v_proj", hidden, kv * d, f.attention_bias)
        shapes |= _linear(p + "self_attn.o_proj", heads * d, hidden, f.attention_bias)
        shapes |= _linear(p + "mlp.gate_proj", hidden, inter, f.mlp_bias)
        shapes |= _linear(p + "mlp.up_proj", hidden, inter, f.mlp_bias)
        shapes |= _linear(p + "mlp.down_proj", inter, hidden, f.mlp_bias)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not f.tied:
        shapes["lm_head.weight"] = (f.vocab, hidden)
    return shapes


def _gpt2_shapes(f: ArchFacts) -> dict[str, tuple[int, ...]]:
    hidden = f.hidden
    shapes = {"transformer.wte.weight": (f.vocab, hidden), "transformer.wpe.weight": (f.positions, hidden)}
    for i in range(f.layers):
        p = f"transformer.h.{i}."
        attention = f.heads[i] * f.head_dim
        shapes |= _layer_norm(p + "ln_1", hidden)
        shapes |= _conv1d(p + "attn.c_attn", hidden, 3 * attention)
        shapes |= _conv1d(p + "attn.c_proj", attention, hidden)
        shapes |= _layer_norm(p + "ln_2", hidden)
        shapes |= _conv1d(p + "mlp.c_fc", hidden, f.intermediate[i])
        shapes |= _conv1d(p + "mlp.c_proj", f.intermediate[i], hidden)
    shapes |= _layer_norm("transformer.ln_f", hidden)
    if not f.tied:
        shapes["lm_head.weight"] = (f.vocab, hidden)
    return shapes


def _bert_shapes(f: ArchFacts) -> dict[str, tuple[int, ...]]:
    hidden, vocab = f.hidden, f.vocab
    shapes = {
        "bert.embeddings.word_embeddings.weight": (vocab, hidden),
        "bert.embeddings.position_embeddings.weight": (f.positions, hidden),
        "bert.embeddings.token_type_embeddings.weight": (f.type_vocab, hidden),
    }
    shapes |= _layer_norm("bert.embeddings.LayerNorm", hidden)
    for i in range(f.layers):
        p = f"bert.encoder.layer.{i}."
        attention, inter = f.heads[i] * f.head_dim, f.intermediate[i]
        shapes |= _linear(p + "attention.self.query", hidden, attention, True)
        shapes |= _linear(p + "attention.self.key", hidden, attention, True)
        shapes |= _linear(p + "attention.self.value", hidden, attention, True)
        shapes |= _linear(p + "attention.output.dense", attention, hidden, True)
        shapes |= _layer_norm(p + "attention.output.LayerNorm", hidden)
        shapes |= _linear(p + "intermediate.dense", hidden, inter, True)
        shapes |= _linear(p + "output.dense", inter, hidden, True)
        shapes |= _layer_norm(p + "output.LayerNorm", hidden)
    # The prediction head's own bias parameter comes before its submodules in state_dict order.
    shapes["cls.predictions.bias"] = (vocab,)
    shapes |= _linear("cls.predictions.transform.dense", hidden, hidden, True)
    shapes |= _layer_norm("cls.predictions.transform.LayerNorm", hidden)
    if not f.tied:
        shapes |= _linear("cls.predictions.decoder", hidden, vocab, True)
    return shapes


def config_dtype(config: dict) -> str:
    """The safetensors dtype ("F32", "BF16", "F16", "F64") of a config's `dtype` (or legacy `torch_dtype`)."""
    value = config.get("dtype") or config.get("torch_dtype") or "float32"
    # Old configs may spell it "torch.float16".
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    if name not in _SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported dtype {value!r}; expected one of: {', '.join(_SAFETENSORS_DTYPES)}")
    return _SAFETENSORS_DTYPES[name]


def vocab_tensors(config: dict) -> tuple[str, ...]:
    """Names of the saved tensors whose first dimension is the vocabulary (embeddings and LM-head rows)."""
    shapes = tensor_shapes(config)
    return tuple(name for name in _VOCAB_TENSORS[modeling.family(config["model_type"])] if name in shapes)


def is_norm_tensor(name: str) -> bool:
    """True for the weight or bias of a LayerNorm or RMSNorm module."""
    return _NORM_TENSOR.search(name) is not None


def param_count(shapes: dict[str, tuple[int, ...]]) -> int:
    """The number of scalars in a name -> shape mapping."""
    return sum(math.prod(shape) for shape in shapes.values())
