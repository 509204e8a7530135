"""Analysis ops: reports about models.

`stats` is the measuring instrument of compression: parameters and non-zeros read from the safetensors
files, MACs per token counted while the model runs (and cross-checked against the count its architecture
implies, `macs_per_token`, which the plan also uses), measured latency and peak memory. Reports are roots:
a recipe that binds one (`s = stats(m)`) gets it built and printed by `run`, and may export it.

Check time knows, from the signature alone, whether the measured sequence fits the model's learned
positions (E482); bad counts are range errors of the parameters themselves.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import Field

from ..arch import ArchFacts
from ..artifacts.report import REPORT
from ..ir.types import Kind, Signature, Type
from .base import Cost, Input, Op, Params, bytes_read, model_names, register
from .export import ONNX_FIXED_SECONDS, family_problem

# Model types that encode without generating: their measurement has no decode step.
ENCODER_TYPES = frozenset({"bert"})
# Matrices of each layer's feed-forward block: gated (llama: gate, up, down) or not (gpt2, bert: in, out).
_FFN_MATRICES = {"llama": 3, "gpt2": 2, "bert": 2}


class StatsParams(Params):
    """How the models are run while they are measured: one settings for every model, so they compare."""

    seq_len: int = Field(64, gt=0, description="the tokens of each measured prefill, and the context "
                                                "decoding starts from")
    batch: int = Field(1, gt=0, description="the sequences run together in each measured step")
    threads: int = Field(1, gt=0, description="the torch threads latency is measured with: fixed, so that "
                                              "runs and machines compare")
    repeats: int = Field(5, gt=0, description="the timed runs after one warm-up; their median is reported")
    decode_tokens: int = Field(16, ge=0, description="tokens decoded one at a time with a KV cache after each "
                                                     "prefill (causal models); 0 measures no decode")
    onnx: bool = Field(False, description="also export each model to ONNX and time the same prefill in "
                                          "onnxruntime (the export takes longer than the measurement)")


@register
class Stats(Op):
    """Parameters, non-zeros, MACs per token (counted and from the architecture), measured prefill and
    decode latency and peak memory of models side by side, with ratios to the first.
    Example: `s = stats(base, pruned, seq_len=128, threads=1)`"""

    name = "stats"
    version = 3  # 3: models named as the recipe binds them, low-rank MACs, onnxruntime latency
    inputs = (Input("models", Kind.MODEL, variadic=True, doc="one or more models; ratios are to the first"),)
    toolchain = ("numpy", "torch", "transformers")  # MACs are counted on transformers' modules
    imports = ("torch", "transformers")
    rule = "analysis:build_stats"
    Params = StatsParams

    @classmethod
    def shown_names(cls, node):
        return dict(zip((i.id for i in node.inputs), model_names(node.inputs)))

    @classmethod
    def output_type(cls, ctx, inputs, params):
        for model, name in zip(inputs, model_names(inputs)):
            sig = model.type.signature
            problem = sequence_problem(sig.model_type, sig.facts, params) if sig is not None else None
            if problem is not None:
                return ctx.error("E482", f"`{name}`: {problem[0]}", "seq_len", problem[1])
            problem = family_problem(sig.model_type) if sig is not None and params.onnx else None
            if problem is not None:
                return ctx.error("E469", f"`{name}`: {problem[0]}, so `stats` cannot time it in "
                                 "onnxruntime", "onnx", "set `onnx=false`, or measure it in a `stats` of its own")
        return Type(REPORT)

    @classmethod
    def startup(cls, node):
        if not node.params.get("onnx"):
            return cls.imports, cls.fixed_seconds
        return cls.imports + ("torch.export", "onnxruntime"), ONNX_FIXED_SECONDS * len(node.inputs)

    @classmethod
    def cost(cls, inputs, params, out, threads):
        sigs = [n.type.signature for n in inputs if n.type.signature is not None]
        flops = sum(2 * measured_macs(sig, params) for sig in sigs)
        peak = max((measurement_bytes(sig, params) for sig in sigs), default=0)
        if params.onnx:  # the export's copies of the weights (see Onnx.cost), and the prefills again
            flops += sum(2 * (1 + params.repeats) * params.batch * params.seq_len * _per_token(sig, params.seq_len)
                         for sig in sigs)
            peak = max([peak, *(3 * 4 * sig.params for sig in sigs)])
        return Cost(bytes_read=bytes_read(inputs, out), peak_bytes=peak, flops=flops,
                    detail=_plan_detail(params, len(inputs), flops))


def sequence_problem(model_type: str, facts: ArchFacts | None, params: StatsParams) -> tuple[str, str] | None:
    """(message, hint) when the measured sequence does not fit a model's learned positions; rotary
    positions (llama) have no table to run past."""
    if facts is None or facts.positions is None:
        return None
    decode = 0 if model_type in ENCODER_TYPES else params.decode_tokens
    if params.seq_len + decode <= facts.positions:
        return None
    asked = f"seq_len={params.seq_len}" + (f" + decode_tokens={decode}" if decode else "")
    hint = (f"set `seq_len` to at most {facts.positions - decode}" if decode < facts.positions else
            f"set `decode_tokens` below {facts.positions}")
    return f"{asked} is beyond the model's {facts.positions} positions", hint


def macs_per_token(model_type: str, facts: ArchFacts, keys: int,
                   shapes: Mapping[str, tuple[int, ...]] | None = None) -> int | None:
    """Multiply-accumulates per token of one forward pass, from the architecture alone: every layer's
    q/k/v/o and feed-forward matrices, attention over `keys` positions (q·kᵀ and the weighted sum of v:
    2·heads·head_dim·keys; eager attention computes the whole seq_len × seq_len square in a prefill, masked
    or not), and the output head (bert's masked-LM head adds its hidden × hidden transform). Embedding
    lookups, norms, activations and biases are not multiplications of matrices and are not counted.
    Linears stored as low-rank factors among the model's tensor `shapes` count as their two factors.
    None for a model type this does not know (recipec's own classes count as the stock one they extend)."""
    family = model_type.removeprefix("recipec_")
    ffn = _FFN_MATRICES.get(family)
    if ffn is None:
        return None
    hidden, d = facts.hidden, facts.head_dim
    total = 0
    for heads, kv, inter in zip(facts.heads, facts.kv_heads, facts.intermediate):
        projections = 2 * hidden * heads * d + 2 * hidden * kv * d  # q and o; k and v
        total += projections + ffn * hidden * inter + 2 * heads * d * keys
    head = facts.vocab * hidden + (hidden * hidden if family == "bert" else 0)
    return total + head + low_rank_change(shapes or {})


def low_rank_change(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """MACs per token that factored linears add (a negative number: they save): a linear stored as
    `<path>.a.weight` (rank, in) and `<path>.b.weight` (out, rank), recipec's low-rank layout, multiplies
    rank·(in + out) instead of in·out."""
    change = 0
    for name, first in shapes.items():
        second = shapes.get(name.removesuffix("a.weight") + "b.weight") if name.endswith(".a.weight") else None
        if second is not None:
            (rank, in_features), (out_features, _) = first, second
            change += rank * (in_features + out_features) - in_features * out_features
    return change


def _per_token(sig: Signature, keys: int) -> int:
    # Without architecture facts, one MAC per parameter and token: what a dense forward pass costs.
    shapes = {t.name: t.shape for t in sig.tensors}
    counted = macs_per_token(sig.model_type, sig.facts, keys, shapes) if sig.facts is not None else None
    return counted if counted is not None else sig.params


def measured_macs(sig: Signature, params: StatsParams) -> int:
    """MACs of measuring one model: the counting pass (one sequence), then one warm-up and `repeats` timed
    runs of a prefill of batch × seq_len tokens and the decode steps."""
    prefill = params.seq_len * _per_token(sig, params.seq_len)
    decode = 0 if sig.model_type in ENCODER_TYPES else sum(
        _per_token(sig, params.seq_len + k + 1) for k in range(params.decode_tokens))
    return prefill + (1 + params.repeats) * params.batch * (prefill + decode)


def measurement_bytes(sig: Signature, params: StatsParams) -> int:
    """Working memory of measuring one model, estimated: its weights in fp32, the logits, a few hidden
    states, the eager attention scores of the counting pass and the KV cache."""
    facts = sig.facts
    weights = 4 * sig.params
    if facts is None:
        return weights
    tokens = params.batch * params.seq_len
    scores = max(facts.heads) * params.seq_len * params.seq_len
    cache = 2 * params.batch * (params.seq_len + params.decode_tokens) * sum(facts.kv_heads) * facts.head_dim
    hidden_states = 8 * tokens * max(facts.hidden, max(facts.intermediate))
    return weights + 4 * (tokens * facts.vocab + hidden_states + scores + cache)


def _plan_detail(params: StatsParams, models: int, flops: int) -> str:
    from ..units import human_count

    decode = f" and {params.decode_tokens} decode steps" if params.decode_tokens else ""
    decode += ", then exports each to ONNX and times the prefills in onnxruntime" if params.onnx else ""
    return (f"runs {'each of ' + str(models) + ' models' if models != 1 else 'the model'}: 1 warm-up + "
            f"{params.repeats} timed prefills of {params.batch} × {params.seq_len} tokens{decode} on "
            f"{params.threads} thread{'s' if params.threads != 1 else ''} · ≈{human_count(flops)} FLOPs")
