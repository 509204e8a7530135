"""`distill`: train a student to match a teacher's next-token distributions on a corpus.

The student is trained by the same loop as `cp` (packing, checkpoints, resume, `--launch`), with the same
parameters (`TrainParams`) plus the distillation's own: the temperature and the share `alpha` of the
distillation term. The objective itself is in backends/train/distill.py. Check time refuses a teacher and a
student whose vocabularies differ in size (their distributions would not be over the same tokens); the
tokens themselves are compared when the run reads the tokenizers. The output has the student's signature.
"""

from __future__ import annotations

from pydantic import Field

from ..ir.types import Kind, Type
from .base import ERROR_TYPE, Context, Cost, Input, Op, register
from .tokenizer_facts import require_tokenizer
from .train import (
    TRAINING_FIXED_SECONDS,
    TRAINING_IMPORTS,
    TrainParams,
    check_one_pass,
    check_training,
    model_config,
    planned_shape,
    planned_tokens,
    training_detail,
    training_flops,
    training_memory,
)
from .train_config import machine_precision, this_machine


class DistillParams(TrainParams):
    """The training loop's parameters and the distillation's own."""

    temperature: float = Field(1.0, gt=0, description="the softmax temperature of both distributions (the KL "
                                                      "term is scaled by its square)")
    alpha: float = Field(1.0, ge=0, le=1, description="the share of the KL term in the loss (the rest, 1 - alpha, "
                                                      "is the student's own next-token loss)")


def _positions(node, ctx: Context) -> int | None:
    facts = node.type.signature.facts if node.type.signature else None
    if facts is not None and facts.positions is not None:
        return facts.positions
    value = (model_config(node, ctx.recipe_dir) or {}).get("max_position_embeddings")
    return value if isinstance(value, int) else None


@register
class Distill(Op):
    """Train a student on a corpus to match a teacher's next-token distributions (token-level KL).
    Example: `small = distill(base, drop_layers(base, keep=0.5), corpus, steps=200, seq_len=256, lr=1e-4, batch=8)`

    The loss of a step is alpha·T²·KL(teacher ‖ student) + (1 − alpha)·cross entropy, both in fp32 at every
    target token (softmax at temperature T), averaged over the step's target tokens.
    """

    name = "distill"
    card_relation = "finetune"
    inputs = (Input("teacher", Kind.MODEL, doc="the model whose distributions are matched"),
              Input("student", Kind.MODEL, doc="the model trained (the result has its shape)"),
              Input("corpus", Kind.CORPUS, doc="the documents both read"))
    launchable = True
    unkeyed = frozenset({"save_every"})  # resuming is exact: checkpoints never change the result
    toolchain = ("torch", "transformers", "accelerate", "tokenizers")
    imports = TRAINING_IMPORTS
    fixed_seconds = TRAINING_FIXED_SECONDS
    rule = "recipec.backends.train.distill:build_distill"
    Params = DistillParams

    @classmethod
    def check_params(cls, ctx, params):
        return check_training(ctx, params)

    @classmethod
    def output_type(cls, ctx, inputs, params):
        teacher, student = inputs[0], inputs[1]
        if not require_tokenizer(ctx, student, "distill", "student"):  # it reads the corpus with the student's
            return ERROR_TYPE
        for node in (teacher, student):
            positions = _positions(node, ctx)
            if positions is not None and params.seq_len > positions:
                return ctx.error("E433", f"seq_len={params.seq_len} is beyond the {positions} positions of "
                                         f"`{node.label}`", "seq_len", f"set `seq_len` to at most {positions}")
        sizes = [n.type.signature.vocab_size if n.type.signature else None for n in (teacher, student)]
        if None not in sizes and sizes[0] != sizes[1]:
            return ctx.error("E460", f"the teacher `{teacher.label}` has {sizes[0]} tokens but the student "
                                     f"`{student.label}` has {sizes[1]}: their distributions are over different "
                                     "vocabularies", "student",
                             "distill into a student made from the teacher (drop_layers, prune, init with the "
                             "teacher's tokenizer), so that both share one tokenizer")
        check_one_pass(ctx, params, inputs[2])
        return Type(Kind.MODEL, student.type.signature)

    @classmethod
    def node_params(cls, params, ctx):
        return machine_precision(params, this_machine()).model_dump(mode="json")

    @classmethod
    def cost(cls, inputs, params, out, threads):
        student, teacher = out.signature, inputs[0].type.signature
        if student is None or teacher is None:
            return Cost()
        tokens = planned_tokens(params, inputs[2])
        shape = planned_shape(student, params, this_machine())  # as the rule will split the batch
        micro_batch = shape.micro_batch
        states, activations = training_memory(student, params, micro_batch)
        # The teacher only runs forward, without gradients: its fp32 weights, and per micro-batch its logits
        # and the two log-softmaxes the KL compares, in fp32.
        teacher_bytes = 4 * teacher.params + 3 * 4 * params.seq_len * micro_batch * (student.vocab_size or 0)
        memory = states + activations + teacher_bytes
        bf16 = params.precision == "bf16"
        return Cost(bytes_read=student.nbytes + teacher.nbytes, bytes_written=student.nbytes,
                    peak_bytes=student.nbytes + teacher.nbytes if bf16 else memory,
                    flops=training_flops(student, params.seq_len, tokens) + 2 * teacher.params * tokens,
                    accelerator_bytes=memory if bf16 else None,
                    detail=training_detail(params, shape, tokens, states, activations))
