"""Export ops: a model turned into another runtime's format, as a cached, locked node like any other.

`onnx` is what `export model to "out/m.onnx"` (or `... as onnx`) lowers to: the export statement wraps the
model in an `onnx` node, so the graph is built once into the cache, keyed, locked and rebuilt by `verify`
like every other result, and the release only copies it. Written as a call (`onnx(model, opset=20)`) it
takes its parameters; the export statement uses the defaults.
"""

from __future__ import annotations

from pydantic import Field

from ..artifacts.onnx import ONNX_MODEL
from ..ir.types import Kind, Type
from .base import Cost, Input, Op, Params, register

# Model types whose export runs through `torch.onnx` and is checked by the test suite: the stock families,
# and recipec's own classes for their pruned (per-layer heads and FFN widths) and low-rank outputs, whose
# ONNX graph runs without recipec.
ONNX_FAMILIES = frozenset({"llama", "gpt2", "bert", "recipec_llama", "recipec_gpt2", "recipec_bert"})

def family_problem(model_type: str) -> tuple[str, str] | None:
    """(message, hint) when the exporter does not support a model type (E467), else None."""
    if model_type in ONNX_FAMILIES:
        return None
    return (f"the ONNX exporter does not support `{model_type}` models",
            "recipec exports " + ", ".join(f"`{f}`" for f in sorted(ONNX_FAMILIES) if not f.startswith("recipec_"))
            + " models to ONNX; export this one as a Hugging Face directory instead")


# Model types `with_cache=true` exports a prefill + decode pair for: the decoders whose KV cache is tested.
CACHE_FAMILIES = frozenset({"llama", "gpt2", "recipec_llama", "recipec_gpt2"})


def cache_problem(model_type: str) -> tuple[str, str] | None:
    """(message, hint) when `with_cache=true` cannot be exported for a model type (E470), else None."""
    if model_type in CACHE_FAMILIES:
        return None
    return (f"`with_cache=true` exports a decoder's KV cache; `{model_type}` models have none recipec exports",
            "recipec exports a KV cache for " + ", ".join(f"`{f}`" for f in sorted(CACHE_FAMILIES)
                                                          if not f.startswith("recipec_"))
            + " models (pruned or low rank too); drop `with_cache` for a logits graph")


# The parity check's inputs: two shapes, small, whatever the model's size (see backends/onnx_export.py).
PARITY_TOKENS = 1 * 5 + 3 * 11
# The greedy generation `with_cache` is checked with: prompts of batch × length, tokens generated.
GENERATION_PROMPTS, GENERATED = (2, 6), 8
GENERATION_TOKENS = GENERATION_PROMPTS[0] * (GENERATION_PROMPTS[1] + GENERATED)
# An export's time whatever the model's size, per graph, on the plan's reference machine (measured: 13 s
# for a tiny Llama on 2 cores): torch.export traces in Python, then translation and a parity session.
ONNX_FIXED_SECONDS = 12.0


@register
class Onnx(Op):
    """An ONNX graph of a model (logits, or the last hidden state of a headless encoder), checked against
    PyTorch with onnxruntime before it is kept. Example: `export onnx(model, opset=20) to "out/m.onnx"`

    Dynamic batch and sequence axes, fp32 weights, one file (`model.onnx`) or, for weights over 2 GB, the
    graph and its external data (`model.onnx.data`) side by side. `export m to "out/m.onnx"` is the same
    node with the default parameters. Pruned and low-rank models (recipec's `recipec_*` classes) export the
    same way; their graph runs in onnxruntime without recipec.

    `with_cache=true` (llama, gpt2) exports a pair for generation instead: `model.onnx`, the prefill, and
    `decode.onnx`, a step on the KV cache. Both take `input_ids`, `attention_mask` (over the cached and new
    positions) and `position_ids`; the decode step also takes `past_key_values.N.key`/`.value` per layer;
    both give `logits` and `present.N.key`/`.value`. Besides the logits parity, a greedy generation through
    the pair must match transformers' `generate`.
    """

    name = "onnx"
    inputs = (Input("model", Kind.MODEL, doc="the model to export (Llama, GPT-2 or a BERT-style encoder, "
                                                  "pruned or low rank)"),)
    toolchain = ("torch", "transformers", "onnx", "onnxscript", "onnx-ir", "onnxruntime")
    rule = "onnx_export:build_onnx"
    imports = ("torch", "transformers", "torch.export", "onnxruntime")

    class Params(Params):
        opset: int = Field(18, ge=18, le=23, description="the ONNX opset the graph uses (18 to 23)")
        with_cache: bool = Field(False, description="a prefill + decode pair with a KV cache for generation "
                                                    "(`model.onnx`, `decode.onnx`; llama and gpt2)")

    @classmethod
    def output_type(cls, ctx, inputs, params):
        signature = inputs[0].type.signature
        problem = family_problem(signature.model_type) if signature is not None else None
        if problem is not None:
            return ctx.error("E467", problem[0], hint=problem[1])
        problem = cache_problem(signature.model_type) if signature is not None and params.with_cache else None
        if problem is not None:
            return ctx.error("E470", problem[0], "with_cache", problem[1])
        return Type(ONNX_MODEL)

    @classmethod
    def startup(cls, node):
        return cls.imports, ONNX_FIXED_SECONDS * (2 if node.params.get("with_cache") else 1)

    @classmethod
    def cost(cls, inputs, params, out, threads):
        signature = inputs[0].type.signature
        if signature is None:
            return Cost()
        fp32 = signature.params * 4
        graphs = 2 if params.with_cache else 1  # the decode graph holds its own copy of the weights
        # The model in fp32, the exported program's copy of its weights and an onnxruntime session's per graph.
        tokens = PARITY_TOKENS + (GENERATION_TOKENS if params.with_cache else 0)
        return Cost(bytes_read=signature.nbytes, bytes_written=graphs * fp32, peak_bytes=(1 + 2 * graphs) * fp32,
                    flops=2 * 2 * signature.params * tokens,
                    detail="ONNX export" + (" of a prefill + decode pair" if params.with_cache else "")
                    + ", parity checked with onnxruntime")
