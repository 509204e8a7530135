#!/usr/bin/env python
"""onnxruntime against PyTorch eager on CPU, on the graphs recipec exports: full-sequence logits latency.

    python benchmarks/onnx_vs_torch.py [--threads 2] [--lengths 16,64,256] [--reps 10] [--sizes tiny,base]
                                       [--work DIR]

A recipe in DIR (a temporary directory by default) inits a Llama of each size — `tiny` (205 K parameters)
and `base` (125 M, a real config: GPT-2-small-sized Llama) — and exports each twice, as a Hugging Face
directory and as ONNX (`recipec run`, so the graphs are the ones users get, parity-checked). Then, for each
model and sequence length (batch 1), PyTorch (the HF model, fp32, `inference_mode`) and onnxruntime (the
exported graph, all graph optimizations, sequential execution) run alternately, `--reps` times each after a
warm-up, both on `--threads` threads; the medians are printed, with the ratio ORT / torch (below 1: ORT is
faster). The graphs are logits graphs without a KV cache, so there is no per-token decode to time: a
decode step would re-run the whole prefix in either runtime.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

def build(work: Path, sizes: list[str]) -> None:
    """The HF directories and ONNX graphs, built by recipec (cached across invocations in `work`)."""
    body = "".join(f'{s} = init("llama", size="{s}", seed=1)\nexport {s} to "out/{s}"\nexport {s} to '
                   f'"out/{s}.onnx"\n' for s in sizes)
    (work / "bench.rcp").write_text("recipec 1\n" + body)
    subprocess.run([sys.executable, "-m", "recipec", "run", str(work / "bench.rcp")], check=True)


def time_pair(torch_call, ort_call, reps: int) -> tuple[float, float]:
    """Median milliseconds of each, run alternately (the order flips every repetition) after one warm-up."""
    torch_call(), ort_call()
    times: dict[str, list[float]] = {"torch": [], "ort": []}
    for rep in range(reps):
        order = (("torch", torch_call), ("ort", ort_call)) if rep % 2 == 0 else (("ort", ort_call), ("torch", torch_call))
        for name, call in order:
            started = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - started) * 1000)
    return statistics.median(times["torch"]), statistics.median(times["ort"])


def bench_model(out: Path, size: str, lengths: list[int], threads: int, reps: int) -> list[tuple]:
    import onnxruntime
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(out / size, dtype=torch.float32).eval()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(str(out / f"{size}.onnx" / "model.onnx"), options,
                                           providers=["CPUExecutionProvider"])
    rows = []
    rng = np.random.default_rng(0)
    for length in lengths:
        ids = rng.integers(0, model.config.vocab_size, (1, length), dtype=np.int64)
        mask = np.ones_like(ids)
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)

        def torch_call():
            with torch.inference_mode():
                return model(input_ids=ids_t, attention_mask=mask_t).logits

        def ort_call():
            return session.run(None, {"input_ids": ids, "attention_mask": mask})[0]

        torch_ms, ort_ms = time_pair(torch_call, ort_call, reps)
        rows.append((size, f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M", length, torch_ms, ort_ms))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", default="16,64,256")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--sizes", default="tiny,base")
    parser.add_argument("--work", type=Path, default=None, help="where the recipe and its outputs live (kept)")
    args = parser.parse_args()
    sizes, lengths = args.sizes.split(","), [int(n) for n in args.lengths.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    build(work, sizes)
    print(f"threads {args.threads}, batch 1, {args.reps} alternated repetitions, medians; ratio = ORT / torch")
    print(f"{'model':>6} {'params':>8} {'tokens':>6} {'torch ms':>9} {'ORT ms':>8} {'ratio':>6}")
    for size in sizes:
        for name, params, length, torch_ms, ort_ms in bench_model(work / "out", size, lengths, args.threads, args.reps):
            print(f"{name:>6} {params:>8} {length:>6} {torch_ms:>9.2f} {ort_ms:>8.2f} {ort_ms / torch_ms:>6.2f}")


if __name__ == "__main__":
    main()
