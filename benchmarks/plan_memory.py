"""Benchmark: is `recipec plan`'s peak memory a bound on what `recipec run` really uses?

Writes three synthetic bf16 Llama checkpoints (~0.3B parameters each; `make_checkpoints.py`), then for
each recipe below — an `init`, a `combine` chat vector with and without a vocabulary policy, and a `merge`
with every method — and for each thread count, asks `recipec plan --json --threads N` for the planned peak
and runs `recipec run --threads N` from an empty cache, sampling the process's private memory (RssAnon,
every 5 ms; `procmeter.py`). Prints planned, measured and measured/planned; exits 1 if any run used more
than planned.

Usage: python benchmarks/plan_memory.py [--dir /tmp/recipec-plan-memory] [--threads 1 2] [--only ties]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procmeter  # noqa: E402
from make_checkpoints import make_llama_checkpoints  # noqa: E402

# ~0.29B parameters: TinyLlama's width halved, 20 layers; 0.6 GB per model in bf16.
SHAPE = dict(hidden=1024, layers=20, intermediate=2816, heads=16, kv_heads=4, vocab=32000)
MODELS = 'base = load("base")\nchat = load("chat")\ncp = load("cp")\n'
RECIPES = {
    "init": 'export init("llama", size="base", seed=1, dtype="bfloat16") to "out/m"',
    "combine": MODELS + 'export cp + 0.8*(chat - base) to "out/m"',
    "combine keep": MODELS + 'export combine(cp + 0.8*(chat - base), embeddings="keep") to "out/m"',
    "linear": MODELS + 'export merge(chat, cp, method="linear") to "out/m"',
    "task_arithmetic": MODELS + 'export merge(chat, cp, base=base, method="task_arithmetic") to "out/m"',
    "ties": MODELS + 'export merge(chat, cp, base=base, method="ties", density=0.3, normalize=true) to "out/m"',
    "dare": MODELS + 'export merge(chat, cp, base=base, method="dare", drop_rate=0.9) to "out/m"',
    "slerp": MODELS + 'export merge(chat, cp, method="slerp", t=0.3) to "out/m"',
}


def recipec(*args: str) -> list[str]:
    return [sys.executable, "-m", "recipec", *args]


def planned_peak(recipe: Path, threads: int, env: dict[str, str]) -> int:
    """The plan's peak from an empty cache, as the run will start."""
    shutil.rmtree(Path(env["RECIPEC_CACHE"]), ignore_errors=True)
    out = subprocess.run(recipec("plan", "--json", "--threads", str(threads), str(recipe)), env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["totals"]["peak_bytes"]


def measured_peak(recipe: Path, threads: int, env: dict[str, str]) -> int:
    shutil.rmtree(Path(env["RECIPEC_CACHE"]), ignore_errors=True)
    shutil.rmtree(recipe.parent / "out", ignore_errors=True)
    result = procmeter.measure_process(recipec("run", "--threads", str(threads), str(recipe)), env=env)
    if result["returncode"] != 0:
        raise SystemExit(f"{recipe.name} failed:\n{result['output_tail']}")
    return result["peak_anon_bytes"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/recipec-plan-memory"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--only", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES, key=list(RECIPES).index))
    args = ap.parse_args()
    procmeter.POLL_SECONDS = 0.005  # merge kernels hold their largest temporaries for a few ms only
    make_llama_checkpoints(args.dir, **SHAPE)
    env = dict(os.environ, RECIPEC_CACHE=str(args.dir / "cache"))
    print(f"{'recipe':<16} {'threads':>7} {'planned MiB':>12} {'measured MiB':>13} {'measured/planned':>17}")
    over = 0
    for name in args.only:
        recipe = args.dir / f"{name.replace(' ', '_')}.rcp"
        recipe.write_text(f"recipec 1\n{RECIPES[name]}\n")
        for threads in args.threads:
            plan, real = planned_peak(recipe, threads, env), measured_peak(recipe, threads, env)
            over += real > plan
            print(f"{name:<16} {threads:>7} {plan / 2**20:>12.0f} {real / 2**20:>13.0f} {real / plan:>17.2f}",
                  flush=True)
    print("PASS: every run stayed within its plan" if not over else f"FAIL: {over} run(s) above the plan")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
