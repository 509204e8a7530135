"""Benchmark: recipec's streaming chat vector against mergekit's task_arithmetic, on a 1.1B Llama.

Builds three bf16 checkpoints (TinyLlama-1.1B shape, ~1 GB shards) and the same at half depth, then
runs `cp + 0.8*(chat - base)` with recipec and the same task_arithmetic merge with mergekit 0.1.5
(installed into the benchmark's own environment, never a project dependency), in alternation, on the
same inputs, and prints:

- end-to-end wall time and CPU time of each, and the speed-up (target: recipec >= 5x faster). recipec is
  timed twice: `cold` (a fresh cache: it also hashes all inputs, 6.6 GB, for the cache key and lock)
  and `known` (input digests remembered, as on any rerun after an edit);
- peak anonymous memory of each (target: recipec <= 0.25x mergekit's), at both sizes, to show that
  recipec's does not grow with model size;
- the arithmetic kernel's throughput against this machine's memcpy bandwidth, measured in this run on
  one thread each (target: >= 50%);
- agreement of the two outputs, in bf16 steps at the inputs' magnitude: mergekit rounds to bf16 after
  each of its ~5 operations (`base + 0.8*(chat - base) + (cp - base)`), recipec accumulates in fp32 and
  rounds once, so a few steps apart is agreement within bf16 rounding (the check allows 4);
- the time the cold run spends hashing (wall seconds while any thread hashes, and CPU seconds, per
  algorithm: BLAKE3 content digests, SHA-256 file sums), metered around every hash call
  (hash_meter.py): it works alike on a recipec from before BLAKE3, so the two compare;
- every timed run finds the inputs in the page cache (they are read once, untimed, before it);
- this machine's floor for the job, measured right before each recipec run: a fresh `import torch` plus
  a durable write of the output's bytes (`dd if=/dev/zero ... conv=fsync`), and each run's ratio to its
  floor (target for the cold run: <= 1.1x). `sync` runs before every timed step, so that no run pays
  for another's write-back (mergekit never fsyncs).

recipec makes every result durable (fsync) before it counts as built, as a release must be; mergekit leaves
its output in the page cache. On a slow disk the fsync bounds recipec's time, so run it a second time
with `--dir /dev/shm/recipec-bench --sizes 1.1b` to compare the computations without the disk.

Usage: python benchmarks/merge_vs_mergekit.py [--dir /tmp/recipec-bench] [--repeats 2] [--keep]
       [--sizes half,1.1b] [--skip-peer]

`--sizes half --repeats 1 --skip-peer` is a sanity check that takes a few minutes: no mergekit, so no
speed-up, memory ratio or agreement, only recipec's times, its hashing and its floor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_checkpoints import SIZES, make_llama_checkpoints  # noqa: E402
from peer_env import ensure_mergekit_venv  # noqa: E402
from peer_mergekit import run_mergekit  # noqa: E402
from procmeter import measure_process  # noqa: E402

RECIPE = """recipec 1
base = load("base")
chat = load("chat")
cp   = load("cp")
export combine(cp + 0.8*(chat - base), shard_size=1G) to "out/recipec"
"""


HASH_METER = Path(__file__).resolve().parent / "hash_meter.py"


def run_recipec(root: Path, cache: Path, keep_digests: bool, output_bytes: int) -> dict:
    """One end-to-end `recipec run` in a fresh process, metered like mergekit, every hash call timed, and
    paired with the floor measured right before it."""
    from recipec.store.cache import Cache

    shutil.rmtree(root / "out" / "recipec", ignore_errors=True)
    if not keep_digests:
        shutil.rmtree(cache, ignore_errors=True)
    else:
        shutil.rmtree(Cache(cache).objects, ignore_errors=True)
    floor = floor_seconds(root, output_bytes)
    report = root / "hashing.json"
    env = dict(os.environ, RECIPEC_CACHE=str(cache))
    os.sync()
    result = measure_process([sys.executable, str(HASH_METER), str(report), "run", "--json",
                              str(root / "chat_vector.rcp")], env=env)
    if result["returncode"] != 0:
        raise SystemExit(f"recipec failed: {result['output_tail']}")
    result["floor_seconds"] = floor
    result["hashing"] = json.loads(report.read_text())
    report.unlink()
    return result


def floor_seconds(root: Path, nbytes: int) -> float:
    """The least any tool could take to write this result here: a fresh `import torch` plus a durable write
    of `nbytes` (dd from /dev/zero with fsync), each timed after `sync`."""
    os.sync()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    seconds = time.perf_counter() - start
    target = root / "floor.bin"
    os.sync()
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={math.ceil(nbytes / 2**20)}",
                    "conv=fsync", "status=none"], check=True)
    seconds += time.perf_counter() - start
    target.unlink()
    os.sync()  # the unlink's metadata too, so the run that follows writes on a quiet disk
    return seconds


def outputs_agree(a: Path, b: Path, inputs: list[Path]) -> tuple[int, float]:
    """(tensors compared, largest difference) between two outputs, in bf16 steps at the inputs' magnitude.

    mergekit rounds to bf16 after every operation, recipec once at the end, so where `cp + k*(chat - base)`
    nearly cancels, a difference of one rounding step of the *inputs* is expected, not of the result.
    """
    from recipec.store.model_dir import read_model_dir
    from recipec.store.tensors import ModelReader

    readers = [ModelReader(read_model_dir(p)) for p in [a, b, *inputs]]
    worst = 0.0
    names = sorted(readers[0].files.tensors)
    assert names == sorted(readers[1].files.tensors), "different tensor names"
    for name in names:
        x, y, *ins = (r.tensor(name).float() for r in readers)
        scale = torch.stack([t.abs() for t in ins + [x]]).amax(0).clamp_min(1e-30)
        step = torch.exp2(torch.floor(torch.log2(scale)) - 7)  # one bf16 step at that magnitude
        worst = max(worst, float(((x - y).abs() / step).max()))
    for r in readers:
        r.close()
    return len(names), worst


def kernel_vs_memcpy(root: Path) -> dict:
    """Single-thread GB/s (bytes read + written) of the combine kernel on the real inputs vs memcpy."""
    from recipec.backends.arithmetic import _Kernel
    from recipec.store.model_dir import read_model_dir
    from recipec.store.tensors import ModelReader

    torch.set_num_threads(1)
    readers = [ModelReader(read_model_dir(root / n)) for n in ("cp", "chat", "base")]
    names = sorted(readers[0].files.tensors, key=lambda n: -readers[0].files.tensors[n].nbytes)[:40]
    parts = [[r.tensor(n).reshape(-1) for r in readers] for n in names]
    moved = sum(p[0].numel() * 2 * 4 for p in parts)  # 3 bf16 reads + 1 bf16 write per element
    kernel = _Kernel()
    for p in parts:  # warm the page cache and the buffers
        kernel.combine(p, (1.0, 0.8, -0.8), torch.bfloat16, lambda chunk: None)
    start = time.perf_counter()
    for p in parts:
        kernel.combine(p, (1.0, 0.8, -0.8), torch.bfloat16, lambda chunk: None)
    kernel_s = time.perf_counter() - start
    src = torch.empty(moved // 4, dtype=torch.bfloat16).fill_(1.0)  # copy the same number of bytes moved
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    dst.copy_(src)
    memcpy_s = time.perf_counter() - start
    for r in readers:
        r.close()
    # memcpy bandwidth as tools such as mbw report it: bytes copied per second. The kernel's throughput:
    # bytes it reads and writes per second (3 inputs + 1 output per element).
    kernel_gbs, memcpy_gbs = moved / kernel_s / 1e9, (src.numel() * 2) / memcpy_s / 1e9
    return {"kernel_GBps": kernel_gbs, "memcpy_GBps": memcpy_gbs, "ratio": kernel_gbs / memcpy_gbs}


def bench_size(root: Path, size: str, peer: Path | None, repeats: int) -> dict:
    from recipec.store.model_dir import read_model_dir, weight_files

    models = make_llama_checkpoints(root, **SIZES[size])
    (root / "chat_vector.rcp").write_text(RECIPE)
    cache = root / "cache"
    output_bytes = sum(p.stat().st_size for p in weight_files(models["base"]))  # the result has base's tensors
    runs: dict[str, list[dict]] = {"recipec cold": [], "recipec known": []} | ({"mergekit": []} if peer else {})
    inputs = [f for model in models.values() for f in weight_files(model)]
    for _ in range(repeats):
        read_into_page_cache(inputs)
        runs["recipec cold"].append(run_recipec(root, cache, keep_digests=False, output_bytes=output_bytes))
        if peer:
            out = root / "out" / "mergekit"
            shutil.rmtree(out, ignore_errors=True)
            read_into_page_cache(inputs)
            os.sync()
            runs["mergekit"].append(run_mergekit(peer, models["base"], models["chat"], models["cp"], out))
        read_into_page_cache(inputs)
        runs["recipec known"].append(run_recipec(root, cache, keep_digests=True, output_bytes=output_bytes))
    summary: dict = {name: {"seconds": statistics.median(r["seconds"] for r in rs),
                            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in rs),
                            "peak_anon_MB": max(r["peak_anon_bytes"] for r in rs) / 2**20} for name, rs in runs.items()}
    for name in ("recipec cold", "recipec known"):
        summary[name]["floor_seconds"] = statistics.median(r["floor_seconds"] for r in runs[name])
        summary[name]["floor_ratios"] = [r["seconds"] / r["floor_seconds"] for r in runs[name]]
        summary[name]["floor_ratio"] = statistics.median(summary[name]["floor_ratios"])
    summary["hashing"] = {algorithm: {field: statistics.median(r["hashing"].get(algorithm, {}).get(field, 0)
                                                               for r in runs["recipec cold"])
                                      for field in ("bytes", "cpu_seconds", "wall_seconds")}
                          for algorithm in sorted({a for r in runs["recipec cold"] for a in r["hashing"]})}
    if peer:
        count, steps = outputs_agree(root / "out" / "recipec", root / "out" / "mergekit",
                                     [models["cp"], models["chat"], models["base"]])
        summary["agreement"] = {"tensors": count, "max_bf16_steps": steps}
    summary["params"] = sum(t.numel for t in read_model_dir(models["base"]).tensors.values())
    summary["output_bytes"] = output_bytes
    return summary


def read_into_page_cache(files: list[Path]) -> None:
    """Read the inputs once, untimed, so that every timed run finds them in memory (the floor reads nothing,
    and a run that found them on disk would be timing the disk, not itself)."""
    for path in files:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def hashing_line(size: str, hashing: dict) -> str:
    """What the cold run spent hashing: wall time while any thread hashed (per algorithm; they run at
    different moments), and bytes and CPU time per algorithm."""
    parts = [f"{name} {h['bytes'] / 1e9:.2f} GB in {h['wall_seconds']:.2f} s wall, {h['cpu_seconds']:.2f} s CPU"
             for name, h in hashing.items() if h["bytes"] >= 1 << 20]
    wall = sum(h["wall_seconds"] for h in hashing.values())
    return f"{size} cold run hashing: {wall:.2f} s wall in all ({'; '.join(parts)})"


def pairs(ratios: list[float]) -> str:
    return " ".join(f"{r:.2f}" for r in ratios)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/recipec-bench"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", default="half,1.1b")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints for the next run")
    parser.add_argument("--skip-peer", action="store_true", help="no mergekit: recipec's times, hashing and floor")
    args = parser.parse_args()
    peer = None if args.skip_peer else ensure_mergekit_venv()
    results = {}
    try:
        for size in args.sizes.split(","):
            results[size] = bench_size(args.dir / size, size, peer, args.repeats)
        kernel = kernel_vs_memcpy(args.dir / args.sizes.split(",")[-1])
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    ok = True
    print(f"\n{'size':<6} {'run':<14} {'wall s':>8} {'cpu s':>8} {'peak anon MB':>13} {'floor s':>8} {'/ floor':>8}")
    for size, summary in results.items():
        for name in ("recipec cold", "recipec known", "mergekit"):
            if name not in summary:
                continue
            r = summary[name]
            floor = f"{r['floor_seconds']:>8.1f} {r['floor_ratio']:>7.2f}x" if "floor_seconds" in r else ""
            print(f"{size:<6} {name:<14} {r['seconds']:>8.1f} {r['cpu_seconds']:>8.1f} {r['peak_anon_MB']:>13.0f} {floor}")
    for size, s in results.items():
        cold = s["recipec cold"]
        print(f"\n{hashing_line(size, s['hashing'])}")
        print(f"{size} floor (import torch + dd conv=fsync of {s['output_bytes'] / 1e9:.2f} GB), measured before each "
              f"run: cold run {cold['floor_ratio']:.3f}x its floor (target <= 1.1x), inputs known "
              f"{s['recipec known']['floor_ratio']:.3f}x (medians; each pair, in order: cold "
              f"{pairs(cold['floor_ratios'])}; known {pairs(s['recipec known']['floor_ratios'])})")
        ok &= cold["floor_ratio"] <= 1.1
    for size, s in results.items():
        if "mergekit" not in s:
            continue
        mk = s["mergekit"]
        cold = mk["seconds"] / s["recipec cold"]["seconds"]
        known = mk["seconds"] / s["recipec known"]["seconds"]
        memory = s["recipec cold"]["peak_anon_MB"] / mk["peak_anon_MB"]
        print(f"\n{size} ({s['params'] / 1e9:.2f} B params): speed-up {cold:.1f}x cold, {known:.1f}x inputs known "
              f"(target >= 5x); peak anon memory {memory:.2f}x mergekit's (target <= 0.25x); "
              f"outputs agree on {s['agreement']['tensors']} tensors within "
              f"{s['agreement']['max_bf16_steps']:.0f} bf16 step(s)")
        ok &= known >= 5 and memory <= 0.25 and s["agreement"]["max_bf16_steps"] <= 4
    sizes = list(results)
    if len(sizes) == 2:
        a, b = (results[x]["recipec cold"]["peak_anon_MB"] for x in sizes)
        print(f"recipec peak anon memory: {a:.0f} MB at {sizes[0]}, {b:.0f} MB at {sizes[1]} "
              f"({results[sizes[1]]['params'] / results[sizes[0]]['params']:.1f}x the parameters)")
    print(f"kernel: {kernel['kernel_GBps']:.2f} GB/s read+written vs memcpy {kernel['memcpy_GBps']:.2f} GB/s copied "
          f"({2 * kernel['memcpy_GBps']:.2f} GB/s read+written), one thread each: {kernel['ratio']:.0%} "
          f"(target >= 50%; {kernel['ratio'] / 2:.0%} counting memcpy's reads and writes too)")
    ok &= kernel["ratio"] >= 0.5
    print("PASS" if ok else "FAIL (see the numbers above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
