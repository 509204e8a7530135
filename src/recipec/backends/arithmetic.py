"""The streaming rule for `combine`: Σ c_i·m_i, tensor by tensor, chunk by chunk, in fp32.

Each output tensor is computed in chunks of `STREAM_CHUNK_ELEMENTS` straight from the memory-mapped
inputs: the first input is copied into a preallocated fp32 buffer and scaled, every other input is
added with its coefficient (fp32 accumulation), and the sum is cast into a staging buffer of the output
dtype and written at its place in the output file. Chunks are fixed by the tensor's size alone and every
torch op here is elementwise on one thread, so the bytes never depend on how many threads ran.

Per-tensor policies: `norms="keep"` keeps the first model's norm weights; `embeddings` decides the
vocabulary tensors when vocabularies differ ("keep" the first model's rows, or "overlap": combine the
rows all models share, keep the first model's extra rows); `special_tokens="chat"` then takes the
special tokens' rows from the chat model (the leaf with the largest positive coefficient after the
first), as the chat-vector method intends. A tied model's output projection is its input embedding;
the output ties, or not, as the first model does.
"""

from __future__ import annotations

import contextlib
import fnmatch
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .. import arch
from ..dtypes import TensorSpec
from ..ops.arithmetic import (COMPUTE_DTYPES, STREAM_AHEAD_BYTES_PER_WORKER, STREAM_CHUNK_ELEMENTS,
                              STREAM_WRITE_BYTES, STREAM_WRITERS, UNCOMPUTABLE_HINT, Combine, VocabularyPolicy,
                              output_signature, overridden_coefficients, parse_overrides, uncomputable_message)
from ..ops.sources import signature_of_files
from ..store.tensors import TORCH_DTYPES, ModelReader, ModelWriter, OrderedModelWriter, count_nonfinite
from .job import Job, RunFailure
from .model_files import chat_leaf, check_shared_tokens, copy_model_files, tokenizer_rows

_TIED_SOURCES = ("model.embed_tokens.weight", "transformer.wte.weight")


@dataclass(frozen=True)
class TensorPlan:
    """How one output tensor is made: which inputs, which coefficients, which rows."""

    name: str
    sources: tuple[str | None, ...]  # per input, the tensor name to read (None: input lacks it)
    coefficients: tuple[float, ...]  # combine: one per input; merge: the weights, one per merged model
    rows: int | None = None  # combine only the first `rows` rows; the rest come from the first model
    row_overrides: tuple[tuple[int, int], ...] = ()  # (row, input index) copied verbatim
    copy_first: bool = False  # a "keep" policy: the first model's tensor, unchanged


def source_name(files, name: str) -> str | None:
    if name in files.tensors:
        return name
    if name == "lm_head.weight":  # a tied model's output projection is its input embedding
        return next((t for t in _TIED_SOURCES if t in files.tensors), None)
    return None


def _override_factor(name: str, overrides: list[str]) -> float | None:
    return next((factor for pattern, factor in parse_overrides(overrides) if fnmatch.fnmatchcase(name, pattern)),
                None)


def combine_coefficients(params: Combine.Params, name: str) -> tuple[float, ...]:
    """A combine's coefficients for tensor `name`, with its `overrides` factor applied."""
    factor = _override_factor(name, params.overrides)
    return params.coefficients if factor is None else overridden_coefficients(params.coefficients, factor)


def tensor_plans(job: Job, out: list[TensorSpec], policy: VocabularyPolicy, weights: tuple[float, ...],
                 coefficients_of: Callable[[str], tuple[float, ...]]) -> list[TensorPlan]:
    """Decide, for every output tensor, where its values come from under the vocabulary `policy`
    (`embeddings`, `norms`, `special_tokens`, shared by combine and merge); raises RunFailure on misfit
    inputs. `weights` are the inputs' (a merge's base left out), which say which one is the chat model;
    `coefficients_of(name)` gives the coefficients a tensor is combined with."""
    inputs = [a.files for a in job.inputs]
    first = inputs[0]
    vocab_names = set(arch_vocab_tensors(first.config))
    # Under a row policy, special tokens' rows are copied whole from one model: the chat model's (the
    # chat-vector method's intent) or the first model's.
    special_source = chat_leaf(weights) if policy.special_tokens == "chat" else 0
    special_rows = (sorted(tokenizer_rows(job.inputs[special_source].path, special=True))
                    if special_source is not None else [])
    plans, tokens_checked = [], False
    for t in out:
        sources = tuple(source_name(f, t.name) for f in inputs)
        missing = [job.inputs[i].path for i, s in enumerate(sources) if s is None]
        if missing:
            raise RunFailure("E502", f"`{t.name}` is missing from {missing[0]}",
                             "the inputs' weights no longer match what the plan read; re-run `recipec check`")
        shapes = [f.tensors[s].shape for f, s in zip(inputs, sources)]
        # Checked at check time from the signatures; a hub model first resolved by this run is checked here.
        odd = next((i for i, (f, s) in enumerate(zip(inputs, sources)) if f.tensors[s].dtype not in COMPUTE_DTYPES),
                   None)
        if odd is not None:
            dtype = inputs[odd].tensors[sources[odd]].dtype
            raise RunFailure("E322", uncomputable_message(job.node.inputs[odd].label, sources[odd], dtype),
                             UNCOMPUTABLE_HINT)
        if ((policy.norms == "keep" and arch.is_norm_tensor(t.name))
                or (policy.embeddings == "keep" and t.name in vocab_names)):
            plans.append(TensorPlan(t.name, sources, coefficients_of(t.name), copy_first=True))
            continue
        rows = None
        if len(set(shapes)) > 1:
            if not (policy.embeddings == "overlap" and t.name in vocab_names
                    and len({s[1:] for s in shapes}) == 1):
                raise RunFailure("E502", f"`{t.name}` has shapes {[list(s) for s in shapes]} across the inputs",
                                 "the inputs changed since the plan was checked; re-run `recipec check`")
            rows = min(s[0] for s in shapes)
        if t.name in vocab_names and not tokens_checked:
            # Rows combined across models must be the same token in each (strings, not just shapes).
            mismatch = check_shared_tokens(job, rows if rows is not None else shapes[0][0])
            if mismatch:
                raise RunFailure("E503", f"the vocabularies disagree on shared rows: {mismatch}",
                                 'arithmetic on embedding rows needs row i to be the same token in every model; '
                                 'use embeddings="keep", or align the tokenizers first')
            tokens_checked = True
        overrides = ()
        if rows is not None and special_source is not None:
            overrides = tuple((r, special_source) for r in special_rows if r < rows)
        plans.append(TensorPlan(t.name, sources, coefficients_of(t.name), rows, overrides))
    return plans


def finish_rows(whole: torch.Tensor, plan: TensorPlan, parts: list[torch.Tensor]) -> None:
    """Complete a vocabulary tensor whose first `plan.rows` rows are computed: the rows past them are the
    first model's, and special tokens' rows are copied from their source model."""
    rows = plan.rows if plan.rows is not None else whole.shape[0]
    if whole.shape[0] > rows:
        whole[rows:].copy_(parts[0][rows:])
    for row, source in plan.row_overrides:
        whole[row].copy_(parts[source][row])


def arch_vocab_tensors(config: dict) -> tuple[str, ...]:
    try:
        return arch.vocab_tensors(config)
    except ValueError:  # an architecture recipec has no table for: vocabulary tensors by name
        return ("model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight")


class _Kernel:
    """Per-thread buffers, reused for every chunk: fp32 accumulation and an output-dtype staging area.

    Preallocated, cache-sized buffers are the fast path on this CPU (FACTS.md): elementwise ops that
    allocate run several times slower than the same math into buffers that already exist.
    """

    def __init__(self) -> None:
        self.acc = torch.empty(STREAM_CHUNK_ELEMENTS, dtype=torch.float32)
        self.out: dict[torch.dtype, torch.Tensor] = {}

    def staging(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        if dtype not in self.out:
            self.out[dtype] = torch.empty(STREAM_CHUNK_ELEMENTS, dtype=dtype)
        return self.out[dtype][:n]

    def combine(self, parts: list[torch.Tensor], coefficients: tuple[float, ...], dtype: torch.dtype,
                emit) -> None:
        """Σ c_i·parts_i over flat tensors, chunk by chunk in fp32; `emit(chunk)` receives each result."""
        n = parts[0].numel()
        live = [(p, c) for p, c in zip(parts, coefficients) if c != 0.0] or [(parts[0], 0.0)]
        (first, c0), rest = live[0], live[1:]
        for start in range(0, n, STREAM_CHUNK_ELEMENTS):
            end = min(n, start + STREAM_CHUNK_ELEMENTS)
            acc = self.acc[: end - start]
            acc.copy_(first[start:end])
            if c0 != 1.0:
                acc.mul_(c0)
            for part, c in rest:
                acc.add_(part[start:end], alpha=c)  # upcast on the fly: fp32 math, no second buffer
            out = self.staging(dtype, end - start)
            out.copy_(acc)
            emit(out)


def _compute(plan: TensorPlan, t: TensorSpec, readers: list[ModelReader], writer: ModelWriter,
             kernel: _Kernel) -> None:
    dtype = TORCH_DTYPES[t.dtype]
    parts = [r.tensor(s) for r, s in zip(readers, plan.sources)]
    coefficients = (1.0,) if plan.copy_first else plan.coefficients
    if plan.copy_first or (plan.rows is None and not plan.row_overrides):
        kernel.combine([p.reshape(-1) for p in parts[:len(coefficients)]], coefficients, dtype,
                       lambda chunk: writer.write(t.name, chunk))
        return
    # Vocabulary tensors under a row policy are assembled whole (in the output dtype), then written.
    rows = plan.rows if plan.rows is not None else t.shape[0]
    whole = torch.empty(t.shape, dtype=dtype)
    flat, cursor = whole[:rows].reshape(-1), [0]

    def place(chunk: torch.Tensor) -> None:
        flat[cursor[0]: cursor[0] + chunk.numel()].copy_(chunk)
        cursor[0] += chunk.numel()

    kernel.combine([p[:rows].reshape(-1) for p in parts], coefficients, dtype, place)
    finish_rows(whole, plan, parts)
    writer.write(t.name, whole)


def stream_tensors(job: Job, out: list[TensorSpec], plans: list[TensorPlan], compute, shard_size: int,
                   ordered: bool = False) -> str:
    """Run `compute(plan, tensor, readers, writer, kernel)` for every tensor on the job's threads, in file
    order; returns the result's content digest. `ordered`: a result that no later node reads is written
    front to back, past the page cache (store/tensors.py's OrderedModelWriter), for a `compute` that writes
    tensors in chunks as it goes; one that writes whole tensors (merge's kernels) would wait for the
    file's frontier with each."""
    with contextlib.ExitStack() as stack:  # whatever was opened is closed, however far this got
        readers = [stack.enter_context(contextlib.closing(ModelReader(a.files))) for a in job.inputs]
        if ordered and not job.read_again:
            workers = max(1, job.threads)
            writer = OrderedModelWriter(job.out, out, shard_size, workers,
                                        (workers - 1) * STREAM_AHEAD_BYTES_PER_WORKER, STREAM_WRITE_BYTES,
                                        STREAM_WRITERS)
        else:
            writer = ModelWriter(job.out, out, shard_size)
        stack.callback(writer.close)  # before the readers: its threads may still read their maps
        local = threading.local()
        by_name = {t.name: t for t in out}

        def one(plan: TensorPlan) -> None:
            if job.cancelled.is_set():
                return
            if not hasattr(local, "kernel"):
                local.kernel = _Kernel()
            compute(plan, by_name[plan.name], readers, writer, local.kernel)
            job.progress(by_name[plan.name].nbytes)

        stack.callback(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(1)  # parallelism is ours, across tensors: results never depend on it
        by_plan = {p.name: p for p in plans}
        with ThreadPoolExecutor(max_workers=max(1, job.threads)) as pool:
            # In file order: the writer hashes (and, ordered, writes) each file front to back.
            futures = [pool.submit(one, by_plan[name]) for name in writer.file_order() if name in by_plan]
            try:
                for future in futures:
                    future.result()
            except BaseException:  # an error or Ctrl-C: stop the other threads at their next tensor
                job.cancelled.set()
                for future in futures:
                    future.cancel()
                writer.abort()  # and wake those waiting for the frontier
                raise
        digest = writer.finish()
        _report_nonfinite(job, readers, plans, writer.nonfinite)
        return digest


def _report_nonfinite(job: Job, readers: list[ModelReader], plans: list[TensorPlan], written: dict[str, int]) -> None:
    """Warn about NaN and ±inf in a result: name each input that already held some (only the inputs of
    the tensors that came out non-finite are read again), or say that the arithmetic overflowed."""
    job.nonfinite = sum(written.values())
    by_name = {p.name: p for p in plans}
    in_inputs: dict[int, dict[str, int]] = {}  # input index -> its tensor -> non-finite count
    overflowed: dict[str, int] = {}
    for name in sorted(written):
        found = False
        for i, (reader, source) in enumerate(zip(readers, by_name[name].sources)):
            count = count_nonfinite(reader.tensor(source))
            if count:
                in_inputs.setdefault(i, {})[source] = count
                found = True
        if not found:
            overflowed[name] = written[name]
    for i, tensors in sorted(in_inputs.items()):
        job.warn("E540", f"input `{job.node.inputs[i].label}` holds {sum(tensors.values())} NaN or infinite "
                         f"values: {_listing(tensors)}",
                 f"the result holds {job.nonfinite} non-finite values; repair or replace the input")
    if overflowed:
        job.warn("E540", f"the result holds {sum(overflowed.values())} NaN or infinite values although its "
                         f"inputs are finite: {_listing(overflowed)}",
                 'the arithmetic overflowed the output dtype: write dtype="float32", or use smaller factors')


def _listing(counts: dict[str, int], shown: int = 3) -> str:
    """`a` (2), `b` (1) and 4 more tensors."""
    items = [f"`{name}` ({count})" for name, count in sorted(counts.items())]
    more = f" and {len(items) - shown} more tensors" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def output_tensors(job: Job, dtype: str) -> list[TensorSpec]:
    """The output's tensors: the node's signature (the first model's names and shapes, output `dtype`)."""
    sig = job.node.type.signature
    if sig is None:  # a hub input resolved only now: the first model decides, as check would have
        sig = output_signature(signature_of_files(job.inputs[0].files), dtype)
    return [TensorSpec(t.name, t.dtype, t.shape) for t in sig.tensors]


def build_combine(job: Job) -> str:
    params: Combine.Params = Combine.params_of(job.node)
    out = output_tensors(job, params.dtype)
    plans = tensor_plans(job, out, params, params.coefficients, lambda name: combine_coefficients(params, name))
    digest = stream_tensors(job, out, plans, _compute, shard_size=params.shard_size, ordered=True)
    copy_model_files(job, out, params.coefficients, params.tokenizer, params.chat_template)
    return digest
