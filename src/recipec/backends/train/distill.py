"""The rule behind `distill`: the training loop of `cp` with a teacher's distributions as the objective.

At every target position t of a micro-batch (a token whose successor is a target, as for `cp`), with
p = softmax(teacher_t / T) and q = softmax(student_t / T), both in fp32, the objective adds

    alpha · T² · KL(p ‖ q) + (1 − alpha) · cross_entropy(student_t, next token)

and the loop divides the sum by the step's target tokens, so the loss is an average over valid tokens
whatever the micro-batching. T² keeps the gradient's scale independent of T (Hinton et al., 2015); at
T = 1 it is 1. The teacher runs without gradients, in eval mode, on the same packed rows as the student
(positions restarting per document, each document attended to on its own: attention.py).
Everything else — tokenization, checkpoints, resume, metrics, the release — is `cp`'s (rules.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ...ops.distill import Distill
from ..job import Job, RunFailure
from ..model_files import tokenizer_vocab
from .attention import packed_attention
from .loop import packing_isolates
from .packing import IGNORE
from .rules import build_train


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha·T²·KL(teacher ‖ student) + (1 − alpha)·cross entropy, in fp32, summed over target positions."""
    targets = labels != IGNORE
    student = student_logits.float()[targets]
    total = student.new_zeros(())
    if alpha > 0:
        log_q = F.log_softmax(student / temperature, dim=-1)
        log_p = F.log_softmax(teacher_logits.float()[targets] / temperature, dim=-1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")  # Σ_t Σ_v p·(log p − log q)
        total = total + alpha * temperature ** 2 * kl
    if alpha < 1:
        total = total + (1 - alpha) * F.cross_entropy(student, labels[targets], reduction="sum")
    return total


class TeacherObjective:
    """The loop's objective for a student: the teacher's logits on the same rows, then `distillation_loss`."""

    def __init__(self, teacher: torch.nn.Module, temperature: float, alpha: float):
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        if self.teacher.device != logits.device:
            self.teacher.to(logits.device)  # where accelerate put the student
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids, position_ids=position_ids, attention_mask=None,
                                          use_cache=False).logits
        return distillation_loss(logits, teacher_logits, labels, self.temperature, self.alpha)


def build_distill(job: Job) -> str | None:
    params = Distill.params_of(job.node)
    teacher_dir, student, corpus = job.inputs
    _check_vocabularies(job)
    import transformers

    transformers.logging.disable_progress_bar()
    teacher = transformers.AutoModelForCausalLM.from_pretrained(str(teacher_dir.path), dtype=torch.float32)
    teacher.eval().requires_grad_(False)
    with packed_attention(teacher):  # it reads the same packed rows as the student
        if not packing_isolates(teacher):
            raise RunFailure("E596", f"the teacher `{job.node.inputs[0].label}` ({type(teacher).__name__}) lets "
                                     "packed documents attend to each other", "use a teacher whose attention "
                                     "follows position_ids (Llama, GPT-2, Qwen2, Mistral, ...)")
        student_job = dataclasses.replace(job, inputs=[student, corpus])
        return build_train(student_job, TeacherObjective(teacher, params.temperature, params.alpha))


def _check_vocabularies(job: Job) -> None:
    """Teacher and student must give each id the same token (sizes were compared at check time, when known)."""
    teacher, student = job.inputs[0], job.inputs[1]
    names = [f"`{node.label}`" for node in job.node.inputs[:2]]
    sizes = [a.files.config.get("vocab_size") for a in (teacher, student)]
    if sizes[0] != sizes[1]:
        raise RunFailure("E596", f"the teacher {names[0]} has {sizes[0]} tokens but the student {names[1]} has "
                                 f"{sizes[1]}", "distill into a student that shares the teacher's tokenizer")
    tables = [tokenizer_vocab(a.path) for a in (teacher, student)]
    if None in tables:
        return  # a model without tokenizer.json: the sizes are all that can be compared
    differ = next((i for i in sorted(tables[0].keys() | tables[1].keys()) if tables[0].get(i) != tables[1].get(i)),
                  None)
    if differ is not None:
        raise RunFailure("E596", f"id {differ} is {tables[0].get(differ)!r} for the teacher {names[0]} but "
                                 f"{tables[1].get(differ)!r} for the student {names[1]}",
                         "distill into a student that shares the teacher's tokenizer")
