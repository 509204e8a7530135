"""`prune`: magnitude pruning of linear weights (unstructured or N:M), and structured removal of attention heads
and FFN neurons, for llama (with grouped-query attention), gpt2 and bert-style encoders (with or without head).

Its rule is in backends/prune.py. Here: the parameters, the check-time rules (every bad fraction, pattern or
family is a located error before any weight is read), the output's signature (structured pruning shrinks
tensors: the pruned shapes are known from the config facts at check time) and the cost.

Iterative pruning (`steps=`, `retrain=`) adds the training loop's settings and checks that every round is
one the model can take and that the model is a causal LM; its cost is the rounds times a pass and a training run.

The tensor layout every structured rule works from lives here too (`LAYOUTS`), as data: which tensors of a
layer hold attention heads or FFN neurons, along which dimension, and in which part (queries, keys/values,
or GPT-2's packed q|k|v).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, ValidationError

from .. import modeling
from ..arch import ArchFacts
from ..ir.types import Kind, Signature, Type
from .base import ERROR_TYPE, Context, Cost, Input, Op, Params, bytes_read, concurrent_elements, register
from .text import corpus_tokens
from .tokenizer_facts import require_tokenizer
from .train import TRAINING_FIXED_SECONDS, TRAINING_IMPORTS, TrainParams, training_flops, training_memory
from .train_config import TrainConfig, TrainingError, batch_shape, machine_precision, this_machine

PATTERNS = {"unstructured": None, "2:4": (2, 4), "4:8": (4, 8)}
# Linear weights inside the transformer layers: what magnitude pruning targets unless `targets=` says otherwise
# (embeddings, norms, the output projection and BERT's pooler stay).
LAYER_WEIGHT = re.compile(r"(?:^|\.)(?:layers|h|layer)\.\d+\..*\.weight$")
CONV1D_FAMILIES = ("gpt2",)  # weights stored (in, out): the input dimension is 0


@dataclass(frozen=True)
class Slice:
    """A tensor of a layer that holds heads or neurons: its name after the layer prefix, the dimension the heads
    or neurons run along, and which part of the attention it belongs to ("q", "kv", "qkv" packed; "ffn")."""

    suffix: str
    dim: int
    part: str


@dataclass(frozen=True)
class Layout:
    prefixes: tuple[str, ...]  # a layer's tensor-name prefix, with and without the base-model prefix
    heads: tuple[Slice, ...]
    ffn: tuple[Slice, ...]
    output_projection: str  # the attention's output projection, whose input is the heads' context
    ffn_output: str  # the FFN's output projection, whose input is the neurons' activations


def _slices(part: str, dim: int, *modules: str, bias: bool = True) -> tuple[Slice, ...]:
    suffixes = [f"{m}.weight" for m in modules] + ([f"{m}.bias" for m in modules] if bias else [])
    return tuple(Slice(s, 0 if s.endswith(".bias") else dim, part) for s in suffixes)


LAYOUTS = {
    "llama": Layout(("model.layers.{}.", "layers.{}."),
                    _slices("q", 0, "self_attn.q_proj") + _slices("kv", 0, "self_attn.k_proj", "self_attn.v_proj")
                    + (Slice("self_attn.o_proj.weight", 1, "q"),),
                    _slices("ffn", 0, "mlp.gate_proj", "mlp.up_proj") + (Slice("mlp.down_proj.weight", 1, "ffn"),),
                    "self_attn.o_proj", "mlp.down_proj"),
    "gpt2": Layout(("transformer.h.{}.", "h.{}."),
                   (Slice("attn.c_attn.weight", 1, "qkv"), Slice("attn.c_attn.bias", 0, "qkv"),
                    Slice("attn.c_proj.weight", 0, "q")),
                   (Slice("mlp.c_fc.weight", 1, "ffn"), Slice("mlp.c_fc.bias", 0, "ffn"),
                    Slice("mlp.c_proj.weight", 0, "ffn")),
                   "attn.c_proj", "mlp.c_proj"),
    "bert": Layout(("bert.encoder.layer.{}.", "encoder.layer.{}."),
                   _slices("q", 0, "attention.self.query") + _slices("kv", 0, "attention.self.key",
                                                                     "attention.self.value")
                   + (Slice("attention.output.dense.weight", 1, "q"),),
                   _slices("ffn", 0, "intermediate.dense") + (Slice("output.dense.weight", 1, "ffn"),),
                   "attention.output.dense", "output.dense"),
}


def layer_prefix(family: str, names: set[str] | dict) -> str | None:
    """The tensor-name prefix of layer {} in a model with these tensor names (prefixed or headless)."""
    first = LAYOUTS[family].heads[0].suffix
    return next((p for p in LAYOUTS[family].prefixes if p.format(0) + first in names), None)


def groups(facts: ArchFacts, layer: int) -> tuple[int, int]:
    """(removable units, query heads per unit) of a layer: a unit is one key/value head with its query group."""
    return facts.kv_heads[layer], facts.heads[layer] // facts.kv_heads[layer]


def part_size(part: str, heads: int, kv_heads: int, head_dim: int, width: int) -> int:
    """The length along its dimension of a tensor of `part` with these counts."""
    return {"q": heads * head_dim, "kv": kv_heads * head_dim, "qkv": (2 * kv_heads + heads) * head_dim,
            "ffn": width}[part]


def pruned_signature(sig: Signature, facts: ArchFacts) -> Signature:
    """`sig` with the per-layer heads and FFN widths of `facts` (every other tensor unchanged)."""
    family = modeling.family(sig.model_type)
    layout, names = LAYOUTS[family], sig.by_name
    prefix = layer_prefix(family, names)
    tensors = {t.name: (t.dtype, t.shape) for t in sig.tensors}
    for i in range(facts.layers):
        for s in (*layout.heads, *layout.ffn):
            name = prefix.format(i) + s.suffix
            if name in tensors:
                dtype, shape = tensors[name]
                size = part_size(s.part, facts.heads[i], facts.kv_heads[i], facts.head_dim, facts.intermediate[i])
                tensors[name] = (dtype, tuple(size if d == s.dim else n for d, n in enumerate(shape)))
    model_type = modeling.output_model_type(sig.model_type, facts)
    return Signature.build(model_type, tensors, sig.vocab_size, sig.tied_embeddings, facts)


def has_low_rank(sig: Signature) -> bool:
    """Whether a model stores some linear as two low-rank factors (recipec's `<path>.a/.b` convention)."""
    names = sig.by_name
    return any(n.endswith(".a.weight") and n.removesuffix(".a.weight") + ".b.weight" in names for n in names)


# How far the whole heads removed may be from the fraction asked for before it is an error: heads=0.3 of 32
# heads removes 10 (0.3125, a warning); heads=0.25 of 2 query groups would remove half of them (an error).
HEADS_ROUNDING = 0.05


def heads_removed(facts: ArchFacts, fraction: float) -> list[int] | str:
    """Units (key/value heads with their query groups) removed per layer for a uniform `fraction`: the
    nearest whole number (half up), or why not (a layer left empty, or too far from the fraction)."""
    removed = []
    for i in range(facts.layers):
        units, per_unit = groups(facts, i)
        count = math.floor(fraction * units + 0.5)
        if count >= units or abs(count / units - fraction) > HEADS_ROUNDING:
            choices = ", ".join(f"{k / units:g}" for k in range(units))
            what = (f"{units} key/value heads, each with {per_unit} query heads" if per_unit > 1
                    else f"{units} heads")
            outcome = ("would leave it empty" if count >= units else "is not near a whole number of "
                       + ("query groups" if per_unit > 1 else "heads"))
            return f"layer {i} has {what}: heads={fraction:g} {outcome}; valid fractions: {choices}"
        removed.append(count)
    return removed


def rounding_note(facts: ArchFacts, fraction: float, removed: list[int]) -> str | None:
    """What `heads=fraction` really removes when whole heads (or query groups) cannot make the fraction."""
    shares = {(r, groups(facts, i)[0], groups(facts, i)[1]) for i, r in enumerate(removed)}
    if all(abs(r / units - fraction) < 1e-9 for r, units, _ in shares):
        return None
    said = "; ".join(f"{r * q} of {units * q} heads" + (f" ({r} of {units} query groups)" if q > 1 else "")
                     + f" = {r / units:.4g}" for r, units, q in sorted(shares))
    return f"heads={fraction:g} removes whole heads: {said} in every layer"


def ffn_removed(facts: ArchFacts, fraction: float) -> list[int] | str:
    """FFN neurons removed per layer for a uniform `fraction`, or why not."""
    removed = [round(fraction * width) for width in facts.intermediate]
    for i, (r, width) in enumerate(zip(removed, facts.intermediate)):
        if r >= width:
            return f"layer {i} has {width} FFN neurons: ffn={fraction:g} would remove all of them"
    return removed


def targeted(sig: Signature, targets: list[str] | None) -> list[str]:
    """Names of the tensors magnitude pruning touches: `targets` globs, or the layers' linear weights."""
    if targets:
        return [t.name for t in sig.tensors if any(fnmatch.fnmatchcase(t.name, g) for g in targets)]
    return [t.name for t in sig.tensors if len(t.shape) == 2 and LAYER_WEIGHT.search(t.name)]


def input_dim(model_type: str, name: str, ndim: int) -> int:
    """The dimension along which an N:M group runs: a linear's input (Conv1D: 0; nn.Linear: last)."""
    conv1d = modeling.family(model_type) in CONV1D_FAMILIES and ".a.weight" not in name and ".b.weight" not in name
    return 0 if conv1d and ndim == 2 and LAYER_WEIGHT.search(name) else ndim - 1


@register
class Prune(Op):
    """Prune a model: zero its smallest weights, or remove attention heads and FFN neurons.
    Example: `small = prune(model, heads=0.5)`; `sparse = prune(model, sparsity=0.5, pattern="2:4")`

    `sparsity=` zeroes that fraction of the targeted weights (the linear weights of the layers unless `targets=`
    lists tensor-name globs) by magnitude, ranked over all of them (`scope="global"`) or per tensor
    (`scope="layer"`); `pattern="2:4"`/`"4:8"` keeps the N largest of every M consecutive input weights. The
    output stays dense, with zeros: it is no faster (see `stats`). Ties are broken by tensor name and position,
    so the bytes are the same at any thread count.

    `heads=` and `ffn=` remove that fraction of attention heads and FFN neurons physically (q/k/v rows and the
    output projection's columns; FFN input rows and output columns): the model gets smaller and faster. Heads go
    with their whole grouped-query group (the query-per-key/value ratio stays). `score="l1"` ranks by the L1 norm
    of the weights, `score="gradient"` by |<dL/dctx, ctx>| summed over `data=` (a corpus), normalized per layer.
    `uniform=true` removes the same count in every layer; `uniform=false` ranks across layers (then the pruned
    shapes are known only once built). Shapes stock transformers cannot load use recipec's model classes
    (`model_type: "recipec_llama"`, ...): `import recipec` before `from_pretrained`.

    `steps=N, retrain=corpus` prunes iteratively: N rounds, round r pruning to r/N of the target, then training
    on `retrain` (next-token loss, the loop of `cp`: `lr=` and one of `train_steps=`, `epochs=`, `tokens=`, each
    per round; `seq_len` and `batch` as for scoring). Pruned weights stay exactly zero while training; heads and
    neurons are removed each round and the smaller model is trained. Llama and GPT-2 models with their LM head.
    """

    name = "prune"
    imports = ("torch",)
    inputs = (Input("model", Kind.MODEL, doc="the model to prune"),
              Input("data", Kind.CORPUS, optional=True, doc="a corpus for `score=\"gradient\"`"),
              Input("retrain", Kind.CORPUS, optional=True, doc="a corpus for recovery training between the "
                                                               "rounds of `steps=`"))
    toolchain = ("torch", "transformers", "tokenizers", "accelerate")
    rule = "prune:build_prune"
    unkeyed = frozenset({"save_every"})  # resuming retraining is exact: checkpoints never change the result

    class Params(Params):
        sparsity: float | None = Field(None, description="the fraction of targeted weights set to zero, in [0, 1)")
        pattern: Literal["unstructured", "2:4", "4:8"] = Field("unstructured", description="which weights may "
                                                                "be zeroed: any, or N of every M consecutive")
        scope: Literal["global", "layer"] = Field("global", description="rank all targeted weights together, "
                                                  "or each tensor on its own")
        targets: list[str] | None = Field(None, description="tensor-name globs to prune by magnitude (default: "
                                          "the layers' linear weights)")
        heads: float | None = Field(None, description="the fraction of attention heads to remove, in [0, 1)")
        ffn: float | None = Field(None, description="the fraction of FFN neurons to remove, in [0, 1)")
        score: Literal["l1", "gradient"] = Field("l1", description="how heads and neurons are ranked")
        uniform: bool = Field(True, description="whether to remove the same count in every layer")
        seq_len: int = Field(128, description="tokens per sequence when scoring on `data` or retraining")
        batch: int = Field(4, description="sequences per scoring step, or per optimizer step of retraining")
        max_sequences: int = Field(64, description="at most this many sequences of `data` are scored")
        # Iterative pruning: `steps` rounds, each pruning to its share of the target, then training on
        # `retrain=` with the training loop's settings below (as `cp` names them; `train_steps` is its `steps`).
        steps: int | None = Field(None, description="prune in this many equal increments, each followed by "
                                  "recovery training on `retrain=`")
        lr: float | None = Field(None, gt=0, description="peak learning rate of recovery training")
        train_steps: int | None = Field(None, gt=0, description="optimizer steps of recovery training per round")
        epochs: float | None = Field(None, gt=0, description="passes over `retrain=` per round")
        tokens: int | None = Field(None, gt=0, description="tokens of `retrain=` trained on per round")
        micro_batch: int | None = Field(None, gt=0, description="sequences per forward pass of retraining")
        grad_accum: int | None = Field(None, gt=0, description="micro-batches per optimizer step of retraining")
        schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate decay "
                                                                  "within each round")
        warmup: int = Field(0, ge=0, description="optimizer steps of linear warmup at the start of each round")
        weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of retraining")
        max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping of retraining")
        seed: int = Field(0, description="the data order's seed (round r reads with seed + r - 1)")
        precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="retraining's compute precision")
        save_every: int | None = Field(None, gt=0, description="optimizer steps between checkpoints of "
                                       "retraining")
        shuffle_buffer: int = Field(1024, gt=0, description="packed sequences shuffled together")

    @classmethod
    def check_params(cls, ctx, params):
        ok = True
        structured = params.heads is not None or params.ffn is not None
        if params.sparsity is None and not structured:
            ok = ctx.reject("E456", "prune needs `sparsity=`, `heads=` or `ffn=`",
                            hint="e.g. prune(model, sparsity=0.5) or prune(model, heads=0.25, ffn=0.5)")
        if params.sparsity is not None and structured:
            ok = ctx.reject("E456", "prune zeroes weights (`sparsity=`) or removes heads and neurons "
                            "(`heads=`, `ffn=`), not both in one call", "sparsity",
                            "chain two calls: prune(prune(model, heads=0.25), sparsity=0.5)")
        if params.score == "gradient" and not ctx.given.get("data"):
            ok = ctx.reject("E454", "`score=\"gradient\"` needs `data=`: the gradient is taken on a corpus",
                            "score", "e.g. prune(model, heads=0.25, score=\"gradient\", data=text(\"d/*.txt\"))")
        if ctx.given.get("data") and not (structured and params.score == "gradient"):
            ok = ctx.reject("E454", "`data=` is only read by `score=\"gradient\"`", "data",
                            "add score=\"gradient\" (with heads= or ffn=), or drop data=")
        for name in ("seq_len", "batch", "max_sequences"):
            if getattr(params, name) < 1:
                ok = ctx.reject("E454", f"`{name}` must be at least 1, got {getattr(params, name)}", name)
        for name in ("sparsity", "heads", "ffn"):
            value = getattr(params, name)
            if value is not None and not 0 <= value < 1:
                ok = ctx.reject("E450", f"`{name}` must be in [0, 1), got {value:g}", name,
                                f"`{name}` is the fraction to remove: 0 keeps everything, 1 would remove all")
        return check_schedule(ctx, params) and ok

    @classmethod
    def node_params(cls, params, ctx):
        # Retraining's precision is keyed as it runs here; without rounds (`steps`) nothing trains.
        keyed = machine_precision(params, this_machine()) if params.steps is not None else params
        return keyed.model_dump(mode="json")

    @classmethod
    def output_type(cls, ctx, inputs, params):
        sig = inputs[0].type.signature
        if sig is None:
            return Type(Kind.MODEL, None)  # known once the model is locked
        if params.sparsity is not None:
            out = cls._magnitude_type(ctx, sig, params)
        else:
            out = cls._structured_type(ctx, sig, params)
        if params.steps is not None and out.kind != Kind.ERROR and not check_rounds(ctx, sig, params):
            return ERROR_TYPE
        if params.steps is not None and not require_tokenizer(ctx, inputs[0], "recovery training", "retrain"):
            return ERROR_TYPE
        return out

    @classmethod
    def _magnitude_type(cls, ctx: Context, sig: Signature, params) -> Type:
        nm = PATTERNS[params.pattern]
        if nm is not None and abs(params.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            return ctx.error("E450", f"pattern {params.pattern} zeroes {1 - nm[0] / nm[1]:g} of the weights, not "
                             f"sparsity={params.sparsity:g}", "sparsity", f"use sparsity={1 - nm[0] / nm[1]:g}")
        names = targeted(sig, params.targets)
        if not names:
            return ctx.error("E457", "no tensor of the model matches `targets`" if params.targets else
                             f"this {sig.model_type} model has no layer weights to prune", "targets",
                             "targets are globs over tensor names, e.g. [\"*.mlp.*.weight\"]")
        if nm is not None:
            by_name = sig.by_name
            for name in names:
                shape = by_name[name].shape
                dim = input_dim(sig.model_type, name, len(shape))
                if not shape or shape[dim] % nm[1]:
                    return ctx.error("E451", f"pattern {params.pattern} groups {nm[1]} input weights, but "
                                     f"`{name}` has {shape[dim] if shape else 0} along its input dimension",
                                     "pattern", "use pattern=\"unstructured\", or targets= that leave it out")
        return Type(Kind.MODEL, sig)

    @classmethod
    def _structured_type(cls, ctx: Context, sig: Signature, params) -> Type:
        family = modeling.family(sig.model_type)
        if family is not None and has_low_rank(sig):  # its projections are factored: no rows to remove
            return ctx.error("E455", "this model has low-rank linears; prune heads and neurons before `lowrank`",
                             "model", "reorder: lowrank(prune(model, heads=...), ...)")
        if family is None or sig.facts is None or layer_prefix(family, sig.by_name) is None:
            return ctx.error("E455", f"prune removes heads and neurons of llama, gpt2 and bert models, not of "
                             f"this {sig.model_type} model", "model",
                             "supported: llama (with grouped-query attention), gpt2 and bert, with or without "
                             "their task head")
        if params.score == "gradient" and layer_prefix(family, sig.by_name) != LAYOUTS[family].prefixes[0]:
            return ctx.error("E454", f"`score=\"gradient\"` needs a loss, and this headless {family} model has no "
                             "LM head", "score", "use score=\"l1\", or prune the model with its task head")
        facts = sig.facts
        if params.heads:
            removed = heads_removed(facts, params.heads)
            if isinstance(removed, str):
                return ctx.error("E452", removed, "heads", "heads= is the fraction of key/value groups removed "
                                 "in every layer (uniform=false ranks across layers)")
            note = rounding_note(facts, params.heads, removed) if params.uniform else None
            if note:
                ctx.warning("E419", note, "heads", "give one of the exact fractions to silence this")
            if not params.uniform:
                return Type(Kind.MODEL, None)
            kept = [facts.kv_heads[i] - r for i, r in enumerate(removed)]
            facts = facts.with_heads(tuple(k * groups(facts, i)[1] for i, k in enumerate(kept)), tuple(kept))
        if params.ffn:
            removed = ffn_removed(facts, params.ffn)
            if isinstance(removed, str):
                return ctx.error("E453", removed, "ffn", "use a smaller fraction")
            if not params.uniform:
                return Type(Kind.MODEL, None)
            facts = facts.with_intermediate(tuple(w - r for w, r in zip(facts.intermediate, removed)))
        return Type(Kind.MODEL, pruned_signature(sig, facts))

    @classmethod
    def startup(cls, node):
        rounds = node.params.get("steps")
        if not rounds:
            return cls.imports, cls.fixed_seconds
        # Recovery training in this process, as a training op's worker does it, once per round.
        return TRAINING_IMPORTS, TRAINING_FIXED_SECONDS * rounds

    @classmethod
    def cost(cls, inputs, params, out, threads):
        one = cls._pass_cost(inputs, params, out)
        if params.steps is None or inputs[0].type.signature is None:
            return one
        return _iterative_cost(one, inputs, params, out)

    @classmethod
    def _pass_cost(cls, inputs, params, out) -> Cost:
        sig = out.signature or inputs[0].type.signature
        if sig is None:
            return Cost()
        read = bytes_read(inputs[:1], out)
        largest = max((t.numel for t in sig.tensors), default=0)
        if params.sparsity is not None:
            # Two passes over the targeted weights: histograms of their magnitudes' bits (2 x 65536 counts),
            # then the masked copy; a few fp32 copies of the largest tensor at a time.
            return Cost(bytes_read=2 * read, bytes_written=sig.nbytes,
                        peak_bytes=4 * 8 * largest + 2 * 8 * 65536, flops=4 * sig.params)
        if params.score == "gradient":
            # The whole model in fp32 with its gradients and activations, forward and backward over the tokens.
            model = inputs[0].type.signature
            tokens = params.seq_len * params.max_sequences
            return Cost(bytes_read=2 * read, bytes_written=sig.nbytes, peak_bytes=4 * 4 * model.params,
                        flops=6 * model.params * tokens)
        return Cost(bytes_read=2 * read, bytes_written=sig.nbytes,
                    peak_bytes=8 * concurrent_elements(out, 1) if out.signature else 8 * largest,
                    flops=2 * sig.params)


# Iterative pruning: `steps` rounds; round r prunes to r/steps of the target, then trains on `retrain=`.

RETRAIN_FIELDS = ("lr", "train_steps", "epochs", "tokens", "micro_batch", "grad_accum", "schedule", "warmup",
                  "weight_decay", "max_grad_norm", "seed", "precision", "save_every", "shuffle_buffer")
LENGTHS = ("train_steps", "epochs", "tokens")
CAUSAL_FAMILIES = ("llama", "gpt2")  # the families recipec knows as causal LMs (the training loop's kind)
SCHEDULE_EXAMPLE = ("e.g. prune(model, sparsity=0.5, steps=5, retrain=text(\"d/*.txt\"), train_steps=100, "
                    "seq_len=256, batch=8, lr=1e-4)")


def retrain_config(params) -> TrainConfig:
    """The training loop's settings for one round of recovery training (the seed of round 1)."""
    values = {name: getattr(params, name) for name in TrainConfig.model_fields if name != "steps"}
    return TrainConfig(**values, steps=params.train_steps)


def check_schedule(ctx: Context, params) -> bool:
    """`steps=` and `retrain=` come together, with a complete set of training settings; True when all hold.
    Every problem is reported, each at its own argument."""
    retrain = bool(ctx.given.get("retrain"))
    if params.steps is None:
        stray = (["retrain"] if retrain else []) + [name for name in RETRAIN_FIELDS if name in params.model_fields_set]
        for name in stray:
            ctx.error("E488", f"`{name}=` is read by iterative pruning only, and this call prunes once", name,
                      f"add steps=N to prune in N rounds with recovery training between them ({SCHEDULE_EXAMPLE}), "
                      f"or drop `{name}=`")
        return not stray
    ok = True
    if params.steps < 1:
        ctx.error("E488", f"`steps` is the number of pruning rounds and must be at least 1, got {params.steps}",
                  "steps", "steps=1 prunes once and retrains; steps=5 reaches the target in 5 equal increments")
        ok = False
    given = [name for name in LENGTHS if getattr(params, name) is not None]
    missing = ((["`retrain=` (a corpus to train on)"] if not retrain else [])
               + (["one of `train_steps=`, `epochs=`, `tokens=` (per round)"] if not given else [])
               + (["`lr=` (a learning rate)"] if params.lr is None else []))
    if missing:  # one message for what the rounds lack, however much
        needs = ", ".join(missing[:-1]) + (" and " if len(missing) > 1 else "") + missing[-1]
        ctx.error("E488", f"`steps=` prunes in rounds with recovery training between them: it needs {needs}",
                  "steps", f"{SCHEDULE_EXAMPLE}; or drop steps= to prune once")
    if len(given) > 1:
        ctx.error("E488", "recovery training takes exactly one of `train_steps=`, `epochs=`, `tokens=` per round "
                  f"(got {', '.join(given)})", given[1],
                  "they apply to each round: `train_steps` counts optimizer steps, `epochs` passes over `retrain`, "
                  "`tokens` tokens trained on")
    settings_ok = not missing and len(given) == 1
    if settings_ok:  # the batch shape is judged on a complete set of settings only
        try:
            batch_shape(retrain_config(params), 1)
        except TrainingError as err:
            ctx.error("E434", err.message, "batch", err.hint)
            settings_ok = False
        except ValidationError as err:  # seq_len below 2, or a bound the field types do not say
            ctx.error("E488", f"recovery training cannot use these settings: {err.errors()[0]['msg']}", "seq_len")
            settings_ok = False
    return ok and settings_ok


def check_rounds(ctx: Context, sig: Signature, params) -> bool:
    """The model can be retrained (a causal LM) and every round's cumulative target is one the model can take."""
    family = modeling.family(sig.model_type)
    if family is not None and (family not in CAUSAL_FAMILIES or layer_prefix(family, sig.by_name) not in
                               (None, LAYOUTS[family].prefixes[0])):
        what = "an encoder" if family not in CAUSAL_FAMILIES else "a headless model (no LM head)"
        return ctx.reject("E489", f"recovery training is next-token training of a causal LM, and this {family} "
                              f"model is {what}", "retrain", "prune it once (drop steps= and retrain=), then "
                              "fine-tune it with its own objective; iterative pruning supports "
                              + " and ".join(CAUSAL_FAMILIES) + " models with their LM head")
    facts = sig.facts
    if facts is not None and facts.positions is not None and params.seq_len > facts.positions:
        return ctx.reject("E433", f"seq_len={params.seq_len} is beyond the model's {facts.positions} positions",
                              "seq_len", f"set `seq_len` to at most {facts.positions}")
    nm = PATTERNS[params.pattern] if params.sparsity is not None else None
    if nm is not None and (nm[1] - nm[0]) % params.steps:
        valid = [s for s in range(1, nm[1] - nm[0] + 1) if (nm[1] - nm[0]) % s == 0]
        return ctx.reject("E488", f"pattern {params.pattern} zeroes {nm[1] - nm[0]} of every {nm[1]} weights: "
                              f"{params.steps} rounds cannot zero equal whole numbers of them", "steps",
                              f"valid steps: {', '.join(map(str, valid))} (round r keeps "
                              f"{nm[1]} - {nm[1] - nm[0]}·r/steps of every {nm[1]})")
    if params.heads and params.uniform and facts is not None:
        def fits(rounds: int) -> bool:
            return all(isinstance(heads_removed(facts, params.heads * r / rounds), list)
                       for r in range(1, rounds + 1))
        if not fits(params.steps):
            most = max(groups(facts, i)[0] for i in range(facts.layers))
            valid = [s for s in range(1, most + 1) if fits(s)]
            return ctx.reject("E488", f"heads={params.heads:g} in {params.steps} equal rounds removes a "
                                  "fraction of a key/value group in some round", "steps",
                                  f"valid steps: {', '.join(map(str, valid))}; or uniform=false, which ranks "
                                  "heads across layers")
    return True


def round_tokens(params, retrain) -> int:
    """Tokens one round of recovery training reads: as given, from its steps, or estimated from the corpus."""
    if params.tokens is not None:
        return params.tokens
    if params.train_steps is not None:
        return params.train_steps * params.batch * params.seq_len
    return int(corpus_tokens(retrain) * params.epochs)


def _iterative_cost(one: Cost, inputs, params, out) -> Cost:
    """`steps` pruning passes and `steps` rounds of training; the model shrinks linearly from the input's
    parameters to the output's over the rounds (exact for uniform head and neuron removal)."""
    from ..units import human_bytes, human_count

    sig = inputs[0].type.signature
    final = out.signature.params if out.signature else sig.params
    tokens = round_tokens(params, inputs[-1])
    config = retrain_config(params)
    train_params = TrainParams.model_construct(**config.model_dump(), processes=1)
    states, activations = training_memory(sig, train_params, batch_shape(train_params, 1).micro_batch)
    flops = 0
    for r in range(1, params.steps + 1):
        scale = (sig.params - (sig.params - final) * r / params.steps) / max(sig.params, 1)
        flops += int(training_flops(sig, params.seq_len, tokens) * scale)
    train_steps = params.train_steps or math.ceil(tokens / (params.batch * params.seq_len))
    estimated = "≈" if params.epochs is not None else ""
    detail = (f"{params.steps} rounds × (prune, then {estimated}{human_count(tokens)} tokens · {estimated}"
              f"{train_steps:,} steps of {params.batch} × {params.seq_len} of recovery training) = "
              f"{estimated}{human_count(tokens * params.steps)} tokens · {params.precision}: weights, gradients, "
              f"AdamW {human_bytes(states)} + activations {human_bytes(activations)}")
    memory = states + activations
    bf16 = params.precision == "bf16"
    return Cost(bytes_read=params.steps * one.bytes_read, bytes_written=(2 * params.steps - 1) * one.bytes_written,
                peak_bytes=max(one.peak_bytes, sig.nbytes if bf16 else memory), flops=params.steps * one.flops + flops,
                accelerator_bytes=memory if bf16 else None, detail=detail)
