"""Iterative pruning: `prune(..., steps=N, retrain=corpus)` reaches its target in N equal increments, with
recovery training between them (the gradual schedule of the pruning literature).

Round r (1..N) prunes the model to r/N of the target, then trains it on `retrain` with the training loop of
`cp` (next-token loss, packed documents, AdamW) for the length given (`train_steps`, `epochs` or `tokens`: per
round), reading the corpus with seed + r - 1 so that rounds see it in different orders. The last round's
trained model is the result, beside the metrics of every round (one step count across rounds, each record
with its `round`) and the loss curve drawn from them.

What a round prunes: magnitude pruning goes to the round's cumulative sparsity (the zeros already there are
the smallest magnitudes, so they are among those counted) and N:M patterns keep M - (M - N)·r/N of every M;
heads and FFN neurons are removed physically, as many as the cumulative target adds to the last round's, and
the smaller model is trained. Zeros stay zeros while training: each pruned weight's gradient is masked to
zero, so AdamW's moments for it stay zero and its update (decay included) is exactly zero.

Resume: everything lives in the node's work directory, `round-R/pruned` (the round's pruned model) and
`round-R/trained` (after its training, but for the last round, which is written into the result), each built
under a temporary name and renamed into place, and `round-R/train`, the loop's own work directory with its
checkpoints. A run killed anywhere starts again at the first round without a trained model, from its pruned
model and newest checkpoint when it has them, and ends with the same bytes on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from ..arch import facts_from_config
from ..artifacts import Artifact
from ..dtypes import TensorSpec
from ..ir.types import Kind
from ..ops.prune import Prune, retrain_config, targeted
from ..ops.sources import signature_of_files
from ..ops.train_config import TrainConfig, TrainingError
from ..store.atomic import TMP_PREFIX, fsync_dir, remove_stale_temporaries
from ..store.model_dir import INDEX_FILE, weight_files
from ..store.tensors import TORCH_DTYPES, ModelWriter
from ..textprep import TextPrepError
from .job import Job, Meter, RunFailure
from .prune import SHARD_SIZE, Pass, one_pass, prune_once
from .train.loop import Progress, train
from .train.metrics import METRICS, read_metrics, render_loss_curve
from .train.rules import LOSS_CURVE, RELEASED_METRICS, REPRODUCIBLE_FIELDS, tokenized


def round_pass(params: Prune.Params, facts, index: int, rounds: int) -> Pass:
    """What round `index` of `rounds` prunes from the model the last round left, `facts` being the input's
    shape: a cumulative sparsity or N:M pattern, or the heads and neurons its target adds to the last one's."""
    now = one_pass(params, facts, index / rounds)
    if params.sparsity is not None:
        return now
    before = one_pass(params, facts, (index - 1) / rounds)
    return Pass(heads=_added(now.heads, before.heads), ffn=_added(now.ffn, before.ffn))


def _added(now: list[int] | int | None, before: list[int] | int | None) -> list[int] | int | None:
    if now is None:
        return None
    if isinstance(now, int):
        return now - before
    return [a - b for a, b in zip(now, before)]


def build_iterative(job: Job, params: Prune.Params) -> str:
    model, retrain = job.inputs[0], job.inputs[-1]
    data = job.inputs[1:2] if params.score == "gradient" else []
    facts = None if params.sparsity is not None else facts_from_config(model.files.config)
    job.work.mkdir(parents=True, exist_ok=True)
    documents, pad_id = _documents(job, params, model.path, retrain)
    current = model
    for index in range(1, params.steps + 1):
        place = job.work / f"round-{index}"
        last = index == params.steps
        if not last and (place / "trained").is_dir():
            current = _artifact(place / "trained")  # a round finished before the run was stopped
            continue
        place.mkdir(exist_ok=True)
        remove_stale_temporaries(place)
        if not (place / "pruned").is_dir():
            step = round_pass(params, facts, index, params.steps)
            _atomically(place / "pruned", lambda out: prune_once(
                dataclasses.replace(job, inputs=[current, *data], out=out, progress=Meter()), params, step))
        config = retrain_config(params).model_copy(update={"seed": params.seed + index - 1})
        trained = _train_round(job, params, place, config, documents, pad_id, index)
        if last:
            digest = _save(trained, place / "pruned", job.out)
            _write_metrics(job.work, params.steps, job.out)
            return digest
        _atomically(place / "trained", lambda out: _save(trained, place / "pruned", out))
        current = _artifact(place / "trained")
    raise AssertionError("steps >= 1 is checked before the run")


def _documents(job: Job, params, model_dir: Path, retrain: Artifact):
    """The retraining corpus tokenized by the model's tokenizer (cached in the work directory), and the pad id;
    the tokenizer is the input's in every round (pruning keeps it)."""
    try:
        return tokenized(dataclasses.replace(job, inputs=[job.inputs[0], retrain]), "cp", params, model_dir, None)
    except TextPrepError as err:
        raise RunFailure("E616", f"cannot prepare the corpus `retrain` of `{job.node.label}`: {err.message}",
                         err.hint) from None


def _artifact(path: Path) -> Artifact:
    return Artifact(Kind.MODEL, path, "")  # read by path only: its digest is never asked


def _atomically(final: Path, build) -> None:
    """Run `build(directory)` into a temporary sibling of `final`, then rename it into place."""
    building = final.parent / f"{TMP_PREFIX}{final.name}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    build(building)
    os.replace(building, final)
    fsync_dir(final.parent)


def _train_round(job: Job, params, place: Path, config: TrainConfig, documents, pad_id: int, index: int):
    """The round's pruned model trained on the corpus, its pruned weights held at zero; resumes in `place`."""
    import transformers

    transformers.logging.disable_progress_bar()
    label = f"`{job.node.label}` (round {index} of {params.steps})"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(place / "pruned"), dtype=torch.float32)
    except (ValueError, OSError) as err:
        raise RunFailure("E616", f"{label} cannot be retrained: it does not load as a causal LM ({err})",
                         "iterative pruning trains with next-token loss: llama and gpt2 models with their LM "
                         "head") from None
    if params.sparsity is not None:
        _hold_zeros(model, targeted(signature_of_files(_artifact(place / "pruned").files), params.targets))

    def report(progress: Progress) -> None:
        job.progress.update((index - 1) * progress.total + progress.step, params.steps * progress.total, "steps")

    def notice(text: str) -> None:
        job.warn("E573", f"{label}: {text}", "the damaged checkpoint was passed over; nothing is lost")

    try:
        trained, _ = train(model, documents, config, place / "train", on_progress=report, on_notice=notice,
                           pad_id=pad_id)
    except TrainingError as err:
        raise RunFailure("E615", f"recovery training of {label} stopped: {err.message}", err.hint) from None
    return trained


def _hold_zeros(model, names: list[str]) -> None:
    """Mask the gradient of every weight that is zero in the targeted tensors: AdamW then never moves it."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for name in names:
        parameters[name].register_hook(_ZeroGradient(parameters[name].detach() == 0))


class _ZeroGradient:
    """A gradient hook that zeroes the gradient where `pruned` is true (moved once to the gradient's device)."""

    def __init__(self, pruned: torch.Tensor):
        self.pruned = pruned

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if self.pruned.device != grad.device:
            self.pruned = self.pruned.to(grad.device)  # where accelerate put the model
        return grad.masked_fill(self.pruned, 0)


def _save(model, pruned: Path, out: Path) -> str:
    """The trained weights in the pruned model's names, dtypes and shapes, and its other files; the digest."""
    state = model.state_dict()
    files = _artifact(pruned).files
    layout = [TensorSpec(name, entry.dtype, tuple(entry.shape)) for name, entry in sorted(files.tensors.items())]
    writer = ModelWriter(out, layout, SHARD_SIZE)
    try:
        for spec in layout:
            writer.write(spec.name, state[spec.name].detach().to(TORCH_DTYPES[spec.dtype]).contiguous())
        digest = writer.finish()
    finally:
        writer.close()
    weights = {path.name for path in weight_files(pruned)} | {INDEX_FILE}
    for entry in sorted(pruned.iterdir()):
        if entry.is_file() and entry.name not in weights:
            shutil.copyfile(entry, out / entry.name)
    return digest


def _write_metrics(work: Path, rounds: int, out: Path) -> None:
    """Every round's metrics in one file, steps and tokens counted across rounds, and the loss curve drawn
    from them."""
    lines, steps, tokens = [], 0, 0
    for index in range(1, rounds + 1):
        records = read_metrics(work / f"round-{index}" / "train" / METRICS)
        for record in records:
            kept = {k: record[k] for k in REPRODUCIBLE_FIELDS if k in record}
            kept.update(round=index, step=steps + record["step"], tokens=tokens + record["tokens"])
            lines.append(json.dumps(kept, sort_keys=True))
        steps, tokens = steps + len(records), tokens + (records[-1]["tokens"] if records else 0)
    (out / RELEASED_METRICS).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    render_loss_curve(out / RELEASED_METRICS, out / LOSS_CURVE)
