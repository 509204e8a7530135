#!/usr/bin/env python
"""onnxruntime against PyTorch eager on CPU, on the graphs recipec exports: prefill and decode latency.

    python benchmarks/onnx_vs_torch.py [--threads 2] [--lengths 16,64,256] [--reps 10] [--sizes tiny,base]
                                       [--decode-tokens 8] [--work DIR]

A recipe in DIR (a temporary directory by default) inits a Llama of each size — `tiny` (205 K parameters)
and `base` (125 M, a real config: GPT-2-small-sized Llama) — and exports each three times: as a Hugging
Face directory, as ONNX (a logits graph), and as ONNX `with_cache=true` (a prefill + decode pair with a KV
cache) — `recipec run`, so the graphs are the ones users get, parity-checked. Then, for each model and
sequence length (batch 1), PyTorch (the HF model, fp32, `inference_mode`) and onnxruntime (all graph
optimizations, sequential execution) run alternately, `--reps` times each after a warm-up, both on
`--threads` threads: the prefill (the logits graph against a forward pass), and the decode (`--decode-tokens`
steps of one token on the cache of that prefill, per token: the decode graph against forward passes with
transformers' DynamicCache). The medians are printed, with the ratio ORT / torch (below 1: ORT is faster).
"""

from __future__ import annotations

import argparse
import copy
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
                   f'"out/{s}.onnx"\nexport onnx({s}, with_cache=true) to "out/{s}.cache.onnx"\n' for s in sizes)
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


def bench_model(out: Path, size: str, lengths: list[int], threads: int, reps: int, steps: int) -> list[tuple]:
    import onnxruntime
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    from recipec.backends.measure import cache_keyword, cache_of

    model = transformers.AutoModelForCausalLM.from_pretrained(out / size, dtype=torch.float32).eval()
    keyword = cache_keyword(type(model))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    def session_of(graph: Path):
        return onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    session = session_of(out / f"{size}.onnx" / "model.onnx")
    prefill, decode = (session_of(out / f"{size}.cache.onnx" / name) for name in ("model.onnx", "decode.onnx"))
    past_names = [i.name for i in decode.get_inputs()][3:]
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
        with torch.inference_mode():
            torch_prefilled = cache_of(model(input_ids=ids_t, attention_mask=mask_t, use_cache=True))
        ort_prefilled = prefill.run(None, {"input_ids": ids, "attention_mask": mask,
                                           "position_ids": np.arange(length)[None]})[1:]
        token = np.array([[7]], dtype=np.int64)

        def torch_decode():
            cache = copy.deepcopy(torch_prefilled)  # each repetition decodes from the same prefill
            with torch.inference_mode():
                for step in range(steps):
                    cache = cache_of(model(input_ids=torch.from_numpy(token), use_cache=True, **{keyword: cache},
                                           attention_mask=torch.ones((1, length + step + 1), dtype=torch.long)))

        def ort_decode():
            cache = ort_prefilled
            for step in range(steps):
                feed = {"input_ids": token, "attention_mask": np.ones((1, length + step + 1), dtype=np.int64),
                        "position_ids": np.array([[length + step]])}
                cache = decode.run(None, feed | dict(zip(past_names, cache)))[1:]

        torch_decode_ms, ort_decode_ms = time_pair(torch_decode, ort_decode, reps)
        rows.append((size, f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M", length, torch_ms, ort_ms,
                     torch_decode_ms / steps, ort_decode_ms / steps))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", default="16,64,256")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--sizes", default="tiny,base")
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--work", type=Path, default=None, help="where the recipe and its outputs live (kept)")
    args = parser.parse_args()
    sizes, lengths = args.sizes.split(","), [int(n) for n in args.lengths.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    build(work, sizes)
    print(f"threads {args.threads}, batch 1, {args.reps} alternated repetitions, medians; ratio = ORT / torch")
    print(f"{'':23} {'prefill':^26} {'decode, per token':^26}")
    print(f"{'model':>6} {'params':>8} {'tokens':>6}" + f" {'torch ms':>9} {'ORT ms':>8} {'ratio':>6}" * 2)
    for size in sizes:
        for name, params, length, *ms in bench_model(work / "out", size, lengths, args.threads, args.reps,
                                                     args.decode_tokens):
            cells = "".join(f" {t:>9.2f} {o:>8.2f} {o / t:>6.2f}" for t, o in (ms[:2], ms[2:]))
            print(f"{name:>6} {params:>8} {length:>6}{cells}")


if __name__ == "__main__":
    main()
