"""Running a model to measure it: MACs per token counted by torch, latency and peak memory.

A model folder is loaded the way anyone loads it, `AutoModelFor….from_pretrained(dir)` with no remote
code: recipec's own model classes are registered with the Auto classes when `recipec` is imported (it is,
being this module's package), so its pruned and low-rank outputs load the same way. The model runs in float32 on the CPU.

- MACs: one forward pass of one sequence under `torch.utils.flop_counter.FlopCounterMode`, with eager
  attention, since the counter does not see the CPU's fused scaled-dot-product attention. Exact for
  matrix products; the count is half the FLOPs it reports.
- Latency: with the model's own attention (the fast one a user gets), on a fixed number of threads, one
  warm-up then `repeats` timed runs, the median: a prefill of batch × seq_len tokens, then (causal
  models) `decode_tokens` steps of one token each on the prefill's KV cache. Models whose float32
  weights fit in memory together (half of what is available) are loaded together and timed in rounds,
  each round running every model once, in an order that rotates: a machine that gets busier or quieter
  during the measurement then moves every model's times alike, and their ratios hold (timed one model
  after another, a drift of a few percent reads as a compression's whole gain). Models that do not fit
  are timed one after another.
- onnxruntime latency (`onnx=true`): the model exported in-process to a temporary folder by the `onnx`
  rule's own exporter (backends/onnx_export.py, a logits graph), its output checked against PyTorch's on
  the measured input, then the same prefill timed in onnxruntime the same way, on as many intra-op threads.
- Peak memory: the model's weights (parameters and buffers) plus the most the timed runs held above what
  the process held after the warm-up: the peak resident memory (Linux `VmHWM`, restarted through
  /proc/self/clear_refs) less the resident memory then, free heap returned to the system first. Measured
  after the warm-up so that library code paged in and one-off allocations of the first run do not
  count; not measured where the platform cannot restart the peak.

Times differ from run to run and machine to machine; the caller keeps them apart from what is
reproducible (the counts).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import inspect
import re
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .job import RunFailure
from .threads import torch_threads

_STATUS = Path("/proc/self/status")
_MEMINFO = Path("/proc/meminfo")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class Settings:
    """How every model of one report is run (the `stats` parameters)."""

    seq_len: int = 64
    batch: int = 1
    threads: int = 1
    repeats: int = 5
    decode_tokens: int = 16
    onnx: bool = False  # also time the prefill in onnxruntime


@dataclass(frozen=True)
class Measurement:
    """What running one model showed. Counts are reproducible; seconds and bytes are measurements."""

    causal: bool
    macs_per_token: int  # prefill of one sequence of seq_len tokens, per token
    decode_macs_per_token: int | None  # the first decoded token after that prefill; None for an encoder
    counted_with: str  # the attention implementation MACs were counted with
    timed_with: str  # the attention implementation latency was measured with
    prefill_seconds: float  # median, one prefill of batch × seq_len tokens
    decode_seconds: float | None  # median, one decode step of batch tokens
    peak_bytes: int | None  # weights + the most the timed runs held above them; None where the platform cannot tell
    onnx_prefill_seconds: float | None = None  # median, the same prefill in onnxruntime; None unless asked


def measure_models(roots: list[Path], settings: Settings, names: list[str], weight_bytes: list[int],
                   scratch: Path | None = None) -> tuple[list[Measurement], bool]:
    """Load the model folders at `roots` and measure them, and whether they were timed together (in
    rotating rounds) rather than one after another; `weight_bytes` are their float32 weights' sizes. A
    model that cannot be loaded is RunFailure E610, one that fails while running E611, its message
    naming it by `names`. onnxruntime timings export each model into a temporary folder inside `scratch`."""
    together = len(roots) > 1 and sum(weight_bytes) <= _available_bytes() // 2
    groups = [list(range(len(roots)))] if together else [[i] for i in range(len(roots))]
    measured: dict[int, Measurement] = {}
    for group in groups:
        measured |= dict(zip(group, _measure_group([roots[i] for i in group], settings, [names[i] for i in group])))
    results = [measured[i] for i in range(len(roots))]
    if settings.onnx:
        results = [replace(m, onnx_prefill_seconds=onnx_prefill_seconds(root, settings, name, scratch))
                   for m, root, name in zip(results, roots, names)]
    return results, together


def _measure_group(roots: list[Path], settings: Settings, names: list[str]) -> list[Measurement]:
    """Measure models held in memory together: each one's MACs, then their times in rotating rounds."""
    import torch

    loaded = [load_model(root, name) for root, name in zip(roots, names)]
    for model, _ in loaded:
        _own_memory(model)
    try:
        with torch_threads(settings.threads), torch.inference_mode():
            counts = []
            for (model, causal), name in zip(loaded, names):
                with _failing_as(name):
                    counts.append(_count_macs(model, causal, settings))
            timings = _time(loaded, settings, names)
        weights = [sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
                   for model, _ in loaded]
    finally:
        attention = [_attention(model, None) for model, _ in loaded]
        del loaded
        gc.collect()
        _return_free_memory()
    return [Measurement(causal, macs, decode_macs, counted_with, timed_with, prefill, decode,
                        None if working is None else weight + working)
            for (counted_with, macs, decode_macs), timed_with, (prefill, decode, working, causal), weight
            in zip(counts, attention, timings, weights)]


@contextlib.contextmanager
def _failing_as(name: str):
    """What goes wrong while a model runs, as RunFailure E611 naming it."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError, IndexError, MemoryError) as err:
        raise RunFailure("E611", f"{name} failed while measured: {type(err).__name__}: {err}",
                         "lower `seq_len` or `batch` if memory ran out; otherwise the model's weights or "
                         "config do not fit together") from None


def _own_memory(model) -> None:
    """Copy every weight into memory of the process's own. Loaded tensors may still be views of the
    weight files' pages (4 KiB each, so more TLB misses), and such a model runs several percent slower
    than a copy does: which model was loaded first would then decide part of the ratios."""
    import torch

    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = tensor.data.clone()


def _available_bytes() -> int:
    """Memory the system can give this process now (Linux `MemAvailable`); 0 where it cannot tell."""
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", _MEMINFO.read_text(), re.MULTILINE)
    except OSError:
        return 0
    return int(match.group(1)) * 1024 if match else 0


def onnx_prefill_seconds(root: Path, settings: Settings, name: str, scratch: Path | None) -> float:
    """Median seconds of the measured prefill in onnxruntime, on `settings.threads` intra-op threads, after
    one warm-up; RunFailure E612 when the model does not export, E613 when the graph disagrees with PyTorch
    on the measured input (a wrong graph's time means nothing)."""
    import tempfile

    import numpy as np
    import onnxruntime
    import torch

    from ..ops.export import Onnx
    from . import onnx_export

    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnx-", dir=scratch) as folder, onnx_export.quiet(), \
            torch_threads(settings.threads):
        graph = Path(folder) / "model.onnx"
        model = onnx_export.load_model(root)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = settings.threads, 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        try:
            module, output = onnx_export.exported_graph(model, graph, Onnx.Params().opset)
            session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001  torch.export, the translation and onnxruntime raise many kinds
            raise RunFailure("E612", f"{name} cannot be timed in onnxruntime: its export failed: "
                             f"{onnx_export.first_line(err)}", "set `onnx=false` to measure it in PyTorch "
                             "alone, or export it with `onnx(...)` to see which step fails") from None
        ids = _inputs(model, settings.batch, settings.seq_len)
        feed = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
        with torch.inference_mode():
            expected = module(ids, torch.ones_like(ids)).numpy()
        del model, module
        seconds = []
        for run in range(1 + settings.repeats):
            started = time.perf_counter()
            (actual,) = session.run(None, feed)
            if run:
                seconds.append(time.perf_counter() - started)
    _, mismatch = onnx_export.worst_mismatch("measured", expected, actual, feed["attention_mask"],
                                             onnx_export.ATOL, onnx_export.RTOL)
    if mismatch is not None:
        raise RunFailure("E613", f"the ONNX graph of {name} disagrees with PyTorch on the measured input: "
                         f"`{output}` at {mismatch.index} is {mismatch.actual:.6g} in onnxruntime and "
                         f"{mismatch.expected:.6g} in PyTorch", "its onnxruntime time would mean nothing; set "
                         "`onnx=false`, and export the model with `onnx(...)` to see the parity check's report")
    return statistics.median(seconds)


def load_model(root: Path, name: str):
    """(model in eval mode, whether it generates), from a model folder through transformers' Auto classes;
    RunFailure E610 when transformers refuses it or would fill tensors the folder lacks with random values."""
    import torch
    import transformers

    hint = ("`stats` runs a model through transformers' Auto classes: its config's model_type must be one "
            "transformers (or recipec's own model classes) knows, and its weights must be the ones its config "
            "implies")
    try:
        config = transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
        auto = _auto_class(config, transformers)
        transformers.utils.logging.disable_progress_bar()  # run draws its own progress; a loading bar would garble it
        model, info = auto.from_pretrained(str(root), config=config, dtype=torch.float32, local_files_only=True,
                                           output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        raise RunFailure("E610", f"transformers cannot load {name}: {err}", hint) from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise RunFailure("E610", f"{name} lacks {len(missing)} tensor(s) its {type(model).__name__} needs (first: "
                                 f"`{missing[0]}`); transformers would fill them with random values", hint)
    model.eval()
    return model, auto is transformers.AutoModelForCausalLM


def _auto_class(config, transformers):
    """The Auto class of the head a config's `architectures` names: causal LM, masked LM, else the bare model."""
    names = config.architectures or []
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return transformers.AutoModelForCausalLM
    if any(n.endswith("ForMaskedLM") for n in names):
        return transformers.AutoModelForMaskedLM
    return transformers.AutoModel


def _inputs(model, batch: int, length: int):
    """Token ids that depend on nothing but the shape (every id within the vocabulary)."""
    import torch

    vocab = model.config.vocab_size
    return (torch.arange(batch * length, dtype=torch.long).reshape(batch, length) * 7919) % vocab


def _attention(model, implementation: str | None) -> str:
    """Switch the model's attention to `implementation` where the class allows it; the one in use."""
    if implementation is not None and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(implementation)
        except (ValueError, ImportError):
            pass  # a class that supports one implementation only: count with it, and say which
    return str(getattr(model.config, "_attn_implementation", None) or "default")


def _count_macs(model, causal: bool, settings: Settings) -> tuple[str, int, int | None]:
    """(attention used, MACs per prefill token, MACs of the first decoded token) of one sequence."""
    from torch.utils.flop_counter import FlopCounterMode

    default = _attention(model, None)
    used = _attention(model, "eager")
    ids = _inputs(model, 1, settings.seq_len)
    try:
        with FlopCounterMode(display=False) as counter:
            out = model(input_ids=ids, use_cache=True) if causal else model(input_ids=ids)
        prefill = counter.get_total_flops() // 2 // settings.seq_len
        decode = None
        if causal:
            with FlopCounterMode(display=False) as counter:
                _decode_step(model, ids[:, -1:], cache_of(out))
            decode = counter.get_total_flops() // 2
    finally:
        _attention(model, default)
    return used, prefill, decode


def _time(models: list, settings: Settings, names: list[str]) -> list[tuple[float, float | None, int | None, bool]]:
    """For each (model, causal): median seconds of a prefill and of one decode step over `repeats` runs
    after one warm-up, the most memory its timed runs held above what the process held just before each
    (None: unknown), and whether it is causal. Round r runs the models starting from the r-th."""
    ids = [_inputs(model, settings.batch, settings.seq_len) for model, _ in models]
    prefills: list[list[float]] = [[] for _ in models]
    decodes: list[list[float]] = [[] for _ in models]
    working: list[int | None] = [0 for _ in models]
    for (model, causal), model_ids, name in zip(models, ids, names):  # warm-up: caches, allocators, code paged in
        with _failing_as(name):
            _run_once(model, causal, model_ids, settings)
    for round_ in range(settings.repeats):
        for i in [(round_ + k) % len(models) for k in range(len(models))]:
            model, causal = models[i]
            _return_free_memory()
            before = _status_bytes("VmRSS") if _restart_peak() else None
            with _failing_as(names[i]):
                prefill, decode = _run_once(model, causal, ids[i], settings)
            peak = _status_bytes("VmHWM")
            prefills[i].append(prefill)
            decodes[i].append(decode)
            if before is None or peak is None or working[i] is None:
                working[i] = None
            else:
                working[i] = max(working[i], peak - before)
    return [(statistics.median(p), statistics.median(d) if causal and settings.decode_tokens > 0 else None,
             w, causal) for p, d, w, (_, causal) in zip(prefills, decodes, working, models)]


def _run_once(model, causal: bool, ids, settings: Settings) -> tuple[float, float]:
    """Seconds of one prefill and of each decode step after it (0.0 when nothing is decoded)."""
    decoding = causal and settings.decode_tokens > 0
    started = time.perf_counter()
    out = model(input_ids=ids, use_cache=True) if causal else model(input_ids=ids)
    prefilled = time.perf_counter()
    if decoding:
        cache = cache_of(out)
        step = ids[:, -1:]
        for _ in range(settings.decode_tokens):
            cache = cache_of(_decode_step(model, step, cache))
        del cache
    finished = time.perf_counter()
    del out
    return prefilled - started, (finished - prefilled) / settings.decode_tokens if decoding else 0.0


def _decode_step(model, token, cache):
    """One token on the KV cache."""
    return model(input_ids=token, use_cache=True, **{cache_keyword(type(model)): cache})


@functools.cache
def cache_keyword(model_class) -> str:
    # transformers 5 renamed `past_key_values` to `cache`; classes of either age are met.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _status_bytes(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _restart_peak() -> bool:
    """Start the peak resident memory over from the current (Linux ≥ 4.0); False where it cannot be."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _return_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc), so resident memory is what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
