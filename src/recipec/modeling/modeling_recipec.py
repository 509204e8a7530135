"""Model classes for shapes stock transformers cannot load: per-layer head counts and FFN widths, low-rank linears.

This file is self-contained (it imports only torch and transformers) because a release of a `recipec_*` model
carries a copy of it, so people without recipec can load the folder with `trust_remote_code=True`. recipec
registers the same classes with transformers' Auto classes when it is imported.

Each class is the stock class of its family, built from the stock config keys, then reshaped: per layer, the
attention projections and FFN linears are replaced by modules of the sizes the config's `recipec_*` keys give,
and the per-layer head counts the forward pass uses are set. The forward code itself is the stock one: it
splits projections by head size, so only the module sizes and (llama) the query-per-key/value ratio change.

Config keys (all optional; absent means "as the stock keys say"):
- `recipec_heads`: query heads per layer; `recipec_kv_heads` (llama): key/value heads per layer;
- `recipec_intermediate`: FFN width per layer;
- `recipec_low_rank`: {"<module path>": rank} with module paths as in `model.named_modules()`; that linear
  becomes `<path>.a` (rank x in_features, no bias) followed by `<path>.b` (out_features x rank, with the
  original's bias), nn.Linear layout even where the original was GPT-2's Conv1D.
Stock keys keep a geometry stock transformers accepts; they set the head size (llama: `head_dim`; gpt2 and
bert: hidden size / heads) and the layers' counts where no `recipec_*` list is given.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
)
from transformers.pytorch_utils import Conv1D


class LowRankLinear(nn.Module):
    """A linear map factored in two: x -> b(a(x)), with a: in -> rank (no bias) and b: rank -> out."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Linear(in_features, rank, bias=False)
        self.b = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x):
        return self.b(self.a(x))


def _per_layer(config, key: str, layers: int, default: int) -> list[int]:
    values = getattr(config, key, None)
    if values is None:
        return [default] * layers
    if len(values) != layers:
        raise ValueError(f"config {key} has {len(values)} values for {layers} layers")
    return list(values)


def _linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, has_bias) of an nn.Linear or a Conv1D."""
    if isinstance(module, Conv1D):
        return module.nx, module.nf, module.bias is not None
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    raise ValueError(f"recipec_low_rank names a {type(module).__name__}, not a linear layer")


def _apply_low_rank(model: nn.Module, config) -> None:
    for path, rank in (getattr(config, "recipec_low_rank", None) or {}).items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        in_features, out_features, bias = _linear_shape(getattr(parent, name))
        setattr(parent, name, LowRankLinear(in_features, out_features, int(rank), bias))


def _reshape_llama(base: nn.Module, config) -> None:
    layers = len(base.layers)
    heads = _per_layer(config, "recipec_heads", layers, config.num_attention_heads)
    kv_heads = _per_layer(config, "recipec_kv_heads", layers, config.num_key_value_heads)
    widths = _per_layer(config, "recipec_intermediate", layers, config.intermediate_size)
    hidden, d, attn_bias, mlp_bias = config.hidden_size, config.head_dim, config.attention_bias, config.mlp_bias
    for layer, h, kv, width in zip(base.layers, heads, kv_heads, widths):
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = nn.Linear(hidden, h * d, bias=attn_bias)
        attn.k_proj = nn.Linear(hidden, kv * d, bias=attn_bias)
        attn.v_proj = nn.Linear(hidden, kv * d, bias=attn_bias)
        attn.o_proj = nn.Linear(h * d, hidden, bias=attn_bias)
        attn.num_key_value_groups = h // kv
        mlp.gate_proj = nn.Linear(hidden, width, bias=mlp_bias)
        mlp.up_proj = nn.Linear(hidden, width, bias=mlp_bias)
        mlp.down_proj = nn.Linear(width, hidden, bias=mlp_bias)
        mlp.intermediate_size = width


def _reshape_gpt2(base: nn.Module, config) -> None:
    layers = len(base.h)
    heads = _per_layer(config, "recipec_heads", layers, config.n_head)
    widths = _per_layer(config, "recipec_intermediate", layers, config.n_inner or 4 * config.n_embd)
    hidden, d = config.n_embd, config.n_embd // config.n_head
    for block, h, width in zip(base.h, heads, widths):
        attn, mlp = block.attn, block.mlp
        attn.c_attn = Conv1D(3 * h * d, hidden)
        attn.c_proj = Conv1D(hidden, h * d)
        attn.num_heads, attn.split_size = h, h * d
        mlp.c_fc = Conv1D(width, hidden)
        mlp.c_proj = Conv1D(hidden, width)


def _reshape_bert(base: nn.Module, config) -> None:
    layers = len(base.encoder.layer)
    heads = _per_layer(config, "recipec_heads", layers, config.num_attention_heads)
    widths = _per_layer(config, "recipec_intermediate", layers, config.intermediate_size)
    hidden, d = config.hidden_size, config.hidden_size // config.num_attention_heads
    for layer, h, width in zip(base.encoder.layer, heads, widths):
        attn = layer.attention.self
        attn.query = nn.Linear(hidden, h * d)
        attn.key = nn.Linear(hidden, h * d)
        attn.value = nn.Linear(hidden, h * d)
        attn.num_attention_heads, attn.all_head_size = h, h * d
        layer.attention.output.dense = nn.Linear(h * d, hidden)
        layer.intermediate.dense = nn.Linear(hidden, width)
        layer.output.dense = nn.Linear(width, hidden)


def _reshape(model, reshape_layers) -> None:
    """Resize `model`'s layers to its config, then re-run post_init so the new modules are initialized and the
    model's bookkeeping (tied weights, plans) sees them."""
    reshape_layers(getattr(model, model.base_model_prefix, model), model.config)
    _apply_low_rank(model, model.config)
    model.post_init()


class RecipecLlamaConfig(LlamaConfig):
    model_type = "recipec_llama"


class RecipecGPT2Config(GPT2Config):
    model_type = "recipec_gpt2"


class RecipecBertConfig(BertConfig):
    model_type = "recipec_bert"


class RecipecLlamaModel(LlamaModel):
    config_class = RecipecLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        _reshape(self, _reshape_llama)


class RecipecLlamaForCausalLM(LlamaForCausalLM):
    config_class = RecipecLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        _reshape(self, _reshape_llama)


class RecipecGPT2Model(GPT2Model):
    config_class = RecipecGPT2Config

    def __init__(self, config):
        super().__init__(config)
        _reshape(self, _reshape_gpt2)


class RecipecGPT2LMHeadModel(GPT2LMHeadModel):
    config_class = RecipecGPT2Config

    def __init__(self, config):
        super().__init__(config)
        _reshape(self, _reshape_gpt2)


class RecipecBertModel(BertModel):
    config_class = RecipecBertConfig

    def __init__(self, config, add_pooling_layer=True):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        _reshape(self, _reshape_bert)


class RecipecBertForMaskedLM(BertForMaskedLM):
    config_class = RecipecBertConfig

    def __init__(self, config):
        super().__init__(config)
        _reshape(self, _reshape_bert)


class RecipecBertForSequenceClassification(BertForSequenceClassification):
    config_class = RecipecBertConfig

    def __init__(self, config):
        super().__init__(config)
        _reshape(self, _reshape_bert)
