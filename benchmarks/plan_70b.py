"""Benchmark `recipec plan` on three 70B-shaped Llama checkpoints, built as sparse files.

`recipec plan` reads only config.json and safetensors headers, so its cost should not depend on how
many bytes of weights a model has, only on how many tensors and shards. This benchmark checks that at
Llama-2-70B scale without needing 3 x 138 GB of disk: each shard is written as its real safetensors
header (8-byte little-endian length, JSON with dtype/shape/data_offsets, ``__metadata__`` exactly
``{"format": "pt"}``) and then truncated up to its full size, so the data is a hole that takes no
disk space. Every header, offset, file size and ``model.safetensors.index.json`` is exactly what
``LlamaForCausalLM.save_pretrained(max_shard_size="10GB")`` would write; only the weights are zeros.
No torch: pure Python + json + struct.

The recipe is the chat-vector merge::

    model = cp + 0.8*(chat - base)

and ``python -m recipec plan recipe.rcp`` is timed in fresh processes, two ways per run:

(a) the whole process, wall clock, as a user sees it (plus its peak RSS from ``wait4``);
(b) inside a wrapper child: time from the first line of the ``-c`` script (interpreter start-up
    done) through ``import recipec.cli`` and ``main(["plan", path])`` with stdout captured, and the
    child's own ``ru_maxrss``.

Targets: (b) < 1.0 s and peak RSS < 150 MB. Exit status 0 when both pass, 1 otherwise.

Usage::

    .venv/bin/python benchmarks/plan_70b.py              # temp dir, 5 runs, cleaned up
    .venv/bin/python benchmarks/plan_70b.py --keep       # leave the checkpoints for profiling
    .venv/bin/python benchmarks/plan_70b.py --dir /tmp/p70 --keep --profile
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PYTHON = REPO / ".venv" / "bin" / "python"

# Llama-2-70B (meta-llama/Llama-2-70b-hf).
SHAPE = dict(hidden=8192, layers=80, intermediate=28672, heads=64, kv_heads=8, vocab=32000)
DTYPE, DTYPE_BYTES = "BF16", 2
SHARD_BYTES = 10 * 10**9  # save_pretrained's max_shard_size="10GB" (decimal)
NAMES = ("base", "chat", "cp")
STAMP = ".plan_70b"  # marks a --dir this script made, so it may be rebuilt or cleaned

RECIPE = """recipec 1
base = load("base")
chat = load("chat")
cp   = load("cp")
model = cp + 0.8*(chat - base)
export model to "out/zh_chat_70b"
"""

TARGET_SECONDS = 1.0
TARGET_RSS_MB = 150.0

# Runs inside the wrapper child: argv = [recipe, result.json]. The clock starts at the first line,
# i.e. after the interpreter (and site) have started.
CHILD = r"""
import time
t0, c0 = time.perf_counter(), time.process_time()
import contextlib, io, json, resource, sys
recipe, out = sys.argv[1], sys.argv[2]
from recipec.cli import main
t_import = time.perf_counter()
buf, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
    rc = main(["plan", recipe])
t1, c1 = time.perf_counter(), time.process_time()
with open(out, "w") as f:
    json.dump({"seconds": t1 - t0, "cpu_seconds": c1 - c0, "import_seconds": t_import - t0, "rc": rc,
               "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               "stdout": buf.getvalue(), "stderr": err.getvalue()}, f)
"""

# Where the time goes without a profiler's overhead: the imports and steps of `plan`, one after another.
PHASES = r"""
import time
t0 = time.perf_counter()
import json, resource, sys
from pathlib import Path
recipe = Path(sys.argv[1])
T = {}
def mark(key):
    global t0
    t = time.perf_counter()
    T[key] = (t - t0) * 1000
    t0 = t
import recipec.cli; mark("import recipec.cli")
from pydantic import BaseModel, ConfigDict, Field, ValidationError; mark("import pydantic (BaseModel, Field)")
from pydantic.plugin._loader import get_plugins
get_plugins(); mark("pydantic plugin discovery (entry points)")
import lark; mark("import lark (+ regex if installed)")
import recipec.ops; mark("import recipec.ops (op classes, pydantic models)")
import recipec.plan, recipec.plan.render; mark("import recipec.plan")
import recipec.check; mark("import recipec.check (+ syntax)")
from recipec.syntax import parse_file
parse_file(recipe); mark("parse_file (lark grammar build + parse)")
from recipec.store.model_dir import read_model_dir
for name in ("base", "chat", "cp"):
    read_model_dir(recipe.parent / name)
mark("read_model_dir x3 (all headers)")
program = recipec.check.lower_file(recipe); mark("lower_file (parse, type, headers again)")
is_cached = lambda node: False
try:  # newer cmd_plan asks the cache which nodes are built already
    from recipec.plan.cache_status import cached_nodes
    from recipec.store.cache import Cache, default_cache_dir
    mark("import cache_status, store.cache")
    from recipec.toolchain import toolchain_versions
    toolchain_versions(); mark("  toolchain_versions() (importlib.metadata)")
    cached = cached_nodes(program.graph, Cache(default_cache_dir(recipe)))
    mark("cached_nodes (incl. toolchain_versions again)")
    is_cached = lambda node: node.id in cached
except ImportError:
    pass
plan = recipec.plan.make_plan(program.graph, str(recipe), is_cached); mark("make_plan")
recipec.plan.render.render_text(plan); mark("render_text")
T["peak RSS (MB)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(T))
"""


# --- checkpoints ---------------------------------------------------------------------------------

def llama_tensors(*, hidden, layers, intermediate, heads, kv_heads, vocab) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in LlamaForCausalLM's state_dict order: the order save_pretrained shards in.

    recipec's own architecture table (tested against transformers) is the one place this is known.
    """
    from recipec import arch

    config = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
              "intermediate_size": intermediate, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "vocab_size": vocab, "tie_word_embeddings": False}
    return list(arch.tensor_shapes(config).items())


def nbytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPE_BYTES


def plan_shards(tensors, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split in state_dict order, like save_pretrained: a shard closes before it would pass the limit."""
    shards, size = [[]], 0
    for name, shape in tensors:
        if shards[-1] and size + nbytes(shape) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes(shape)
    return shards


def llama_config(*, hidden, layers, intermediate, heads, kv_heads, vocab) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "dtype": "bfloat16",
        "eos_token_id": 2,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 4096,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "transformers_version": "4.56.0",
        "use_cache": True,
        "vocab_size": vocab,
    }


def safetensors_header(tensors) -> bytes:
    """The bytes before the data: u64 LE length + JSON, padded with spaces to 8 bytes like safetensors does.

    Data is laid out as the safetensors library does it: sorted by dtype (all BF16 here), then by name.
    """
    doc: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in sorted(tensors):
        n = nbytes(shape)
        doc[name] = {"dtype": DTYPE, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_sparse(path: Path, header: bytes, size: int) -> None:
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)  # extends with a hole: no blocks allocated


def disk_usage(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under path."""
    apparent = allocated = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def make_checkpoint(model_dir: Path, shard_bytes: int) -> dict:
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = llama_tensors(**SHAPE)
    shards = plan_shards(tensors, shard_bytes)
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header = safetensors_header(shard)
        path = model_dir / name
        write_sparse(path, header, len(header) + sum(nbytes(s) for _, s in shard))
        if os.stat(path).st_blocks * 512 > 1 << 20:  # would 3 x 138 GB really land on disk? stop now
            path.unlink()
            raise SystemExit(f"{model_dir.parent}: this filesystem does not make sparse files; use --dir elsewhere")
        weight_map.update({t: name for t, _ in shard})
    total = sum(nbytes(s) for _, s in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (model_dir / "config.json").write_text(json.dumps(llama_config(**SHAPE), indent=2, sort_keys=True) + "\n")
    return {"tensors": len(tensors), "shards": n, "params": sum(math.prod(s) for _, s in tensors), "bytes": total}


# --- measurement ---------------------------------------------------------------------------------

def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    env.pop("RECIPEC_CACHE", None)  # the plan's cache is .recipec/cache beside the recipe: empty
    env["NO_COLOR"] = "1"
    return env


def run_plain_rusage(python: str, recipe: Path) -> dict:
    """(a) the whole `python -m recipec plan` process; reaped with wait4 for its own ru_maxrss."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([python, "-m", "recipec", "plan", str(recipe)], cwd=recipe.parent,
                                env=child_env(), stdout=out, stderr=err)
        _, status, rusage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"seconds": seconds, "rc": proc.returncode, "maxrss_kb": rusage.ru_maxrss,
                "stdout": out.read().decode(), "stderr": err.read().decode()}


def run_wrapped(python: str, recipe: Path, side: Path) -> dict:
    """(b) inside the child, from after start-up to the end of main(), plus the child's ru_maxrss."""
    side.unlink(missing_ok=True)
    proc = subprocess.run([python, "-c", CHILD, str(recipe), str(side)], cwd=recipe.parent, env=child_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0 or not side.exists():
        raise SystemExit(f"wrapper child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(side.read_text())


def check_output(stdout: str, expect_params: int, expect_tensors: int) -> list[str]:
    """Problems with the plan's text output (empty when it looks right)."""
    problems = []
    found = [float(x) * 1e9 for x in re.findall(r"([\d.]+) G params", stdout)]
    if not found:
        problems.append("plan output mentions no `G params`")
    elif not all(abs(p - expect_params) / expect_params < 0.01 for p in found):
        problems.append(f"plan reports params {found}, expected ~{expect_params / 1e9:.1f} G")
    if f"{expect_tensors} tensors" not in stdout:
        problems.append(f"plan output never says `{expect_tensors} tensors`")
    if not re.search(r"^Plan: .*", stdout, re.M):
        problems.append("plan output has no `Plan:` summary line")
    return problems


def summary_line(stdout: str) -> str:
    lines = [l for l in stdout.splitlines() if l.startswith("Plan:")]
    return lines[-1] if lines else "(none)"


def fmt_stats(values: list[float], unit: str, digits: int = 3) -> str:
    return f"median {statistics.median(values):.{digits}f} {unit} · min {min(values):.{digits}f} {unit} · " \
           f"max {max(values):.{digits}f} {unit}"


def profile(python: str, recipe: Path, workdir: Path, top: int) -> None:
    """cProfile of main(["plan"]) and `-X importtime` of the whole process, top entries of each."""
    prof = workdir / "plan.prof"
    code = ("import cProfile, contextlib, io, sys\n"
            "pr = cProfile.Profile(); pr.enable()\n"
            "from recipec.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['plan', sys.argv[1]])\n"
            "pr.disable(); pr.dump_stats(sys.argv[2])\n")
    subprocess.run([python, "-c", code, str(recipe), str(prof)], cwd=recipe.parent, env=child_env(), check=True)
    report = subprocess.run([python, "-c", "import pstats, sys; s = pstats.Stats(sys.argv[1]); "
                             "s.sort_stats('cumulative').print_stats(int(sys.argv[2])); "
                             "s.sort_stats('tottime').print_stats(int(sys.argv[2]))", str(prof), str(top)],
                            capture_output=True, text=True, check=True)
    print("\n=== cProfile (import recipec.cli + main(['plan'])) ===")
    print("\n".join(l for l in report.stdout.splitlines() if l.strip()))

    proc = subprocess.run([python, "-X", "importtime", "-m", "recipec", "plan", str(recipe)], cwd=recipe.parent,
                          env=child_env(), capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append((int(m[2]), int(m[1]), len(m[3]) // 2, m[4]))
    total = sum(self_us for _, self_us, _, _ in rows)
    print(f"\n=== -X importtime of `-m recipec plan`: {len(rows)} modules, {total / 1e3:.0f} ms self time in all ===")
    print(f"{'cumulative ms':>14} {'self ms':>8}  module")
    for cum, self_us, depth, name in sorted(rows, reverse=True)[:top]:
        print(f"{cum / 1e3:14.1f} {self_us / 1e3:8.1f}  {'  ' * min(depth, 6)}{name}")
    by_package: dict[str, int] = {}
    for _, self_us, _, name in rows:
        by_package[name.split(".")[0]] = by_package.get(name.split(".")[0], 0) + self_us
    print("\nself time by top-level package (whoever imported it):")
    for name, us in sorted(by_package.items(), key=lambda kv: -kv[1])[:15]:
        print(f"{us / 1e3:10.1f} ms  {name}")

    print("\n=== phases, no profiler (ms; one fresh process per row) ===")
    rows = []
    for _ in range(5):
        proc = subprocess.run([python, "-c", PHASES, str(recipe)], cwd=recipe.parent, env=child_env(),
                              capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-2000:])
            return
        rows.append(json.loads(proc.stdout))
    for key in rows[0]:
        print(f"{key:<48}" + "".join(f"{r[key]:8.1f}" for r in rows))


# --- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, help="build here instead of a temp dir (must be empty or made by this script)")
    ap.add_argument("--keep", action="store_true", help="leave the checkpoints and recipe on disk")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (byte-compile, page cache)")
    ap.add_argument("--python", default=str(DEFAULT_PYTHON if DEFAULT_PYTHON.exists() else sys.executable))
    ap.add_argument("--shard-bytes", type=int, default=SHARD_BYTES)
    ap.add_argument("--profile", action="store_true", help="also print cProfile and -X importtime reports")
    ap.add_argument("--top", type=int, default=25, help="rows per profile table")
    args = ap.parse_args(argv)

    if args.dir:
        root = args.dir.resolve()
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()) and not (root / STAMP).exists():
            raise SystemExit(f"{root} is not empty and was not made by this script")
        (root / STAMP).write_text("made by benchmarks/plan_70b.py\n")
    else:
        root = Path(tempfile.mkdtemp(prefix="recipec-plan70b-"))
    ok = False
    try:
        t = time.perf_counter()
        info = {}
        for name in NAMES:
            shutil.rmtree(root / name, ignore_errors=True)
            info = make_checkpoint(root / name, args.shard_bytes)
        build_s = time.perf_counter() - t
        recipe = root / "recipe.rcp"
        recipe.write_text(RECIPE)
        apparent, allocated = disk_usage(root)
        load = os.getloadavg()[0]
        du = subprocess.run(["du", "-sh", str(root)], capture_output=True, text=True).stdout.split()
        du_apparent = subprocess.run(["du", "-sh", "--apparent-size", str(root)],
                                     capture_output=True, text=True).stdout.split()
        print(f"checkpoints: {len(NAMES)} x Llama-2-70B shape ({info['tensors']} tensors, {info['shards']} shards, "
              f"{info['params'] / 1e9:.2f} G params, {info['bytes'] / 1e9:.1f} GB bf16 each) in {root}")
        print(f"built in {build_s:.2f} s · apparent size {apparent / 1e9:.1f} GB ({apparent / 2**30:.1f} GiB) · "
              f"on disk {allocated / 2**20:.2f} MiB"
              f" (du: {du[0] if du else '?'}, du --apparent-size: {du_apparent[0] if du_apparent else '?'})")
        if allocated > 64 << 20:
            print("FAIL: the shards are not sparse")
            return 1
        print(f"python: {args.python} · load average {load:.2f} on {os.cpu_count()} CPUs"
              + (" (busy machine: timings are inflated)" if load > 0.5 * (os.cpu_count() or 1) else ""))

        for _ in range(args.warmup):
            run_wrapped(args.python, recipe, root / "child.json")
        plain, wrapped = [], []
        for i in range(args.runs):
            # Alternate the two kinds so drift (thermal, page cache) hits both alike.
            plain.append(run_plain_rusage(args.python, recipe))
            wrapped.append(run_wrapped(args.python, recipe, root / "child.json"))
            p, w = plain[-1], wrapped[-1]
            print(f"  run {i + 1}: process {p['seconds']:.3f} s, rss {p['maxrss_kb'] / 1024:.1f} MB | "
                  f"after start-up {w['seconds']:.3f} s (import recipec.cli {w['import_seconds']:.3f} s), "
                  f"rss {w['maxrss_kb'] / 1024:.1f} MB")
        failures = [f"run exited {r['rc']}: {r['stderr'][-2000:]}" for r in plain + wrapped if r["rc"] != 0]
        stdout = plain[-1]["stdout"]
        problems = check_output(stdout, info["params"], info["tensors"])
        if plain[-1]["stdout"] != wrapped[-1]["stdout"]:
            problems.append("wrapped and plain runs printed different plans")

        # Exact cross-check from the JSON plan (one extra, untimed run).
        js = subprocess.run([args.python, "-m", "recipec", "plan", "--json", str(recipe)], cwd=root, env=child_env(),
                            capture_output=True, text=True)
        try:
            steps = json.loads(js.stdout)["steps"]
            params = {s["label"]: s["signature"]["params"] for s in steps if s.get("signature")}
            params_seen = set(params.values())
            exact = f"JSON plan params per node: {params} (expected {info['params']} each)"
            if params_seen != {info["params"]}:
                problems.append(f"JSON plan params {sorted(params_seen)} != {info['params']}")
        except (ValueError, KeyError, TypeError) as err:
            exact = f"(could not read --json plan: {type(err).__name__}: {err})"

        t_proc = [r["seconds"] for r in plain]
        t_after = [r["seconds"] for r in wrapped]
        t_import = [r["import_seconds"] for r in wrapped]
        t_cpu = [r["cpu_seconds"] for r in wrapped]
        rss = [r["maxrss_kb"] / 1024 for r in plain] + [r["maxrss_kb"] / 1024 for r in wrapped]
        print("\nplan output (last run):")
        print("  " + "\n  ".join(stdout.rstrip().splitlines()))
        print(f"\nsummary line: {summary_line(stdout)}")
        print(exact)
        print(f"\n(a) whole process         {fmt_stats(t_proc, 's')}")
        print(f"(b) after start-up        {fmt_stats(t_after, 's')}")
        print(f"    of which import cli   {fmt_stats(t_import, 's')}")
        print(f"    CPU time (user+sys)   {fmt_stats(t_cpu, 's')}")
        print(f"(c) peak RSS (ru_maxrss)  {fmt_stats(rss, 'MB', 1)}")
        time_ok = statistics.median(t_after) < TARGET_SECONDS
        rss_ok = max(rss) < TARGET_RSS_MB
        print(f"\n{'PASS' if time_ok else 'FAIL'}: after start-up median {statistics.median(t_after):.3f} s "
              f"(target < {TARGET_SECONDS} s)")
        print(f"{'PASS' if rss_ok else 'FAIL'}: peak RSS max {max(rss):.1f} MB (target < {TARGET_RSS_MB:.0f} MB)")
        for p in failures + problems:
            print(f"FAIL: {p}")
        ok = time_ok and rss_ok and not failures and not problems
        print(f"\n{'PASS' if ok else 'FAIL'}")
        if args.profile or not (time_ok and rss_ok):
            profile(args.python, recipe, root, args.top)
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {root}")
        elif args.dir:
            for name in (*NAMES, "recipe.rcp", "child.json", "plan.prof", "out", STAMP):
                path = root / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
