"""`merge`: combine fine-tunes of one base by a named method (linear, task arithmetic, TIES, DARE, SLERP)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..ir.types import Kind
from .arithmetic import MAX_SCALE, SCALE_HINT, VocabularyPolicy, check_same_architecture, out_of_scale
from .base import Context, Cost, Input, Op, bytes_read, concurrent_elements, register

NEEDS_BASE = {"task_arithmetic", "ties", "dare"}

# The tuning parameters each method reads (the backend kernels' keyword options, and `weights`, which
# slerp ignores); a test holds this table to the kernels' signatures.
METHOD_PARAMS = {
    "linear": ("weights", "normalize"),
    "task_arithmetic": ("weights", "normalize"),
    "ties": ("weights", "density", "normalize"),
    "dare": ("weights", "drop_rate", "seed", "normalize"),
    "slerp": ("t",),
}
TUNING_PARAMS = frozenset(name for names in METHOD_PARAMS.values() for name in names)

MERGE_POLICY_HINT = ('choose a vocabulary policy: merge(..., embeddings="overlap") merges the shared rows only and '
                     'keeps the first model\'s extra rows; embeddings="keep" keeps the first model\'s rows')


@register
class Merge(Op):
    """Merge models by a named method. Example: `merge(chat, code, base=llama, method="ties", density=0.5)`

    Methods: `linear` (Σ w_i m_i), `task_arithmetic` (base + Σ w_i (m_i − base)), `ties` (trim each task
    vector to its top `density`, elect signs, disjoint mean), `dare` (drop `drop_rate` of each task vector
    at random, rescale, add), `slerp` (spherical interpolation of two models at `t`). Models whose
    vocabularies differ take the same policies as `combine` (`embeddings=`, `special_tokens=`, `norms=`).
    """

    name = "merge"
    imports = ("torch",)
    card_relation = "merge"
    version = 1
    inputs = (Input("models", Kind.MODEL, variadic=True, doc="the models to merge"),
              Input("base", Kind.MODEL, optional=True, doc="the common base (task_arithmetic, ties, dare)"))
    toolchain = ("torch", "numpy")
    rule = "merge:build_merge"

    class Params(VocabularyPolicy):
        method: Literal["linear", "task_arithmetic", "ties", "dare", "slerp"] = Field(
            description="the merge method")
        weights: list[float] | None = Field(
            None, description="one weight per model (default: 1/n for linear, 1 otherwise)")
        density: float = Field(1.0, gt=0, le=1, description="the fraction of each task vector TIES keeps")
        drop_rate: float = Field(0.0, ge=0, lt=1, description="the fraction of each task vector DARE drops")
        t: float = Field(0.5, ge=0, le=1, description="the SLERP interpolation point, 0 = first model")
        seed: int = Field(0, ge=0, description="DARE's random seed (mixed with each tensor's name)")
        normalize: bool = Field(False, description="divide by the sum of the weights")
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="output dtype")
        shard_size: int = Field(5 * 10**9, gt=0, description="the largest shard in bytes")
        with_base: bool = False  # filled in from the call (whether `base=` was given), never by users

        def model_weights(self, n_models: int) -> tuple[float, ...]:
            """The weights as given, or the default: 1/n each for linear, 1 each otherwise."""
            if self.weights:
                return tuple(self.weights)
            return (1.0 / n_models if self.method == "linear" else 1.0,) * n_models

    internal = frozenset({"with_base"})

    @classmethod
    def check_params(cls, ctx: Context, params) -> bool:
        ok = True
        with_base = bool(ctx.given.get("base"))
        method = params.method
        if method in NEEDS_BASE and not with_base:
            ok = ctx.reject("E204", f"method `{method}` needs `base=`", "method",
                            "name the model the others were fine-tuned from: "
                            f"merge(a, b, base=..., method=\"{method}\")")
        if method not in NEEDS_BASE and with_base:
            ok = ctx.reject("E202", f"method `{method}` takes no `base=`", "base", "remove `base=`")
        bad = out_of_scale(params.weights or ())
        if bad is not None:
            ok = ctx.reject("E203", f"`weights` has {bad:g}; weights must be finite and within ±{MAX_SCALE:g}",
                            "weights", SCALE_HINT)
        for name in ctx.arg_spans:  # in the order the call gives them
            if name in TUNING_PARAMS and name not in METHOD_PARAMS[method]:
                users = [m for m, names in METHOD_PARAMS.items() if name in names]
                ctx.warning("E320", f"method `{method}` does not use `{name}`", name,
                            f"remove `{name}`, or choose a method that uses it: "
                            + ", ".join(f'"{m}"' for m in users))
        if params.normalize and params.weights is not None and sum(params.weights) == 0:
            ok = ctx.reject("E203", "`normalize=true` divides by the sum of `weights`, which is 0", "weights",
                            "give weights that do not sum to 0, or drop `normalize`")
        return ok

    @classmethod
    def output_type(cls, ctx: Context, inputs, params):
        models = inputs[:-1] if ctx.given.get("base") else inputs
        if params.method == "slerp" and len(models) != 2:
            return ctx.error("E205", f"slerp interpolates exactly 2 models, got {len(models)}", "models")
        if params.weights is not None and len(params.weights) != len(models):
            return ctx.error("E203", f"`weights` has {len(params.weights)} entries for {len(models)} models", "weights",
                             "give one weight per model, in order")
        vocab_policy = params.embeddings in ("keep", "overlap")
        return check_same_architecture(ctx, list(inputs), Kind.MODEL, params.dtype, "models", vocab_policy,
                                       MERGE_POLICY_HINT)

    @classmethod
    def node_params(cls, params, ctx):
        return params.model_copy(update={"with_base": bool(ctx.given.get("base"))}).model_dump(mode="json")

    @classmethod
    def cost(cls, inputs, params, out, threads):
        sig = out.signature
        if sig is None:
            return Cost()
        n_models = len(inputs) - 1 if params.method in NEEDS_BASE else len(inputs)
        # Every input tensor is upcast to a whole fp32 copy unless it is fp32 already (then it is a view).
        upcast = 4 * sum(n.type.signature is None or n.type.signature.dtype != "F32" for n in inputs)
        # A quarter more than the count: runs measured up to 8% above it (allocator retention).
        per_element = (upcast + kernel_bytes_per_element(params.method, n_models)) * 5 / 4
        dots = threads * SLERP_DOT_BYTES if params.method == "slerp" else 0
        return Cost(bytes_read=bytes_read(inputs, out), bytes_written=sig.nbytes,
                    peak_bytes=int(per_element * concurrent_elements(out, threads)) + dots,
                    flops=8 * len(inputs) * sig.params)


# Working bytes per element of one tensor that each kernel in backends/merge_methods.py holds at once, over
# its fp32 inputs (which are not counted here). Counted from the kernels and checked against measurement
# (benchmarks/plan_memory.py): a weighted sum holds its total, the previous term and the next one; TIES
# holds every trimmed task vector, and while trimming one, its |τ| and kthvalue's copy and int64 indices;
# DARE adds the uniform draws and the keep mask. The cast to the output dtype needs less than any of these.
def kernel_bytes_per_element(method: str, n_models: int) -> int:
    """fp32 temporaries of the `method` kernel over `n_models` models (base excluded), in bytes per element."""
    terms = min(n_models, 2)  # a weighted sum's live terms: its total, and the previous and next products
    return {"linear": 4 * (1 + terms),
            "task_arithmetic": 4 * (2 + terms),
            "dare": 4 * (2 + terms) + 5,
            "ties": 4 * n_models + 20,
            "slerp": 8}[method]


SLERP_DOT_BYTES = 4 << 20  # per thread: SLERP's float64 chunks for the dot products (a few 512 KiB arrays)
