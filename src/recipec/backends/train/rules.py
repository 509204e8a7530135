"""The rule behind `cp`, `inscp` and `sft`: tokenize the data as the op says, train with the loop, save a model.

The input model is loaded by transformers in fp32; its tokenizer comes from its directory (and the chat
template from `template=` when given). Tokenized data is kept by content in the work directory, so a run
killed mid-training tokenizes nothing again when it resumes from its checkpoints there. The result is a
normal HF folder: the input's config, tokenizer files and generation config, the weights in the input's
names and dtypes through the canonical writer, and beside them the metrics (`training_metrics.jsonl`:
step, loss, lr, grad_norm and tokens, the fields that do not depend on the machine's speed) and the loss
curve drawn from them. Under a launcher every process trains; only rank 0 writes the result.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from ...dtypes import TensorSpec
from ...ops import REGISTRY
from ...ops.train import ChatTrainParams, TrainParams, planned_shape, training_memory
from ...ops.train_config import TrainConfig, TrainingError, batch_shape, this_machine
from ...store.model_dir import TOKENIZER_FILES
from ...store.release_files import TRAINING_FILES
from ...store.tensors import TORCH_DTYPES, ModelWriter
from ...textprep import TextPrepError
from ..job import Job, RunFailure, checked_text
from ..model_files import set_chat_template
from .loop import Objective, Progress, next_token_loss, train
from .metrics import METRICS, Trackers, read_metrics, render_loss_curve
from .packing import Document

RELEASED_METRICS, LOSS_CURVE = TRAINING_FILES
REPRODUCIBLE_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens")  # not tokens_per_s: the machine's speed


def build_train(job: Job, objective: Objective = next_token_loss) -> str | None:
    """Train the model `job.inputs[0]` on the data `job.inputs[1]`; `distill` passes its own objective."""
    op = REGISTRY[job.node.op]
    params: TrainParams = op.params_of(job.node)
    _check_world_size(params)
    trackers = _trackers()
    import transformers

    transformers.logging.disable_progress_bar()  # the job's own progress is in steps, drawn by the driver
    model_dir = job.inputs[0].path
    job.work.mkdir(parents=True, exist_ok=True)
    template = _template(params)
    try:
        documents, pad_id = tokenized(job, op.name, params, model_dir, template)
    except TextPrepError as err:
        raise RunFailure("E571", f"cannot prepare the data of `{job.node.label}`: {err.message}", err.hint) from None
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = _with_planned_shape(job, params)
    try:
        trained, _ = train(model, documents, config, job.work,
                           on_progress=lambda p: _report(job, p), on_notice=lambda text: _notice(job, text),
                           pad_id=pad_id, objective=objective, trackers=trackers, run_name=job.node.label)
    except TrainingError as err:
        raise RunFailure("E570", f"training `{job.node.label}` stopped: {err.message}", err.hint) from None
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        raise _out_of_memory(job, params, config) from None
    if _rank() != 0:
        return None
    digest = _write_weights(job, trained)
    _copy_model_files(model_dir, job.out, template)
    _write_metrics(job.work / METRICS, job.out)
    return digest


def _with_planned_shape(job: Job, params: TrainParams) -> TrainConfig:
    """The loop's settings, with the micro-batch the plan chose from memory when the recipe gave none."""
    config = params.train_config()
    if config.micro_batch is not None or config.grad_accum is not None:
        return config
    shape = planned_shape(job.node.type.signature, params, this_machine())
    return config.model_copy(update={"micro_batch": shape.micro_batch, "grad_accum": shape.grad_accum})


def _trackers() -> Trackers | None:
    """The trackers `run --log-with` asked for, refused before training when they cannot log."""
    trackers = Trackers.from_environment()
    problem = trackers.problem() if trackers else None
    if problem:
        raise RunFailure("E586", f"cannot log to {', '.join(trackers.names)}: {problem}",
                         "install the tracker's package, or run without --log-with")
    return trackers


def is_out_of_memory(err: BaseException) -> bool:
    """torch's out-of-memory error on a GPU, Python's MemoryError, or a CPU allocator that cannot allocate."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def _out_of_memory(job: Job, params: TrainParams, config: TrainConfig) -> RunFailure:
    from ...units import human_bytes

    sig = job.node.type.signature
    micro = batch_shape(config, params.processes).micro_batch
    planned = ""
    if sig is not None:
        states, activations = training_memory(sig, params, micro)
        planned = (f"; the plan estimated {human_bytes(states + activations)} per device (weights, gradients, "
                   f"AdamW {human_bytes(states)} + activations {human_bytes(activations)})")
    device = this_machine()
    where = f"the GPU's {human_bytes(device.memory_bytes)}" if device.gpu else f"{human_bytes(device.memory_bytes)} of RAM"
    return RunFailure("E585", f"training `{job.node.label}` ran out of memory at micro-batch {micro} "
                              f"× {params.seq_len} tokens{planned}; this machine has {where}",
                      "give a smaller `micro_batch=` (the batch is accumulated), a shorter `seq_len`, more "
                      "processes, or shard the model (FSDP, ZeRO-3) in the --launch config; checkpoints are kept")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _check_world_size(params: TrainParams) -> None:
    """The launcher's process count must be the one the key says: it decides how the batch splits."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != params.processes:
        raise RunFailure("E572", f"the run has {world} process(es) but the recipe says processes={params.processes}",
                         f"give the op processes={world}, or launch it with {params.processes} process(es)")


def _template(params: TrainParams) -> str | None:
    """The text of `template=`, checked against the content the recipe was checked with."""
    given = getattr(params, "template", None)
    if given is None:
        return None
    return checked_text(given)


def tokenized(job: Job, mode: str, params: TrainParams, model_dir: Path, template: str | None):
    """A document source over the data tokenized for `mode` (cached in the work directory), and the pad id."""
    from ...artifacts.corpus import iter_texts
    from ...artifacts.dataset import iter_conversations
    from ...textprep.encode import chat_format, encode_conversation, encode_document, load_tokenizer, wrap_inscp
    from ...textprep.tokcache import cached_tokenization, tokenization_key

    tokenizer = load_tokenizer(model_dir)
    data = job.inputs[1]
    options: dict = {}
    if not isinstance(params, ChatTrainParams):  # plain documents: cp, distill
        def encoded():
            return (encode_document(tokenizer, text) for text in iter_texts(data))
    else:
        chat: ChatTrainParams = params
        fmt = chat_format(tokenizer, template)
        options = {"template": template, "system": chat.system, "loss": chat.loss}
        if mode == "inscp":
            def encoded():
                return (wrap_inscp(fmt, text, chat.system, chat.loss) for text in iter_texts(data))
        else:
            def encoded():
                return (encode_conversation(fmt, _with_system(messages, chat.system), chat.loss)
                        for messages in iter_conversations(data))
    key = tokenization_key(model_dir, data.digest, mode, options)
    docs = cached_tokenization(job.work / "tokens", key, encoded)

    def documents() -> Iterator[Document]:
        for index in range(len(docs)):
            ids, mask = docs.document(index)
            yield Document(ids.tolist(), mask.tolist())

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return documents, pad or 0


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    """A conversation with the recipe's system prompt first, unless it has its own."""
    if system is None or (messages and messages[0].get("role") == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


def _report(job: Job, progress: Progress) -> None:
    job.progress.update(progress.step, progress.total, "steps")


def _notice(job: Job, text: str) -> None:
    job.warn("E573", f"`{job.node.label}`: {text}", "the damaged checkpoint was passed over; nothing is lost")


def _write_weights(job: Job, model) -> str:
    """The trained weights in the input's tensor names, dtypes and shapes; their content digest."""
    state = model.state_dict()
    layout = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in sorted(job.inputs[0].files.tensors.items())]
    writer = ModelWriter(job.out, layout, shard_size=5 * 10**9)
    try:
        for spec in layout:
            writer.write(spec.name, state[spec.name].detach().to(TORCH_DTYPES[spec.dtype]).contiguous())
        return writer.finish()
    finally:
        writer.close()


def _copy_model_files(model_dir: Path, out: Path, template: str | None) -> None:
    """Config, tokenizer, generation config and chat template as the input had them (training keeps them)."""
    for name in ("config.json", *TOKENIZER_FILES):
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    if template is not None:
        set_chat_template(out, template)


def _write_metrics(metrics: Path, out: Path) -> None:
    """The run's per-step metrics, less what depends on the machine's speed, and the loss curve drawn from them."""
    records = [{k: r[k] for k in REPRODUCIBLE_FIELDS if k in r} for r in read_metrics(metrics)]
    (out / RELEASED_METRICS).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records),
                                        encoding="utf-8")
    render_loss_curve(out / RELEASED_METRICS, out / LOSS_CURVE)

