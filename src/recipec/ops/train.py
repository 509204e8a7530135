"""Training ops: `cp` (continual pre-training), `inscp` (InsCP: documents wrapped in the chat template) and
`sft` (supervised fine-tuning on conversations).

All three are one loop (backends/train) on different data preparations (textprep), so they share one
parameter schema: `TrainParams` is the loop's own `TrainConfig` plus what an op adds (the process count,
and for the chat ops the template, system prompt and loss mode). Check time catches what would otherwise
fail deep in a run, at the op's span: no length or two, a batch that does not split, a `seq_len` beyond
the model's positions, a chat op on a model without a chat template or with one whose special tokens the
tokenizer lacks. What check time cannot see (a model built by arithmetic, whose tokenizer is only known
once built) the rule checks when it runs. Training keeps every shape: the output has the input's
signature.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..ir.graph import Node
from ..ir.types import Kind, Type
from ..store.model_dir import ModelDirError, read_config
from ..textprep.errors import TextPrepError
from ..textprep.templates import missing_markers, read_chat_template
from .base import ERROR_TYPE, REGISTRY, Context, Cost, FileDigest, Input, Op, Params, file_digest, register
from .sources import Init
from .text import corpus_documents, corpus_tokens
from .tokenizer_facts import require_tokenizer
from .train_config import (
    BatchShape,
    Device,
    TrainConfig,
    TrainingError,
    batch_shape,
    largest_fitting_micro_batch,
    machine_precision,
    this_machine,
)

LENGTHS = ("steps", "epochs", "tokens")
# A chat template's markers around each document (`inscp`: an empty user turn, the assistant's header and end)
# or conversation (`sft`), beyond the text itself: ChatML and Llama-2 chat spend 10-20 tokens
TEMPLATE_TOKENS_PER_DOCUMENT = 12
MEMORY_SHARE = 0.8  # of a device's memory, what a micro-batch chosen from memory may plan to fill
# The reference GPU of a plan's advice: an H100 SXM's dense bf16 tensor-core peak and its memory, and the
# model FLOPs utilization a well-tuned training run reaches on it.
REFERENCE_GPU, REFERENCE_FLOPS, REFERENCE_MEMORY, REFERENCE_MFU = "H100-class", 989e12, 80 << 30, 0.4
SLOW_ON_CPU_SECONDS = 86400  # a planned training step longer than this on a CPU-only machine gets advice


class TrainParams(Params, TrainConfig):
    """The loop's settings, as recipe parameters, and the process count the run is launched with."""

    processes: int = Field(1, gt=0, description="the processes the run is launched with (world size): the "
                                                "number `--launch` starts, part of the cache key")

    @model_validator(mode="after")
    def _one_length(self) -> TrainParams:
        return self  # checked by `check_training` instead, where it is reported at the call (E430)

    def train_config(self) -> TrainConfig:
        """The loop's settings, already validated: these parameters less what only the op reads."""
        return TrainConfig.model_construct(**{name: getattr(self, name) for name in TrainConfig.model_fields})


class ChatTrainParams(TrainParams):
    """Training on text rendered with a chat template."""

    # As the recipe gives it, a path; once checked, its content (see `node_params`).
    template: str | FileDigest | None = Field(None, description="a Jinja chat template file to render with "
                                                                "instead of the model's own")
    system: str | None = Field(None, description="a system prompt put before every example")


TRAINING_IMPORTS = ("torch", "transformers", "accelerate")  # what a training process imports (plan's time)
TRAINING_FIXED_SECONDS = 1.0  # loading the model, tokenizing, the first step's allocations (plan's time)


class _Training(Op):
    """What cp, inscp and sft share: inputs, output type, checks, cost, key."""

    version = 1
    launchable = True
    unkeyed = frozenset({"save_every"})  # resuming is exact: checkpoints never change the result
    toolchain = ("torch", "transformers", "accelerate", "tokenizers")
    imports = TRAINING_IMPORTS
    fixed_seconds = TRAINING_FIXED_SECONDS
    rule = "train:build_train"
    uses_template = False

    @classmethod
    def check_params(cls, ctx: Context, params) -> bool:
        return check_training(ctx, params)

    @classmethod
    def output_type(cls, ctx: Context, inputs, params):
        model = inputs[0]
        if not require_tokenizer(ctx, model, cls.name, "model"):
            return ERROR_TYPE
        config = model_config(model, ctx.recipe_dir)
        positions = _positions(model, config)
        if positions is not None and params.seq_len > positions:
            return ctx.error("E433", f"seq_len={params.seq_len} is beyond the model's {positions} positions",
                             "seq_len", f"set `seq_len` to at most {positions}")
        if cls.uses_template and not _check_template(ctx, model, params):
            return ERROR_TYPE
        check_one_pass(ctx, params, inputs[1], wrapped=cls.uses_template)
        return Type(Kind.MODEL, model.type.signature)

    @classmethod
    def node_params(cls, params, ctx):
        # `auto` becomes the precision this machine trains in, so the key (and the plan) say what runs.
        params = machine_precision(params, this_machine())
        template = getattr(params, "template", None)
        if template is not None:
            # The template's content decides the tokens; its path goes along only to read it from.
            params = params.model_copy(update={"template": file_digest(ctx, template)})
        return params.model_dump(mode="json")

    @classmethod
    def cost(cls, inputs, params, out, threads):
        sig = out.signature
        if sig is None:
            return Cost()
        tokens = planned_tokens(params, inputs[1], wrapped=cls.uses_template)
        shape = planned_shape(sig, params, this_machine())
        states, activations = training_memory(sig, params, shape.micro_batch)
        memory = states + activations
        bf16 = params.precision == "bf16"
        return Cost(bytes_read=sig.nbytes, bytes_written=sig.nbytes,
                    peak_bytes=sig.nbytes if bf16 else memory,  # on an accelerator the host holds one copy
                    flops=training_flops(sig, params.seq_len, tokens),
                    accelerator_bytes=memory if bf16 else None,
                    detail=training_detail(params, shape, tokens, states, activations))

    @classmethod
    def plan_advice(cls, node: Node, cost: Cost, seconds: float) -> str:
        """What the plan adds under a step that would take longer than a day on a CPU-only machine: that it
        is out of reach here, and what a GPU run needs (the plan asks this hook of the ops that have it)."""
        sig = node.type.signature
        if sig is None or this_machine().gpu is not None or seconds < SLOW_ON_CPU_SECONDS:
            return ""
        from ..units import human_seconds

        return (f"this machine has no GPU: training here would take {human_seconds(seconds)}. A GPU run needs "
                + gpu_needs(sig, cls.params_of(node), cost.flops))


def check_training(ctx: Context, params: TrainParams) -> bool:
    """The checks every training call needs, each reported at the call (all of them); True when all pass."""
    ok = True
    given = [name for name in LENGTHS if getattr(params, name) is not None]
    if len(given) != 1:
        ok = ctx.reject("E430", f"give exactly one of `steps=`, `epochs=`, `tokens=` (got "
                        f"{', '.join(given) or 'none'})", given[1] if len(given) > 1 else None,
                        "`steps` counts optimizer steps, `epochs` passes over the data, `tokens` tokens trained on")
    try:
        batch_shape(params, params.processes)
    except TrainingError as err:
        ok = ctx.reject("E434", err.message, "batch", err.hint)
    return ok


def model_config(node: Node, recipe_dir: Path) -> dict | None:
    """The config.json a model node will have, when check time can know it without building anything."""
    op = REGISTRY[node.op]
    if node.op == Init.name:
        return Init.params_of(node).hf_config()
    if issubclass(op, _Training):
        return model_config(node.inputs[0], recipe_dir)
    source = op.source_dir(node.params, recipe_dir)
    if source is None:
        return None
    try:
        return read_config(source)
    except ModelDirError:
        return None  # reported where the model is read


def tokenizer_dir(node: Node, recipe_dir: Path) -> Path | None:
    """The directory a model node's tokenizer files come from, when check time can know it."""
    op = REGISTRY[node.op]
    if node.op == Init.name:
        tokenizer = node.params.get("tokenizer")
        return Path(tokenizer["path"]) if tokenizer else None
    if issubclass(op, _Training):
        return tokenizer_dir(node.inputs[0], recipe_dir)
    return op.source_dir(node.params, recipe_dir)


def _positions(model: Node, config: dict | None) -> int | None:
    facts = model.type.signature.facts if model.type.signature else None
    if facts is not None and facts.positions is not None:
        return facts.positions
    value = (config or {}).get("max_position_embeddings")
    return value if isinstance(value, int) else None


def _check_template(ctx: Context, model: Node, params: ChatTrainParams) -> bool:
    """A chat op's template exists and fits the model's tokenizer, as far as check time can see."""
    if params.template is not None and not (ctx.recipe_dir / params.template).is_file():
        ctx.error("E401", f"no chat template file {params.template!r} (relative to {ctx.recipe_dir})",
                  "template", "a chat template is a Jinja file, e.g. templates/chat.jinja")
        return False
    directory = tokenizer_dir(model, ctx.recipe_dir)
    if directory is None:
        return True  # a built model: its tokenizer is known once built, and checked then
    try:
        template = ((ctx.recipe_dir / params.template).read_text(encoding="utf-8") if params.template
                    else read_chat_template(directory))
    except TextPrepError as err:
        ctx.error("E431", err.message, None, err.hint)
        return False
    if template is None:
        ctx.error("E431", f"`{model.label}` has no chat template", None,
                  "give the op `template=` (a Jinja file), or the model one (`chat_template=` on a combination)")
        return False
    encode = tokenizer_encoder(directory)
    missing = missing_markers(template, encode) if encode is not None else []
    if missing:
        names = ", ".join(f"`{m}`" for m in missing)
        ctx.error("E432", f"the chat template writes {names}, which the tokenizer of `{model.label}` does not "
                          "have as one token", "template" if params.template else None,
                  "use a template written for this tokenizer, or add its tokens as special tokens")
        return False
    return True


def tokenizer_encoder(directory: Path):
    """Text -> ids without special tokens added, by the directory's tokenizer.json (None without one)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer  # light (no torch): check time may use it

    tokenizer = Tokenizer.from_file(str(path))
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def planned_tokens(params: TrainParams, data: Node, wrapped: bool = False) -> int:
    """Tokens the run trains on: as given, from the steps, or estimated from the data (each document or
    conversation in a chat template when `wrapped`, as `inscp` and `sft` train)."""
    if params.tokens is not None:  # whole steps: the last one is full
        per_step = params.batch * params.seq_len
        return math.ceil(params.tokens / per_step) * per_step
    if params.steps is not None:
        return params.steps * params.batch * params.seq_len
    return int(tokens_per_epoch(data, wrapped) * params.epochs)


def tokens_per_epoch(data: Node, wrapped: bool = False) -> int:
    """One pass over the data, as estimated at check time (0: not known); with the chat template's tokens
    around each document when `wrapped`."""
    return corpus_tokens(data) + (TEMPLATE_TOKENS_PER_DOCUMENT * corpus_documents(data) if wrapped else 0)


def check_one_pass(ctx: Context, params: TrainParams, data: Node, wrapped: bool = False) -> None:
    """Warn (E435) when `steps=` or `tokens=` asks for more than one pass over the data holds, as far as the
    estimate tells: the run stops there (E570), as they read the data once; `epochs=` reads it again."""
    holds = tokens_per_epoch(data, wrapped)
    if params.tokens is not None:  # as asked: the run checks what is asked against the data
        needs, asked, argument = params.tokens, f"tokens={params.tokens}", "tokens"
    elif params.steps is not None:
        needs = planned_tokens(params, data)
        asked, argument = f"steps={params.steps} at batch={params.batch} and seq_len={params.seq_len}", "steps"
    else:
        return
    if holds and needs > holds:
        ctx.warning("E435", f"{asked} trains on {needs:,} tokens, and one pass over the data holds about "
                    f"{holds:,} (estimated): the run stops if it holds fewer", argument,
                    f"`{argument}` reads the data once: give `epochs=` to read it more than once, or ask for less")


def training_flops(sig, seq_len: int, tokens: int) -> int:
    """≈ 6·params per token (forward and backward) plus attention's 12·layers·seq_len·hidden per token."""
    facts = sig.facts
    attention = 12 * facts.layers * seq_len * facts.hidden if facts is not None else 0
    return (6 * sig.params + attention) * tokens


def planned_shape(sig, params: TrainParams, device: Device) -> BatchShape:
    """How the batch splits: as given, or, when neither `micro_batch` nor `grad_accum` is, the largest
    micro-batch whose planned memory (weights, gradients, AdamW and its activations) fits in
    `MEMORY_SHARE` of the device's memory (a GPU's, or the machine's RAM), accumulating the rest."""
    given = batch_shape(params, params.processes)
    if params.micro_batch is not None or params.grad_accum is not None or sig is None:
        return given
    budget = int(MEMORY_SHARE * device.memory_bytes)
    micro = largest_fitting_micro_batch(given.per_process, lambda m: sum(training_memory(sig, params, m)), budget)
    return BatchShape(micro, given.per_process // micro, params.processes)


def gpu_needs(sig, params: TrainParams, flops: int) -> str:
    """A GPU run of this step in words: GPU-hours on the reference GPU and the memory per device in bf16."""
    from ..units import human_bytes

    hours = flops / (REFERENCE_FLOPS * REFERENCE_MFU) / 3600
    states, activations = training_memory(sig, params.model_copy(update={"precision": "bf16"}), 1)
    text = (f"≈ {hours:,.{1 if hours < 10 else 0}f} GPU-hours on an {REFERENCE_GPU} GPU at {REFERENCE_MFU:.0%} MFU, bf16, "
            f"{human_bytes(states + activations)} per device at micro-batch 1")
    room = int(MEMORY_SHARE * REFERENCE_MEMORY) - activations
    if states + activations > MEMORY_SHARE * REFERENCE_MEMORY and room > 0:
        devices = math.ceil(states / room)
        text += (f"; that is more than an {human_bytes(REFERENCE_MEMORY)} GPU holds, so shard weights, gradients "
                 f"and AdamW over {devices} GPUs or more (FSDP or DeepSpeed ZeRO-3 in the `--launch` config)")
    return text


def training_detail(params: TrainParams, shape: BatchShape, tokens: int, states: int, activations: int) -> str:
    from ..units import human_bytes, human_count

    steps = params.steps or math.ceil(tokens / (params.batch * params.seq_len))
    estimated = "≈" if params.epochs is not None else ""
    rounded = (f" ({params.tokens:,} asked, rounded up to whole steps)"
               if params.tokens is not None and tokens > 1.01 * params.tokens else "")  # said where it matters
    return (f"{estimated}{human_count(tokens)} tokens{rounded} · {estimated}{steps:,} step{'s' if steps != 1 else ''} "
            f"of {params.batch} × "
            f"{params.seq_len} · micro-batch {shape.micro_batch} × {shape.grad_accum} on {params.processes} "
            f"process{'es' if params.processes != 1 else ''} · {params.precision}: weights, gradients, AdamW "
            f"{human_bytes(states)} + activations {human_bytes(activations)} per device")


def training_memory(sig, params: TrainParams, micro_batch: int) -> tuple[int, int]:
    """Bytes per device, (optimizer states, activations): fp32 weights and gradients and AdamW's two fp32
    moments; the activations of one micro-batch of `micro_batch` sequences.

    Activations per layer follow Korthikanti et al. (34·s·b·h bytes in 16-bit plus 5·heads·s²·b for the
    attention scores), doubled in fp32; the logits and their gradient in fp32 come on top."""
    states = 16 * sig.params  # weights, gradients, exp_avg, exp_avg_sq: four fp32 copies
    facts = sig.facts
    if facts is None:
        return states, 0
    scale = 1 if params.precision == "bf16" else 2
    s, b = params.seq_len, micro_batch
    heads = max(facts.heads, default=0)
    per_layer = 34 * s * b * facts.hidden + 5 * heads * s * s * b
    logits = 8 * s * b * facts.vocab
    return states, scale * facts.layers * per_layer + logits


@register
class Cp(_Training):
    """Continual pre-training: next-token loss on every token of a corpus. Example: `cp(base, text("data/zh/*.jsonl"), tokens=1000000, seq_len=512, lr=2e-5, batch=8)`"""

    name = "cp"
    inputs = (Input("model", Kind.MODEL, doc="the model to train"),
              Input("corpus", Kind.CORPUS, doc="the documents to train on"))
    Params = TrainParams


@register
class Inscp(_Training):
    """InsCP: continual pre-training with every document as the assistant's answer to an empty user turn, in the model's chat template. Example: `inscp(chat, text("data/zh/*.jsonl"), epochs=1, seq_len=512, lr=1e-5, batch=8)`"""

    name = "inscp"
    inputs = Cp.inputs
    uses_template = True

    class Params(ChatTrainParams):
        loss: Literal["all", "assistant"] = Field("all", description="the tokens the loss counts: all, or the "
                                                                     "document's only (the template masked)")


@register
class Sft(_Training):
    """Supervised fine-tuning on conversations, loss on the assistant's tokens. Example: `sft(base, chat("data/sft/*.jsonl"), epochs=3, seq_len=512, lr=2e-5, batch=8)`"""

    name = "sft"
    inputs = (Input("model", Kind.MODEL, doc="the model to train"),
              Input("dataset", Kind.DATASET, doc="the conversations to train on"))
    uses_template = True

    class Params(ChatTrainParams):
        loss: Literal["all", "assistant"] = Field("assistant", description="the tokens the loss counts: the "
                                                                           "assistant's turns, or all")
