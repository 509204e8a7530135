"""Benchmark: tokens/s of recipec's training loop (what `cp` runs) against a plain transformers loop.

Both train the same model (a Llama of the `small` preset by default: hidden 256, 4 layers, vocabulary
8192), from the same seed, on the same seeded documents, with the same batch (sequences × seq_len per
optimizer step), precision (fp32), AdamW settings and thread count. The plain loop is written the obvious
way, as in transformers' run_clm example: concatenate the documents, cut them into `seq_len` blocks, and
call `model(input_ids, labels=input_ids)`, then backward, clip, step. recipec's loop is `train()` with a
`cp` configuration: packed documents kept apart by position ids, loss over target tokens, accelerate.

Each measurement runs in its own process (a fresh interpreter, so peak memory is that run's), and the
two alternate, `--rounds` times each, so a machine that gets busier or quieter mid-run affects both. The
time covers the whole training call (data preparation, setup, every step), not the imports. Printed: each
run's tokens/s by wall clock and by CPU time (the process's, all threads: the steadier figure on a
machine others are using), its peak RSS, and the median of each round's ratio recipec / transformers
(the target is >= 1.0).

    python benchmarks/train_vs_transformers.py [--rounds 3] [--steps 12] [--size small] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def documents(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Seeded documents of 20 to 400 tokens (ids from 3 up: 0-2 are the special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(20, 400))] for _ in range(count)]


def model_for(size: str, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(SRC))
    from recipec.arch import preset_config

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**preset_config("llama", size)))


def run_recipec(args, docs: list[list[int]]) -> tuple[float, float]:
    from recipec.backends.train import Document, TrainConfig, train

    model = model_for(args.size, args.seed)
    config = TrainConfig(seq_len=args.seq_len, batch=args.batch, lr=1e-3, steps=args.steps, warmup=2,
                         precision="fp32", seed=args.seed)
    with tempfile.TemporaryDirectory() as work:
        start, cpu = time.perf_counter(), time.process_time()
        train(model, lambda: (Document(d) for d in docs), config, Path(work))
        return time.perf_counter() - start, time.process_time() - cpu


def run_transformers(args, docs: list[list[int]]) -> tuple[float, float]:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    model = model_for(args.size, args.seed)
    start, cpu = time.perf_counter(), time.process_time()
    stream = [token for doc in docs for token in [1, *doc, 2]]  # <s> document </s>, concatenated
    blocks = torch.tensor(stream[: len(stream) // args.seq_len * args.seq_len]).view(-1, args.seq_len)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 2, args.steps)
    model.train()
    for step in range(args.steps):
        batch = blocks[order[step * args.batch:(step + 1) * args.batch]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, time.process_time() - cpu


def one(args) -> None:
    """A single measurement, in this process: prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from recipec.arch import preset_config

    docs = documents(args.docs, preset_config("llama", args.size)["vocab_size"], args.seed)
    seconds, cpu_seconds = (run_recipec if args.one == "recipec" else run_transformers)(args, docs)
    tokens = args.steps * args.batch * args.seq_len
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tool": args.one, "seconds": seconds, "tokens_per_s": tokens / seconds,
                      "tokens_per_cpu_s": tokens / cpu_seconds, "peak_bytes": peak}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--size", default="small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", choices=("recipec", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(SRC))
    if args.one:
        one(args)
        return 0

    results: dict[str, list[dict]] = {"recipec": [], "transformers": []}
    forwarded = sys.argv[1:]
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1"}
    print(f"llama {args.size}, batch {args.batch} × {args.seq_len} tokens, {args.steps} steps, fp32, "
          f"{args.threads} threads, {args.rounds} rounds alternated")
    for round_ in range(args.rounds):
        for tool in (("recipec", "transformers") if round_ % 2 == 0 else ("transformers", "recipec")):
            done = subprocess.run([sys.executable, __file__, *forwarded, "--one", tool], env=env, check=True,
                                  capture_output=True, text=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[tool].append(result)
            print(f"  {tool:<12} {result['tokens_per_s']:8.0f} tokens/s  {result['tokens_per_cpu_s']:8.0f} "
                  f"tokens/CPU-s  {result['seconds']:6.2f} s  peak {result['peak_bytes'] / 2**20:6.0f} MiB")
    median = {tool: statistics.median(r["tokens_per_s"] for r in runs) for tool, runs in results.items()}
    peak = {tool: max(r["peak_bytes"] for r in runs) for tool, runs in results.items()}
    for tool in results:
        print(f"{tool:<12} median {median[tool]:8.0f} tokens/s, peak {peak[tool] / 2**20:.0f} MiB")
    # Each round's two runs were neighbours in time: their ratio is the least disturbed by a machine whose
    # load drifts, so the median of those ratios is the figure to read.
    for measure, unit in (("tokens_per_s", "wall clock"), ("tokens_per_cpu_s", "CPU time")):
        pairs = [r[measure] / t[measure] for r, t in zip(results["recipec"], results["transformers"])]
        print(f"ratio recipec / transformers by {unit}: {statistics.median(pairs):.2f}x, median of the rounds' "
              f"ratios ({', '.join(f'{p:.2f}' for p in pairs)}) (target >= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
