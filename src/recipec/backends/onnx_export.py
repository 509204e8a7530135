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

from ..artifacts.onnx import GRAPH_FILE, PARITY_FILE
from ..ops.export import Onnx, family_problem
from ..store.model_dir import TOKENIZER_FILES
from ..store.release_files import CODE_FILES, code_references, without_code_references
from .job import Job, RunFailure

ATOL, RTOL = 1e-4, 1e-3  # fp32 parity: |onnx - torch| <= ATOL + RTOL * |torch| at every compared value
# Weights above this go to an external data file beside the graph: a protobuf message (the graph) cannot
# exceed 2 GiB, and the graph's own nodes need room too.
EXTERNAL_DATA_ABOVE = 2 * 10**9
EXPORT_SHAPE = (2, 8)  # the example the graph is traced with; parity uses other shapes, so axes must be dynamic
INPUT_NAMES = ("input_ids", "attention_mask")
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
    with torch.no_grad():
        program = torch.onnx.export(module, (ids, torch.ones_like(ids)), dynamo=True, input_names=list(INPUT_NAMES),
                                    output_names=[output], dynamic_shapes=axes, opset_version=opset,
                                    verbose=False, report=False, optimize=True)
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()  # stack traces with source paths, fx names: not part of the graph
        node.doc_string = None
    program.save(str(graph_path), external_data=external)


def exported_graph(model, graph_path: Path, opset: int):
    """`model` exported to `graph_path` (its weights in an external data file beside it when they are large):
    the module that was traced, and its output's name. What `onnx` builds and `stats` times."""
    module, output = graph_module(model)
    external = sum(p.numel() for p in model.parameters()) * 4 > EXTERNAL_DATA_ABOVE
    export_graph(module, output, opset, graph_path, external)
    return module, output


def check_graph(graph_path: Path) -> None:
    """onnx.checker over the file (by path, so that external data is checked where it lies)."""
    import onnx

    onnx.checker.check_model(str(graph_path))


def run_parity(module, graph_path: Path, cases: list[ParityCase], atol: float,
               rtol: float) -> tuple[list[dict], Mismatch | None]:
    """Each case through PyTorch and onnxruntime, one thread each (reproducible numbers): what was measured,
    and the worst mismatch of the first case that has one."""
    import onnxruntime
    import torch

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(graph_path), options, providers=["CPUExecutionProvider"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    measured, failure = [], None
    try:
        for case in cases:
            with torch.no_grad():
                expected = module(torch.from_numpy(case.input_ids), torch.from_numpy(case.attention_mask)).numpy()
            (actual,) = session.run(None, {"input_ids": case.input_ids, "attention_mask": case.attention_mask})
            largest, mismatch = worst_mismatch(case.name, expected, actual, case.attention_mask, atol, rtol)
            measured.append({"input": case.name, "shape": list(case.input_ids.shape),
                             "compared_positions": int(case.attention_mask.sum()),
                             "max_abs_difference": float(f"{largest:.2g}")})
            failure = failure or mismatch
    finally:
        torch.set_num_threads(threads)
    return measured, failure


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
    job.progress.update(1)
    graph_path = staging / GRAPH_FILE
    try:
        module, output = exported_graph(model, graph_path, params.opset)
    except Exception as err:  # noqa: BLE001  torch.export and the translation raise many kinds of error
        raise RunFailure("E600", f"torch.onnx could not export `{label}`: {first_line(err)}",
                         "the model's code does not trace with torch.export; try another `opset`, or "
                         "export the model as a Hugging Face directory") from None
    job.progress.update(2)
    try:
        check_graph(graph_path)
    except Exception as err:  # noqa: BLE001  onnx.checker raises ValidationError and C++ errors
        raise RunFailure("E602", f"the ONNX graph of `{label}` fails onnx.checker: {first_line(err)}",
                         "report it with the model's config: the exporter wrote an invalid graph") from None
    job.progress.update(3)
    vocab = int(getattr(model.config, "vocab_size", 0) or 2)
    measured, mismatch = run_parity(module, graph_path, parity_cases(vocab), ATOL, RTOL)
    if mismatch is not None:
        raise mismatch_failure(label, output, mismatch)
    parity = {"output": output, "opset": params.opset, "atol": ATOL, "rtol": RTOL,
              "compared": "positions where attention_mask is 1", "inputs": measured}
    (staging / PARITY_FILE).write_text(json.dumps(parity, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    copy_model_files(source, staging)
    job.progress.update(STAGES)


def first_line(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]

