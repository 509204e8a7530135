"""The one training loop behind cp, inscp and sft: packed documents, next-token loss, AdamW, checkpoints.

`train` takes a transformers causal LM, a source of tokenized documents and a `TrainConfig`, and trains
through accelerate, so the same code runs on one CPU or, under `accelerate launch`, on many processes
(DDP, FSDP, DeepSpeed as the launch config says). Every process reads the same seeded row stream and
takes its own slice of each global batch, so the data order depends on the seed alone, not on the
number of processes.

The loss of a step is the summed cross entropy over every target token of the step (all micro-batches,
all processes) divided by their total count, so a micro-batch with few targets weighs no more than its
tokens. A work directory holds checkpoints (checkpoint.py) and metrics (metrics.py); calling `train`
again with the same work directory resumes from the newest good checkpoint and, on CPU, ends with the
same bytes as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ...ops.train_config import TrainConfig, TrainingError, batch_shape, passes_needed, sequences_in, total_steps
from .attention import packed_attention
from .checkpoint import latest_good_checkpoint, remove_unfinished, save_checkpoint
from .metrics import METRICS, Trackers, append_metrics, truncate_metrics
from .packing import IGNORE, DocumentSource, Row, collate, corpus_tokens, row_stream
from .schedule import optimizer_and_schedule


@dataclass(frozen=True)
class Progress:
    """What a progress line shows after an optimizer step."""

    step: int
    total: int
    loss: float
    tokens_per_s: float
    eta_s: float


@dataclass
class TrainSummary:
    """What a finished run did; `notices` says what it recovered from (damaged checkpoints)."""

    steps: int
    tokens: int
    target_tokens: int
    final_loss: float
    seconds: float
    resumed_from: int | None = None
    notices: list[str] = field(default_factory=list)


@dataclass
class _Position:
    """Where the run stands: the trainer state a checkpoint keeps besides accelerate's."""

    step: int = 0
    rows_read: int = 0
    tokens: int = 0
    target_tokens: int = 0
    seconds: float = 0.0
    loss: float = math.nan


# A training objective: (logits, input_ids, position_ids, labels) of one micro-batch, all on the model's device,
# -> the loss summed over the batch's target tokens (labels other than IGNORE); the loop divides by their count.
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy in fp32 summed over the target tokens: the objective of cp, inscp and sft."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def train(model, documents: DocumentSource, config: TrainConfig, work_dir: Path, *,
          on_progress: Callable[[Progress], None] | None = None,
          on_notice: Callable[[str], None] | None = None,
          pad_id: int = 0, objective: Objective = next_token_loss, trackers: Trackers | None = None,
          run_name: str = "train") -> tuple[torch.nn.Module, TrainSummary]:
    """Train `model` on `documents` as `config` says, checkpointing into `work_dir`; resumes if it can.
    `objective` is what a step minimizes (next-token cross entropy unless given: distill passes its own);
    each step's metrics also go to `trackers` (accelerate's), under `run_name`, when given. The model
    attends to each packed document on its own while it trains (attention.py)."""
    with packed_attention(model):
        return _train(model, documents, config, work_dir, on_progress, on_notice, pad_id, objective, trackers,
                      run_name)


def _train(model, documents: DocumentSource, config: TrainConfig, work_dir: Path,
           on_progress: Callable[[Progress], None] | None, on_notice: Callable[[str], None] | None,
           pad_id: int, objective: Objective, trackers: Trackers | None,
           run_name: str) -> tuple[torch.nn.Module, TrainSummary]:
    work_dir.mkdir(parents=True, exist_ok=True)
    accelerator = _accelerator(config.precision, trackers)
    shape = batch_shape(config, accelerator.num_processes)
    _check_model(model, config.seq_len)
    total = _checked_length(documents, config)

    torch.manual_seed(config.seed)  # dropout; a resume restores every RNG from the checkpoint instead
    optimizer, scheduler = optimizer_and_schedule(model, config, total)
    model.train()
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    if trackers is not None:
        accelerator.init_trackers(run_name, config=_loggable(config))
    notices: list[str] = []
    position, resumed_from = _resume(accelerator, work_dir, config, notices)
    for notice in notices:
        if on_notice and accelerator.is_main_process:
            on_notice(notice)

    rows = itertools.islice(row_stream(documents, config.seq_len, passes_needed(config), config.seed,
                                       config.shuffle_buffer), position.rows_read, None)
    vocab = accelerator.unwrap_model(model).get_input_embeddings().num_embeddings
    started, first_step, first_tokens = time.monotonic(), position.step, position.tokens
    while position.step < total:
        global_rows = list(itertools.islice(rows, config.batch))
        if not global_rows:
            break
        loss, grad_norm, target_tokens = _optimizer_step(accelerator, model, optimizer, config, shape,
                                                         global_rows, vocab, pad_id, position.step, objective)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        elapsed = time.monotonic() - started
        step_tokens = sum(len(row.ids) for row in global_rows)
        position.step += 1
        position.rows_read += len(global_rows)
        position.tokens += step_tokens
        position.target_tokens += target_tokens
        position.loss = loss
        tokens_per_s = (position.tokens - first_tokens) / max(elapsed, 1e-9)
        if accelerator.is_main_process:
            record = {"step": position.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens": position.tokens, "tokens_per_s": tokens_per_s}
            append_metrics(work_dir / METRICS, record)
            if trackers is not None:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=position.step)
            if on_progress:
                eta = elapsed / (position.step - first_step) * (total - position.step)
                on_progress(Progress(position.step, total, loss, tokens_per_s, eta))
        if config.save_every and position.step % config.save_every == 0:
            save_checkpoint(accelerator, work_dir, _trainer_state(position, config, accelerator.num_processes,
                                                                  time.monotonic() - started))

    seconds = position.seconds + time.monotonic() - started
    if trackers is not None:
        accelerator.end_training()
    trained = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    return trained, TrainSummary(position.step, position.tokens, position.target_tokens, position.loss,
                                 seconds, resumed_from, notices)


def _loggable(config: TrainConfig) -> dict:
    """The settings as trackers take hyperparameters: numbers, strings and booleans, nothing unset."""
    return {k: v for k, v in config.model_dump().items() if isinstance(v, (int, float, str, bool))}


def _accelerator(precision: str, trackers: Trackers | None = None):
    """An Accelerator for the precision asked (auto: bf16 mixed precision on a GPU, fp32 elsewhere),
    logging to `trackers` when given."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    mixed = {"fp32": "no", "bf16": "bf16", "auto": "bf16" if torch.cuda.is_available() else "no"}[precision]
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed and PartialState().num_processes == 1:
        # accelerate keeps one precision per process; a single-process driver running several training
        # nodes in turn may need another one for the next node.
        AcceleratorState._reset_state()
    # The scheduler steps once per optimizer step; by default accelerate would step it once per process.
    # Without a GPU, `cpu=True` is what makes accelerate join processes started by torchrun (gloo); else
    # each would train alone, unaware of the others.
    logging = {"log_with": list(trackers.names), "project_dir": str(trackers.directory)} if trackers else {}
    return Accelerator(mixed_precision=mixed, step_scheduler_with_optimizer=False,
                       cpu=not torch.cuda.is_available(), **logging)


def _checked_length(documents: DocumentSource, config: TrainConfig) -> int:
    """Optimizer steps of the run, after making sure the corpus holds what it asks for."""
    tokens = corpus_tokens(documents)
    if tokens == 0:
        raise TrainingError("the corpus holds no tokens", "check that the data is not empty or filtered to nothing")
    if config.tokens is not None and config.tokens > tokens:
        raise TrainingError(f"tokens={config.tokens} is more than the corpus holds ({tokens} tokens)",
                            "lower `tokens`, or give `epochs` to read the corpus more than once")
    if config.steps is not None and config.steps * config.batch > sequences_in(tokens, config.seq_len):
        raise TrainingError(
            f"steps={config.steps} at batch={config.batch} needs {config.steps * config.batch} sequences of "
            f"{config.seq_len} tokens; the corpus fills {sequences_in(tokens, config.seq_len)}",
            "lower `steps`, or give `epochs` to read the corpus more than once")
    return total_steps(config, tokens)


def _check_model(model, seq_len: int) -> None:
    """Refuse what would fail deep in a run: too short positions, or packing that leaks across documents."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and seq_len > positions:
        raise TrainingError(f"seq_len={seq_len} is beyond the model's {positions} positions",
                            f"set `seq_len` to at most {positions}")
    if not packing_isolates(model):
        raise TrainingError(
            f"{type(model).__name__} lets packed documents attend to each other",
            "use a model family whose attention masks follow position_ids (Llama, GPT-2, Qwen2, Mistral, ...)")


def packing_isolates(model) -> bool:
    """Whether the model keeps packed documents apart: a document's logits are the same alone and packed."""
    embeddings = model.get_input_embeddings()
    ids = torch.arange(1, 7, device=embeddings.weight.device) % embeddings.num_embeddings
    was_training = model.training
    model.eval()
    with torch.no_grad():
        alone = model(input_ids=ids[None, 3:], use_cache=False).logits.float()
        packed = model(input_ids=ids[None], position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]], device=ids.device),
                       attention_mask=None, use_cache=False).logits[:, 3:].float()
    model.train(was_training)
    tolerance = 1e-3 if embeddings.weight.dtype == torch.float32 else 5e-2
    return torch.allclose(alone, packed, atol=tolerance, rtol=tolerance)


def _resume(accelerator, work_dir: Path, config: TrainConfig, notices: list[str]) -> tuple[_Position, int | None]:
    """Load the newest good checkpoint into the prepared objects; a fresh position when there is none."""
    if accelerator.is_main_process:
        remove_unfinished(work_dir)
    accelerator.wait_for_everyone()
    directory, state, passed_over = latest_good_checkpoint(work_dir)
    notices.extend(passed_over)
    if directory is None:
        if passed_over:
            notices.append("no good checkpoint left: training starts over")
        if accelerator.is_main_process:
            truncate_metrics(work_dir / METRICS, 0)
        return _Position(), None
    expected = _settings(config, accelerator.num_processes)
    if state["settings"] != expected:
        raise TrainingError(f"{directory} was saved by a run with other settings",
                            "give this run its own work directory, or delete the old checkpoints")
    accelerator.load_state(str(directory))
    if passed_over:
        notices.append(f"resuming from {directory.name}")
    if accelerator.is_main_process:
        truncate_metrics(work_dir / METRICS, state["step"])
    position = _Position(**{k: state[k] for k in ("step", "rows_read", "tokens", "target_tokens", "seconds", "loss")})
    return position, position.step


def _settings(config: TrainConfig, world_size: int) -> dict:
    """What must match for a checkpoint to be resumed: every setting that shapes the result."""
    return {**config.model_dump(exclude={"save_every"}), "world_size": world_size}


def _trainer_state(position: _Position, config: TrainConfig, world_size: int, seconds: float) -> dict:
    return {"step": position.step, "rows_read": position.rows_read, "tokens": position.tokens,
            "target_tokens": position.target_tokens, "seconds": position.seconds + seconds, "loss": position.loss,
            "settings": _settings(config, world_size)}


def _micro_batches(global_rows: list[Row], shape, process: int, pad_id: int) -> list:
    """This process's slice of a global batch, as collated micro-batches (at least one, to stay in step)."""
    mine = global_rows[process * shape.per_process:(process + 1) * shape.per_process]
    if not mine:
        # The last step of a run may hold fewer rows than processes: a row without targets keeps this
        # process in the gradient all-reduce while adding nothing to it.
        mine = [Row((pad_id,), (0,), (0,))]
    return [collate(mine[i:i + shape.micro_batch], pad_id) for i in range(0, len(mine), shape.micro_batch)]


def _optimizer_step(accelerator, model, optimizer, config: TrainConfig, shape, global_rows: list[Row],
                    vocab: int, pad_id: int, step: int, objective: Objective) -> tuple[float, float, int]:
    """One optimizer step over a global batch; returns its loss, the gradient norm and its target count."""
    micro = _micro_batches(global_rows, shape, accelerator.process_index, pad_id)
    if max(int(m.input_ids.max()) for m in micro) >= vocab:
        raise TrainingError(f"the data holds token ids beyond the model's vocabulary of {vocab}",
                            "tokenize the data with the model's own tokenizer")
    local_targets = torch.tensor(sum(m.target_tokens for m in micro), device=accelerator.device)
    global_targets = int(accelerator.reduce(local_targets, reduction="sum"))
    # Gradients are averaged over processes; scaling by their number turns that into a sum over all targets.
    scale = accelerator.num_processes / max(global_targets, 1)
    loss_sum = torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(micro):
        last = index == len(micro) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            input_ids, position_ids, labels = (t.to(accelerator.device)
                                               for t in (batch.input_ids, batch.position_ids, batch.labels))
            logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False).logits
            summed = objective(logits, input_ids, position_ids, labels)
            accelerator.backward(summed * scale)
        loss_sum += summed.detach()
    loss = float(accelerator.reduce(loss_sum, reduction="sum")) / max(global_targets, 1)
    max_norm = config.max_grad_norm or math.inf
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"the loss became {loss} (gradient norm {grad_norm}) at step {step + 1}",
                            "lower `lr` or raise `warmup`; the last good checkpoint in the work directory is kept")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, global_targets
