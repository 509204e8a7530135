"""The `onnx` rule: a model exported with torch.onnx (dynamo), checked, and kept only when it is right.

The model is loaded in fp32 through transformers' Auto classes (so recipec's own model classes, registered
on `import recipec`, export the same way) and wrapped so that the graph takes `input_ids` and
`attention_mask`, with dynamic batch and sequence axes, and gives one output: `logits`, or
`last_hidden_state` for a headless encoder. The graph is written in the node's work directory, then
`onnx.checker` checks it (by path, so external data is followed) and onnxruntime runs it on two input
shapes — one row unpadded, one left-padded, one right-padded — against PyTorch, compared where
`attention_mask` is 1 (padded positions are never compared: their values mean nothing and differ). Only a
graph that passes both is moved into the result; a failure names the worst output, position and
difference, and leaves nothing behind.

With `with_cache=true` (decoders) the rule writes a pair instead: `model.onnx`, the prefill, and
`decode.onnx`, one step on a KV cache, both traced from one module (`cache_step_module`) that rebuilds
transformers' cache from plain tensors: inputs `input_ids`, `attention_mask` (cached and new positions),
`position_ids` (as `generate` computes them under padding) and, for the decode step, `past_key_values.N.key`
and `.value` of shape (batch, key/value heads of layer N, past, head size); outputs `logits` and
`present.N.key`/`.value`, the cache to feed back. Per-layer head counts just give each layer's tensors
their own shape. The decode step is traced on several new tokens and a cache of several positions, so both
axes stay dynamic (one token per step is the usual use). Besides the logits parity of the prefill, a
greedy generation (two prompts, one left-padded) through the pair in onnxruntime must match transformers'
`generate`, logits at every step and tokens. Each graph holds its own copy of the weights.

Two exports of one model give the same bytes: the exporter is deterministic given the toolchain (in the
key), and the per-node metadata it adds (stack traces with source paths, fx node names) is removed, so
the bytes do not depend on where Python or recipec are installed. The parity check runs on one thread in
both runtimes, so `parity.json`'s numbers are reproducible too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts.onnx import DECODE_FILE, GRAPH_FILE, PARITY_FILE
from ..ops.export import GENERATED, GENERATION_PROMPTS, Onnx, cache_problem, family_problem
from ..store.model_dir import TOKENIZER_FILES
from ..store.release_files import CODE_FILES, code_references, without_code_references
from .job import Job, RunFailure
from .measure import cache_keyword, cache_of
from .threads import torch_threads

ATOL, RTOL = 1e-4, 1e-3  # fp32 parity: |onnx - torch| <= ATOL + RTOL * |torch| at every compared value
# Weights above this go to an external data file beside the graph: a protobuf message (the graph) cannot
# exceed 2 GiB, and the graph's own nodes need room too.
EXTERNAL_DATA_ABOVE = 2 * 10**9
EXPORT_SHAPE = (2, 8)  # the example the graph is traced with; parity uses other shapes, so axes must be dynamic
INPUT_NAMES = ("input_ids", "attention_mask")
CACHE_INPUT_NAMES = (*INPUT_NAMES, "position_ids")  # a KV cache's graphs take positions: padding shifts them
PAST_LENGTH, NEW_TOKENS = 6, 3  # the decode step is traced on this cache and new tokens (never 0 or 1: dynamic)
STAGES = 4  # load, export, check, parity


@dataclass(frozen=True)
class ParityCase:
    """One input of the parity check: token ids, the attention mask, and how it is padded."""

    name: str
    input_ids: np.ndarray
    attention_mask: np.ndarray


@dataclass(frozen=True)
class Mismatch:
    """The worst disagreement of one case: where, by how much, and what was allowed there."""

    case: str
    index: tuple[int, ...]
    expected: float
    actual: float
    difference: float
    allowed: float


def parity_cases(vocab_size: int) -> list[ParityCase]:
    """Two shapes unlike the traced one: 1×5 unpadded, and 3×11 with a left-padded, a right-padded and a full row."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, vocab_size, (1, 5), dtype=np.int64)
    large = rng.integers(0, vocab_size, (3, 11), dtype=np.int64)
    mask = np.ones((3, 11), dtype=np.int64)
    mask[0, :4] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    large[mask == 0] = 0
    return [ParityCase("1x5, no padding", small, np.ones((1, 5), dtype=np.int64)),
            ParityCase("3x11, left and right padding", large, mask)]


def worst_mismatch(case: str, expected: np.ndarray, actual: np.ndarray, mask: np.ndarray,
                   atol: float, rtol: float) -> tuple[float, Mismatch | None]:
    """(largest |difference| where the mask is 1, the worst value beyond tolerance or None). NaN counts as
    an infinite difference; values of padded positions are not compared."""
    compared = mask.astype(bool)
    difference = np.nan_to_num(np.abs(actual.astype(np.float64) - expected), nan=np.inf)
    allowed = atol + rtol * np.abs(expected.astype(np.float64))
    excess = np.where(compared.reshape(compared.shape + (1,) * (expected.ndim - 2)), difference - allowed, -np.inf)
    largest = float(np.max(np.where(excess > -np.inf, difference, 0.0)))
    index = np.unravel_index(int(np.argmax(excess)), excess.shape)
    if not excess[index] > 0:
        return largest, None
    return largest, Mismatch(case, tuple(int(i) for i in index), float(expected[index]), float(actual[index]),
                             float(difference[index]), float(allowed[index]))


def auto_class_name(architecture: str | None) -> str:
    """The Auto class that loads a model of `architecture` with its head (none for a headless encoder)."""
    if architecture and architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return "AutoModelForCausalLM"
    if architecture and architecture.endswith("ForMaskedLM"):
        return "AutoModelForMaskedLM"
    return "AutoModel"


def load_model(model_dir: Path):
    """The model in fp32, in eval mode, without a KV cache (the graph is a logits graph)."""
    import torch
    import transformers

    import recipec  # noqa: F401  (registers recipec's model classes with the Auto classes)

    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    auto = getattr(transformers, auto_class_name((config.architectures or [None])[0]))
    model = auto.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    model.config.use_cache = False
    return model.eval()


def graph_module(model):
    """`model` as a module of (input_ids, attention_mask) -> its one output, and that output's name."""
    import torch

    class OneOutput(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            return out.logits if output == "logits" else out.last_hidden_state

    ids = torch.ones(EXPORT_SHAPE, dtype=torch.long)
    with torch.no_grad():
        probe = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    output = "logits" if getattr(probe, "logits", None) is not None else "last_hidden_state"
    return OneOutput().eval(), output


@contextlib.contextmanager
def quiet():
    """Without the libraries' chatter on stderr — transformers' loading bar, the exporter's log lines about
    optional torchvision ops and its deprecation and axis-naming warnings — which say nothing about the model."""
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    logging.disable(logging.WARNING)  # torch sets its loggers' levels itself: only this reaches them all
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)
        if bars:
            transformers_logging.enable_progress_bar()


def export_graph(module, output: str, opset: int, graph_path: Path, external: bool) -> None:
    """Trace `module` with dynamic batch and sequence axes and write its graph (and external data)."""
    import torch

    ids = torch.ones(EXPORT_SHAPE, dtype=torch.long)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    axes = {name: {0: batch, 1: sequence} for name in INPUT_NAMES}
    write_program(module, (ids, torch.ones_like(ids)), INPUT_NAMES, [output], axes, opset, graph_path, external)


def write_program(module, example: tuple, inputs, outputs, axes, opset: int, graph_path: Path, external: bool) -> None:
    """Trace `module` on `example` with the dynamic `axes`, and write the graph without the exporter's
    per-node metadata (stack traces with source paths, fx names: not part of the graph)."""
    import torch

    with torch.no_grad():
        program = torch.onnx.export(module, example, dynamo=True, input_names=list(inputs),
                                    output_names=list(outputs), dynamic_shapes=axes, opset_version=opset,
                                    verbose=False, report=False, optimize=True)
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()
        node.doc_string = None
    program.save(str(graph_path), external_data=external)


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """The KV cache's graph inputs (`past_key_values.N.key`, ...) and outputs (`present.N.key`, ...), per layer."""
    parts = [f"{n}.{which}" for n in range(layers) for which in ("key", "value")]
    return [f"past_key_values.{p}" for p in parts], [f"present.{p}" for p in parts]


def cache_step_module(model):
    """`model` as a module of (input_ids, attention_mask, position_ids, past key/value tensors) -> (logits,
    present key/value tensors): one generation step on a KV cache held in plain tensors, which ONNX can carry.
    With no past it is the prefill."""
    import torch
    from transformers import DynamicCache

    keyword = cache_keyword(type(model))

    class CacheStep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, past=()):
            cache = DynamicCache(config=self.model.config)
            for layer in range(len(past) // 2):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{keyword: cache})
            present = [t for layer in cache_of(out).layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return CacheStep().eval()


def export_cache_pair(model, opset: int, folder: Path, external: bool):
    """The prefill (`model.onnx`) and decode (`decode.onnx`) graphs of a decoder with a KV cache, written in
    `folder`: the module both trace, and the names of the cache's inputs and outputs."""
    import torch

    step = cache_step_module(model)
    layers = model.config.num_hidden_layers
    past_names, present_names = cache_names(layers)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    total, past_length = torch.export.Dim("total_sequence"), torch.export.Dim("past_sequence")
    ids = torch.ones(EXPORT_SHAPE, dtype=torch.long)
    positions = torch.arange(EXPORT_SHAPE[1]).expand(EXPORT_SHAPE)
    axes = ({0: batch, 1: sequence},) * 3
    write_program(step, (ids, torch.ones_like(ids), positions), CACHE_INPUT_NAMES, ["logits", *present_names],
                  axes, opset, folder / GRAPH_FILE, external)
    with torch.no_grad():
        cached = step(ids[:, :PAST_LENGTH], torch.ones_like(ids[:, :PAST_LENGTH]), positions[:, :PAST_LENGTH])[1:]
    new = torch.ones((EXPORT_SHAPE[0], NEW_TOKENS), dtype=torch.long)
    length = PAST_LENGTH + NEW_TOKENS
    example = (new, torch.ones((EXPORT_SHAPE[0], length), dtype=torch.long),
               torch.arange(PAST_LENGTH, length).expand(new.shape), tuple(t.contiguous() for t in cached))
    axes = ({0: batch, 1: sequence}, {0: batch, 1: total}, {0: batch, 1: sequence},
            tuple({0: batch, 2: past_length} for _ in cached))
    write_program(step, example, [*CACHE_INPUT_NAMES, *past_names], ["logits", *present_names], axes, opset,
                  folder / DECODE_FILE, external)
    return step, past_names


def exported_graph(model, graph_path: Path, opset: int):
    """`model` exported to `graph_path` (its weights in an external data file beside it when they are large):
    the module that was traced, and its output's name. What `onnx` builds and `stats` times."""
    module, output = graph_module(model)
    export_graph(module, output, opset, graph_path, large(model))
    return module, output


def large(model) -> bool:
    """Whether the model's fp32 weights go to an external data file beside its graph."""
    return sum(p.numel() for p in model.parameters()) * 4 > EXTERNAL_DATA_ABOVE


def check_graph(graph_path: Path) -> None:
    """onnx.checker over the file (by path, so that external data is checked where it lies)."""
    import onnx

    onnx.checker.check_model(str(graph_path))


def positions_of(mask: np.ndarray) -> np.ndarray:
    """Position ids of a (left- or right-) padded batch as transformers' `generate` computes them: each row
    counts its own tokens from 0; padded positions get 1 (their value does not matter)."""
    positions = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)


def session_of(graph_path: Path):
    """An onnxruntime session on one thread: reproducible numbers."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(graph_path), options, providers=["CPUExecutionProvider"])


def run_parity(module, graph_path: Path, cases: list[ParityCase], atol: float, rtol: float,
               with_positions: bool = False) -> tuple[list[dict], Mismatch | None]:
    """Each case through PyTorch and onnxruntime, one thread each (reproducible numbers): what was measured,
    and the worst mismatch of the first case that has one. The first output is compared (the logits of a
    graph with a KV cache, whose cache the generation check covers); `with_positions` feeds position ids."""
    import torch

    session = session_of(graph_path)
    output = session.get_outputs()[0].name
    measured, failure = [], None
    with torch_threads(1):
        for case in cases:
            feed = {"input_ids": case.input_ids, "attention_mask": case.attention_mask}
            if with_positions:
                feed["position_ids"] = positions_of(case.attention_mask)
            with torch.no_grad():
                expected = module(*(torch.from_numpy(v) for v in feed.values()))
            expected = (expected[0] if isinstance(expected, tuple) else expected).numpy()
            (actual,) = session.run([output], feed)
            largest, mismatch = worst_mismatch(case.name, expected, actual, case.attention_mask, atol, rtol)
            measured.append({"input": case.name, "shape": list(case.input_ids.shape),
                             "compared_positions": int(case.attention_mask.sum()),
                             "max_abs_difference": float(f"{largest:.2g}")})
            failure = failure or mismatch
    return measured, failure


def generation_prompts(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts for the generation check: a full row and a left-padded one, as a batch to `generate` is."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab_size, GENERATION_PROMPTS, dtype=np.int64)
    mask = np.ones(GENERATION_PROMPTS, dtype=np.int64)
    mask[1, :2] = 0
    ids[mask == 0] = 0
    return ids, mask


def greedy_reference(model, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """transformers' greedy `generate`: the GENERATED new tokens, and the raw logits of each step. No end
    token stops it (none is set), so every row has GENERATED tokens."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=GENERATED, eos_token_id=None, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), torch_threads(1):
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             generation_config=config)
    return out.sequences[:, ids.shape[1]:].numpy(), [step.numpy() for step in out.logits]


def greedy_onnx(prefill_path: Path, decode_path: Path, past_names: list[str], ids: np.ndarray,
                mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The same greedy generation through the prefill and decode graphs, the cache carried between them."""
    prefill, decode = session_of(prefill_path), session_of(decode_path)
    positions = positions_of(mask)
    logits, *present = prefill.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions})
    tokens, steps = [], []
    for step in range(GENERATED):
        steps.append(logits[:, -1])
        tokens.append(logits[:, -1].argmax(axis=-1))
        if step + 1 == GENERATED:
            break
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        feed = {"input_ids": tokens[-1][:, None].astype(np.int64), "attention_mask": mask, "position_ids": positions}
        logits, *present = decode.run(None, feed | dict(zip(past_names, present)))
    return np.stack(tokens, axis=1), steps


def generation_parity(model, folder: Path, past_names: list[str], label: str) -> dict:
    """Greedy generation through the graph pair against transformers' `generate`: what was measured; raises
    RunFailure E604 at the first step whose logits or token differ."""
    vocab = int(model.config.vocab_size)
    ids, mask = generation_prompts(vocab)
    expected_tokens, expected = greedy_reference(model, ids, mask)
    actual_tokens, actual = greedy_onnx(folder / GRAPH_FILE, folder / DECODE_FILE, past_names, ids, mask)
    rows = np.ones((ids.shape[0], 1), dtype=np.int64)
    largest = 0.0
    for step, (want, got) in enumerate(zip(expected, actual)):
        difference, mismatch = worst_mismatch(f"step {step}", want[:, None], got[:, None], rows, ATOL, RTOL)
        largest = max(largest, difference)
        if mismatch is not None:
            raise RunFailure("E604", f"the ONNX prefill + decode pair of `{label}` disagrees with transformers' "
                             f"greedy generation: the logits of new token {step} (row {mismatch.index[0]}, vocabulary "
                             f"index {mismatch.index[2]}) are {mismatch.actual:.6g} in onnxruntime and "
                             f"{mismatch.expected:.6g} in transformers, a difference of {mismatch.difference:.3g}",
                             GENERATION_HINT)
    if not np.array_equal(expected_tokens, actual_tokens):
        step = int(np.argmax((expected_tokens != actual_tokens).any(axis=0)))
        raise RunFailure("E604", f"the ONNX prefill + decode pair of `{label}` generates other tokens than "
                         f"transformers' greedy generation, from new token {step} on: "
                         f"{actual_tokens[:, step].tolist()} instead of {expected_tokens[:, step].tolist()}",
                         GENERATION_HINT)
    return {"prompts": f"{ids.shape[0]}x{ids.shape[1]}, one row left-padded", "new_tokens": GENERATED,
            "tokens_equal": True, "max_abs_difference": float(f"{largest:.2g}")}


GENERATION_HINT = ("nothing was kept. The KV cache traced differently from eager PyTorch: try another `opset`, or "
                   "drop `with_cache` for a logits graph, and report the model's config if it persists")


def mismatch_failure(label: str, output: str, mismatch: Mismatch) -> RunFailure:
    position = ", ".join(f"{axis} {i}" for axis, i in zip(("batch", "position", "index"), mismatch.index))
    return RunFailure(
        "E601", f"the ONNX graph of `{label}` disagrees with PyTorch: `{output}` at {position} (input "
        f"{mismatch.case}) is {mismatch.actual:.6g} in onnxruntime and {mismatch.expected:.6g} in PyTorch, "
        f"a difference of {mismatch.difference:.3g} where {mismatch.allowed:.3g} is allowed "
        f"(atol {ATOL:g} + rtol {RTOL:g} × |PyTorch|)",
        "nothing was kept. The exporter or the model's code traced differently from eager PyTorch: try "
        "another `opset` (`onnx(model, opset=20)`), and report the model's config if it persists")


def copy_model_files(source: Path, dest: Path) -> None:
    """The config and tokenizer files, so that the graph can be used without the model directory; code
    references are dropped (nothing runs code beside an ONNX graph)."""
    for name in ("config.json", *TOKENIZER_FILES):
        if not (source / name).is_file():
            continue
        if name in CODE_FILES:
            data = json.loads((source / name).read_text(encoding="utf-8"))
            if isinstance(data, dict) and code_references(data):
                text = json.dumps(without_code_references(data), indent=2, ensure_ascii=False) + "\n"
                (dest / name).write_text(text, encoding="utf-8")
                continue
        shutil.copyfile(source / name, dest / name)


def build_onnx(job: Job) -> None:
    staging = job.work / "export"  # a graph becomes the result only once it is checked
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with quiet():
            export_checked(job, staging)
        for path in sorted(staging.iterdir()):
            path.rename(job.out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_checked(job: Job, staging: Path) -> None:
    """Export the job's model into `staging` and check it there; raises RunFailure when it is wrong."""
    params = Onnx.params_of(job.node)
    source, label = job.inputs[0].path, job.node.inputs[0].label  # messages name the model, as the recipe does
    job.progress.update(0, STAGES, "stages")
    try:
        model = load_model(source)
    except (OSError, ValueError, KeyError) as err:
        raise RunFailure("E603", f"transformers cannot load `{label}` for export: {first_line(err)}",
                         "the model directory must load with transformers' Auto classes (after `import "
                         "recipec`, for recipec's own model classes)") from None
    problem = family_problem(model.config.model_type)  # a hub model whose type check time could not read
    if problem is not None:
        raise RunFailure("E467", *problem)
    problem = cache_problem(model.config.model_type) if params.with_cache else None
    if params.with_cache and problem is None and not hasattr(model, "generate"):
        problem = (f"`with_cache=true` needs a model with a language-model head; `{label}` has none",
                   "drop `with_cache` for a graph of its last hidden state")
    if problem is not None:
        raise RunFailure("E470", *problem)
    job.progress.update(1)
    graph_path = staging / GRAPH_FILE
    try:
        if params.with_cache:
            module, output = export_cache_pair(model, params.opset, staging, large(model))[0], "logits"
        else:
            module, output = exported_graph(model, graph_path, params.opset)
    except Exception as err:  # noqa: BLE001  torch.export and the translation raise many kinds of error
        raise RunFailure("E600", f"torch.onnx could not export `{label}`: {first_line(err)}",
                         "the model's code does not trace with torch.export; try another `opset`, or "
                         "export the model as a Hugging Face directory") from None
    job.progress.update(2)
    try:
        for graph in sorted(staging.glob("*.onnx")):
            check_graph(graph)
    except Exception as err:  # noqa: BLE001  onnx.checker raises ValidationError and C++ errors
        raise RunFailure("E602", f"the ONNX graph of `{label}` fails onnx.checker: {first_line(err)}",
                         "report it with the model's config: the exporter wrote an invalid graph") from None
    job.progress.update(3)
    vocab = int(getattr(model.config, "vocab_size", 0) or 2)
    measured, mismatch = run_parity(module, graph_path, parity_cases(vocab), ATOL, RTOL, params.with_cache)
    if mismatch is not None:
        raise mismatch_failure(label, output, mismatch)
    parity = {"output": output, "opset": params.opset, "atol": ATOL, "rtol": RTOL,
              "compared": "positions where attention_mask is 1", "inputs": measured}
    if params.with_cache:
        past_names = cache_names(model.config.num_hidden_layers)[0]
        parity |= {"graphs": {"prefill": GRAPH_FILE, "decode": DECODE_FILE},
                   "generation": generation_parity(model, staging, past_names, label)}
    (staging / PARITY_FILE).write_text(json.dumps(parity, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    copy_model_files(source, staging)
    job.progress.update(STAGES)


def first_line(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]

