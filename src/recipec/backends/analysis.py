"""Analysis rules: the `stats` report, and the same report of any model folder (`recipec inspect DIR`).

Per model: parameters, non-zero parameters (a float is zero when every bit but the sign is clear, so -0.0
counts as zero), bytes, tensors, layers and each dtype's share, read from the safetensors files a chunk at
a time with numpy; then the model runs (backends/measure.py) for its MACs per token, counted and
cross-checked against the count its architecture implies, its latency and its peak memory. Every column
after the first gets its ratio to the first.

What is reproducible and what is measured are kept apart: each model's `measured` entry and the report's
`measurement` entry hold times and memory, which differ from run to run; everything else (counts, MACs,
settings) is identical on every run, and the rule returns the digest of that part alone, which is the
report's digest (artifacts/report.py): the lock and `verify` compare it, not the times.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..arch import facts_from_config, tensor_shapes
from ..artifacts.report import Measured, Report, Table, write_report
from ..dtypes import DTYPE_BYTES
from ..ops.analysis import Stats, StatsParams, macs_per_token, sequence_problem
from ..ops.base import model_names
from ..ops.export import Onnx
from ..store.filehash import content_digest
from ..store.model_dir import ModelFiles
from ..units import human_bytes
from .job import Job, RunFailure
from .measure import Measurement, Settings, measure_models

CHUNK_BYTES = 8 << 20
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_FLOATS = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
_LAYER = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")
METRICS = (("params", "parameters"), ("nonzero", "non-zero parameters"), ("bytes", "bytes"),
           ("tensors", "tensors"), ("layers", "layers"))
MACS = (("macs_per_token", "MACs per token"), ("decode_macs_per_token", "MACs per decoded token"))
TIMES = (("prefill_seconds", "prefill latency"), ("decode_seconds_per_token", "decode latency per token"),
         ("peak_memory_bytes", "peak memory"))
ONNX_TIMES = (("onnxruntime_prefill_seconds", "prefill latency in onnxruntime"),)
# Matrix weights this share zero or more are called sparse: dense kernels still multiply every zero.
SPARSE_SHARE = 0.01


def count_nonzero(path: Path, begin: int, nbytes: int, dtype: str) -> int:
    """Non-zero elements of one tensor's bytes in a file, read a chunk at a time."""
    width = DTYPE_BYTES[dtype]
    unsigned = _UNSIGNED[width]
    magnitude = unsigned(~(1 << (8 * width - 1)) & ((1 << 8 * width) - 1)) if dtype in _FLOATS else None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=begin, shape=(nbytes,)) if nbytes else None
    count, step = 0, CHUNK_BYTES - CHUNK_BYTES % width
    for start in range(0, nbytes, step):
        values = np.asarray(data[start:start + step]).view(unsigned)
        count += int(np.count_nonzero(values & magnitude if magnitude is not None else values))
    return count


def summarize(files: ModelFiles, progress: Callable[[int], None] = lambda n: None) -> dict:
    """What `stats` reads from one model's files: counts by dtype, zeros, tensors and layers."""
    dtypes: dict[str, dict[str, int]] = {}
    nonzero, matrix, matrix_nonzero, layers = 0, 0, 0, set()
    for name in sorted(files.tensors):
        entry = files.tensors[name]
        share = dtypes.setdefault(entry.dtype, {"params": 0, "bytes": 0})
        share["params"] += entry.numel
        share["bytes"] += entry.nbytes
        found = count_nonzero(files.shard_of[name], entry.begin, entry.nbytes, entry.dtype)
        nonzero += found
        if len(entry.shape) == 2:
            matrix, matrix_nonzero = matrix + entry.numel, matrix_nonzero + found
        progress(entry.nbytes)
        if match := _LAYER.search(name):
            layers.add(int(match.group(1)))
    config = files.config
    params = sum(d["params"] for d in dtypes.values())
    return {"model_type": config.get("model_type"), "params": params, "nonzero": nonzero,
            "zero_share": _share(params - nonzero, params),
            "matrix_zero_share": _share(matrix - matrix_nonzero, matrix),
            "bytes": sum(d["bytes"] for d in dtypes.values()), "tensors": len(files.tensors),
            "layers": config.get("num_hidden_layers", config.get("n_layer", len(layers))), "dtypes": dtypes}


def _share(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


def architecture_macs(config: dict, keys: int) -> int | None:
    """MACs per token the config's architecture implies (`ops.analysis.macs_per_token`, low-rank linears
    as their factors), None when recipec has no facts for it (an architecture or head it has no tensor
    table for)."""
    try:
        facts, shapes = facts_from_config(config), tensor_shapes(config)
    except ValueError:
        return None
    return macs_per_token(config.get("model_type", ""), facts, keys, shapes)


def _macs_check(counted: tuple[int, int | None], analytic: tuple[int | None, int | None]) -> str:
    """Whether the counted (prefill, decode) MACs per token equal the architecture's, in words."""
    if analytic[0] is None:
        return "no architecture count to compare with"
    if counted == analytic:
        return "equal"
    return "; ".join(f"{what}: counted {c / a:.4f}× the architecture's count"
                     for what, c, a in zip(("prefill", "decode"), counted, analytic) if c != a and c and a)


def models_stats(files: list[ModelFiles], settings: Settings, names: list[str], where: list[str] | None = None,
                 progress: Callable[[int], None] = lambda n: None, scratch: Path | None = None) -> list[dict]:
    """Everything `stats` reports about each model (`names` in the table, `where` in messages, their names
    by default): its counts, then what running it showed (onnxruntime's exports written inside `scratch`)."""
    summaries = [summarize(f, progress) for f in files]
    fp32_bytes = [4 * summary["params"] for summary in summaries]
    measured, together = measure_models([f.root for f in files], settings, where or [f"`{n}`" for n in names],
                                        fp32_bytes, scratch)
    return [_model_stats(f, settings, name, summary, m, together)
            for f, name, summary, m in zip(files, names, summaries, measured)]


def _model_stats(files: ModelFiles, settings: Settings, name: str, summary: dict, measured: Measurement,
                 together: bool) -> dict:
    model = {"name": name} | summary
    analytic = architecture_macs(files.config, settings.seq_len)
    decode_analytic = architecture_macs(files.config, settings.seq_len + 1) if measured.causal else None
    model |= {"causal": measured.causal, "macs_per_token": measured.macs_per_token,
              "macs_per_token_architecture": analytic,
              "decode_macs_per_token": measured.decode_macs_per_token,
              "decode_macs_per_token_architecture": decode_analytic,
              "macs_check": _macs_check((measured.macs_per_token, measured.decode_macs_per_token),
                                        (analytic, decode_analytic)),
              "macs_counted_with": f"{measured.counted_with} attention"}
    tokens = settings.batch * settings.seq_len
    model["measured"] = {
        "prefill_seconds": round(measured.prefill_seconds, 6),
        "prefill_tokens_per_second": round(tokens / measured.prefill_seconds, 1),
        "decode_seconds_per_token": None if measured.decode_seconds is None else round(measured.decode_seconds, 6),
        "decode_tokens_per_second": (None if not measured.decode_seconds
                                     else round(settings.batch / measured.decode_seconds, 1)),
        "peak_memory_bytes": measured.peak_bytes,
        "timed_with": f"{measured.timed_with} attention",
        "timed": "in rotating rounds with the other models" if together else "alone",
    }
    if settings.onnx:
        onnx = measured.onnx_prefill_seconds
        model["measured"] |= {"onnxruntime_prefill_seconds": round(onnx, 6),
                              "onnxruntime_prefill_tokens_per_second": round(tokens / onnx, 1),
                              "onnxruntime_vs_torch": round(onnx / measured.prefill_seconds, 4)}
    return model


def _ratio(value, first) -> float | None:
    return round(value / first, 6) if value is not None and first else None


def _cell(value, ratio: float | None, first: bool, show: Callable = lambda v: f"{v:,}") -> str:
    if value is None:
        return "–"
    return show(value) if first or ratio is None else f"{show(value)} ({ratio:.2f}×)"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms"


def stats_report(models: list[dict], settings: Settings) -> Report:
    """The report of models side by side, ratios to the first."""
    first = models[0]
    for model in models:
        model["ratios"] = {key: _ratio(model[key], first[key]) for key, _ in METRICS + MACS}
        model["measured"]["ratios"] = {key: _ratio(model["measured"].get(key), first["measured"].get(key))
                                       for key, _ in TIMES + ONNX_TIMES}
    header = ["", *(f"{m['name']} ({m['model_type']})" for m in models)]

    def row(title: str, cells: Callable[[dict, bool], str]) -> list[str]:
        return [title, *(cells(m, i == 0) for i, m in enumerate(models))]

    rows = [row(title, lambda m, f, k=key: _cell(m[k], m["ratios"][k], f)) for key, title in METRICS]
    rows.append(row("zeros", lambda m, f: f"{m['zero_share']:.1%}"))
    rows.append(row(f"MACs per token (prefill of {settings.seq_len})",
                    lambda m, f: _cell(m["macs_per_token"], m["ratios"]["macs_per_token"], f)))
    rows.append(row("MACs per token, from the architecture", lambda m, f: _cell(m["macs_per_token_architecture"], None, True)))
    rows.append(row("MACs per decoded token",
                    lambda m, f: _cell(m["decode_macs_per_token"], m["ratios"]["decode_macs_per_token"], f)))
    shows = {"prefill_seconds": _ms, "decode_seconds_per_token": _ms, "peak_memory_bytes": human_bytes,
             "onnxruntime_prefill_seconds": _ms}
    prefills = ("prefill_seconds", "onnxruntime_prefill_seconds")
    for key, title in TIMES + (ONNX_TIMES if settings.onnx else ()):
        label = f"{title} ({settings.batch} × {settings.seq_len} tokens)" if key in prefills else title
        rows.append(row(label, lambda m, f, k=key: Measured(_cell(m["measured"][k], m["measured"]["ratios"][k], f,
                                                                  shows[k]))))
    if settings.onnx:
        rows.append(row("onnxruntime / PyTorch prefill",
                        lambda m, f: Measured(f"{m['measured']['onnxruntime_vs_torch']:.2f}×")))
    for dtype in sorted({d for m in models for d in m["dtypes"]}):
        rows.append(row(f"{dtype} parameters", lambda m, f, d=dtype: f"{m['dtypes'].get(d, {}).get('params', 0):,}"))
    data = {"kind": "stats", "settings": asdict(settings) | {"dtype": "float32", "warmup": 1},
            "models": models, "measurement": _machine(settings)}
    return Report("Model statistics", data, [Table(header, rows)], sections=_notes(models, settings),
                  measured=("measurement", "models.*.measured"), measured_what="times and memory")


def _machine(settings: Settings) -> dict:
    """Where and how the times were measured: they mean something only with this."""
    import torch
    import transformers

    runtimes = {"torch": torch.__version__, "transformers": transformers.__version__}
    if settings.onnx:
        import onnxruntime

        runtimes["onnxruntime"] = onnxruntime.__version__
    return {"machine": platform.machine(), "processor": _processor(), "threads": settings.threads, **runtimes,
            "note": "times and memory are measured and differ from run to run; the report's digest leaves "
                    "them out"}


def _processor() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.processor()


def _notes(models: list[dict], settings: Settings) -> list[str]:
    """What the numbers mean, as sentences under the table."""
    decode = f", then {settings.decode_tokens} tokens decoded one at a time" if settings.decode_tokens else ""
    timing = (f"Latency: median of {settings.repeats} runs after a warm-up, {settings.threads} thread"
              f"{'s' if settings.threads != 1 else ''}, float32: a prefill of {settings.batch} × {settings.seq_len} "
              f"tokens{decode} (causal models, with the KV cache). Models that fit in memory together are timed "
              "in rounds, each round running every model once in a rotating order, so that a machine getting "
              "busier or quieter moves their times alike (each model's `timed` entry in the data says how it "
              "was timed). Peak memory is the model's weights plus the "
              "most the timed runs held above them. Times and memory are measured: they differ from run to run "
              "and are not part of the report's digest.")
    notes = [timing]
    if settings.onnx:
        notes.append(f"onnxruntime: each model exported to ONNX (opset {Onnx.Params().opset}, a logits graph, "
                     "float32) as `onnx` exports it, its output checked against PyTorch on the measured input, "
                     f"then the same prefill timed the same way on {settings.threads} intra-op thread"
                     f"{'s' if settings.threads != 1 else ''}.")
    checks = {m["macs_check"] for m in models}
    if checks == {"equal"}:
        notes.append("MACs were counted by torch's FlopCounterMode with eager attention, and equal the count "
                     "the architecture implies (attention counted over the whole seq_len × seq_len square, as "
                     "eager attention computes it).")
    else:
        notes += [f"`{m['name']}`: MACs counted with {m['macs_counted_with']}: {m['macs_check']}."
                  for m in models if m["macs_check"] != "equal"]
    notes += [f"`{m['name']}`: {m['matrix_zero_share']:.1%} of its matrix weights are zeros stored in dense "
              "tensors. Dense zeros bring no speed-up: dense kernels multiply them all the same, so its MACs "
              "and latency count them, and it is no smaller on disk."
              for m in models if m["matrix_zero_share"] >= SPARSE_SHARE]
    return notes


def reproducible(data: dict) -> dict:
    """A stats report's data less what is measured, and less the models' names, which the cache key does not
    hold either (renaming a binding rebuilds nothing): what two runs agree on byte for byte."""
    models = [{k: v for k, v in m.items() if k not in ("measured", "name")} for m in data["models"]]
    return {k: v for k, v in data.items() if k != "measurement"} | {"models": models}


def settings_of(params: StatsParams) -> Settings:
    return Settings(params.seq_len, params.batch, params.threads, params.repeats, params.decode_tokens, params.onnx)


def build_stats(job: Job) -> str:
    """The rule of `stats`: the report, and (as its digest) the digest of its reproducible part."""
    settings = settings_of(Stats.params_of(job.node))
    models = models_stats([a.files for a in job.inputs], settings, model_names(job.node.inputs),
                          progress=job.progress, scratch=job.work)
    report = stats_report(models, settings)
    write_report(report, job.out)
    return content_digest(reproducible(report.data))


def inspect_dir(root: Path, params: StatsParams) -> Report:
    """The `stats` report of one model folder, no recipe needed (`recipec inspect`); RunFailure with the
    code of what is wrong: a folder that is not a model (E4xx), a sequence beyond its positions (E482)."""
    from ..store.model_dir import ModelDirError, read_model_dir

    if (root / "model.onnx").is_file() and not (root / "config.json").is_file():
        raise RunFailure("E401", f"{root} is an ONNX model: inspect reads Hugging Face model folders (config.json "
                         "and safetensors)", "inspect the folder the ONNX model was exported from, or time the "
                         "ONNX model with `stats(model, onnx=true)` in a recipe")
    try:
        files = read_model_dir(root)
    except ModelDirError as err:
        hint = err.hint if root.is_dir() else "check the path: it is relative to where you run recipec"
        raise RunFailure(err.code, err.message, hint) from None
    try:
        facts = facts_from_config(files.config)
    except ValueError:
        facts = None
    problem = sequence_problem(str(files.config.get("model_type")), facts, params)
    if problem is not None:
        raise RunFailure("E482", problem[0], problem[1].replace("`seq_len`", "--seq-len")
                         .replace("`decode_tokens`", "--decode-tokens"))
    settings = settings_of(params)
    return stats_report(models_stats([files], settings, ["model 1"], [str(root)]), settings)
