"""Analysis rules: reports read from safetensors files a chunk at a time, with numpy; no model is
instantiated and no torch is imported.

`stats` counts, per model: parameters, non-zero parameters (a float is zero when every bit but the
sign is clear, so -0.0 counts as zero), bytes, tensors, layers, and each dtype's share; every column
after the first gets its ratio to the first.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..artifacts.report import Report, Table, write_report
from ..dtypes import DTYPE_BYTES
from ..store.model_dir import ModelFiles
from .job import Job

CHUNK_BYTES = 8 << 20
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_FLOATS = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
_LAYER = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")
METRICS = (("params", "parameters"), ("nonzero", "non-zero parameters"), ("bytes", "bytes"),
           ("tensors", "tensors"), ("layers", "layers"))


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


def summarize(files: ModelFiles, job: Job) -> dict:
    """What `stats` reports about one model."""
    dtypes: dict[str, dict[str, int]] = {}
    nonzero, layers = 0, set()
    for name in sorted(files.tensors):
        entry = files.tensors[name]
        share = dtypes.setdefault(entry.dtype, {"params": 0, "bytes": 0})
        share["params"] += entry.numel
        share["bytes"] += entry.nbytes
        nonzero += count_nonzero(files.shard_of[name], entry.begin, entry.nbytes, entry.dtype)
        job.progress(entry.nbytes)
        if match := _LAYER.search(name):
            layers.add(int(match.group(1)))
    config = files.config
    return {"model_type": config.get("model_type"),
            "params": sum(d["params"] for d in dtypes.values()), "nonzero": nonzero,
            "bytes": sum(d["bytes"] for d in dtypes.values()), "tensors": len(files.tensors),
            "layers": config.get("num_hidden_layers", config.get("n_layer", len(layers))), "dtypes": dtypes}


def _ratios(model: dict, first: dict) -> dict[str, float | None]:
    return {key: (round(model[key] / first[key], 6) if first[key] else None) for key, _ in METRICS}


def _cell(model: dict, key: str, first: bool) -> str:
    value = f"{model[key]:,}"
    ratio = model["ratios"][key]
    return value if first or ratio is None else f"{value} ({ratio:.2f}×)"


def stats_report(models: list[dict]) -> Report:
    """The report of models summarized side by side, ratios to the first."""
    for model in models:
        model["ratios"] = _ratios(model, models[0])
    header = ["", *(f"model {i + 1} ({m['model_type']})" for i, m in enumerate(models))]
    rows = [[title, *(_cell(m, key, i == 0) for i, m in enumerate(models))] for key, title in METRICS]
    for dtype in sorted({d for m in models for d in m["dtypes"]}):
        rows.append([f"{dtype} parameters", *(f"{m['dtypes'].get(dtype, {}).get('params', 0):,}" for m in models)])
    return Report("Model statistics", {"kind": "stats", "models": models}, [Table(header, rows)])


def build_stats(job: Job) -> None:
    write_report(stats_report([summarize(a.files, job) for a in job.inputs]), job.out)
