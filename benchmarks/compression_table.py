"""The compression table: each compression op on one ~100M-parameter model, judged by parameters, MACs and
measured latency together, as ratios to the dense model.

One recipe, written by this script: the dense model is an `init` of a real config (llama `base`: 124.7M
parameters, 12 layers, 12 query heads in 4 key/value groups; or gpt2 `base`, GPT-2 small), so it builds
offline; each row is one op on it, and one `stats(...)` over all of them measures every row in the same
process with the same settings:

    dense       the model itself
    heads 0.25  prune(m, heads=0.25)          attention heads removed physically
    heads 0.5   prune(m, heads=0.5)
    ffn 0.5     prune(m, ffn=0.5)             FFN neurons removed physically
    sparse 0.5  prune(m, sparsity=0.5)        unstructured: zeros in dense tensors
    2:4         prune(m, sparsity=0.5, pattern="2:4")
    lowrank 0.5 lowrank(m, ratio=0.5)         each linear factorized in two
    layers 0.5  drop_layers(m, keep=0.5)      every other layer kept

The table is printed and written as Markdown (`--out`). For structured rows it gives the measured prefill
latency reduction over the MAC reduction: the target is at least 0.8. The unstructured rows show that
dense zeros do not speed anything up. `stats` times the models in rotating rounds (they fit in memory
together), so the ratios do not drift with the machine's load. Below the table: pruning's own peak memory
(magnitude pruning, global and per tensor, and head pruning of the dense model, each a `recipec run` of its
own), which should stay within a few tensors plus the threshold selection, not grow with the model.

An op this recipec lacks is named, with its rows, before anything runs (exit status 2); `--rows dense`
runs what needs no compression op at all. Usage:

    python benchmarks/compression_table.py --out benchmarks/results/compression_table.md
    python benchmarks/compression_table.py --arch gpt2 --size base --seq-len 256 --threads 1
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from recipec.cli import main as recipec
from recipec.ops import REGISTRY
from recipec.store.cache import Cache


@dataclass(frozen=True)
class Row:
    name: str
    op: str | None  # the compression op the row needs; None for the dense model
    call: str  # the expression, with `dense` for the model
    structured: bool  # physically smaller: latency should fall with the MACs


ROWS = (
    Row("dense", None, "dense", False),
    Row("heads 0.25", "prune", "prune(dense, heads=0.25)", True),
    Row("heads 0.5", "prune", "prune(dense, heads=0.5)", True),
    Row("ffn 0.5", "prune", "prune(dense, ffn=0.5)", True),
    Row("sparsity 0.5", "prune", "prune(dense, sparsity=0.5)", False),
    Row("sparsity 2:4", "prune", 'prune(dense, sparsity=0.5, pattern="2:4")', False),
    Row("lowrank 0.5", "lowrank", "lowrank(dense, ratio=0.5)", True),
    Row("layers 0.5", "drop_layers", "drop_layers(dense, keep=0.5)", True),
)
TARGET = 0.8  # structured rows: measured latency reduction ≥ 0.8 × MAC reduction


class MissingOps(Exception):
    """Rows need ops this recipec does not have."""


def missing_ops(rows: list[Row]) -> dict[str, list[str]]:
    """op -> the rows needing it, for every op the registry lacks."""
    missing: dict[str, list[str]] = {}
    for row in rows:
        if row.op is not None and row.op not in REGISTRY:
            missing.setdefault(row.op, []).append(row.name)
    return missing


def recipe_text(rows: list[Row], arch: str, size: str, settings: dict[str, int]) -> str:
    """One recipe: the dense model, each row as a binding, and one stats over all of them."""
    names = [f"row{i}" for i in range(len(rows))]
    lines = ["recipec 1", f'dense = init("{arch}", size="{size}", seed=0)']
    lines += [f"{name} = {row.call}" for name, row in zip(names, rows)]
    options = ", ".join(f"{key}={value}" for key, value in settings.items())
    lines.append(f"table = stats({', '.join(names)}, {options})")
    return "\n".join(lines) + "\n"


def run_recipe(text: str, workdir: Path) -> dict:
    """`recipec run --json` of the recipe: its JSON summary (nodes, reports). Raises SystemExit with
    recipec's own diagnostics when the recipe is refused or a node fails."""
    recipe = workdir / "compression_table.rcp"
    recipe.write_text(text, encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = recipec(["run", "--json", "--cache", str(workdir / "cache"), str(recipe)])
    if status != 0:
        sys.stderr.write(err.getvalue() + out.getvalue())
        raise SystemExit(f"compression_table: recipec refused or failed (exit status {status}); recipe:\n{text}")
    return json.loads(out.getvalue())


PRUNE_MEMORY_CALLS = ("sparsity 0.5, global", 'prune(dense, sparsity=0.5)'), \
    ("sparsity 0.5, per tensor", 'prune(dense, sparsity=0.5, scope="layer")'), \
    ("heads 0.5", "prune(dense, heads=0.5)")


def pruning_memory(dense: Path, workdir: Path) -> list[str]:
    """Lines saying how much memory pruning the dense model takes beyond a process that has loaded what
    it needs: each prune a `recipec run` of its own, from the dense model's folder, on a fresh cache."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from procmeter import measure_process

    from recipec.store.model_dir import read_model_dir

    files = read_model_dir(dense)
    largest = max(t.nbytes for t in files.tensors.values())
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    base = measure_process([sys.executable, "-c", "import recipec.cli, recipec.backends.prune"], env=env)
    lines = [(f"Pruning's own memory on this model ({files.nbytes / 2**20:,.0f} MiB of weights, largest tensor "
              f"{largest / 2**20:,.0f} MiB): peak anonymous memory of a `recipec run` that prunes it, less "
              f"{base['peak_anon_bytes'] / 2**20:,.0f} MiB for the interpreter with recipec and torch loaded:"), ""]
    for label, call in PRUNE_MEMORY_CALLS:
        folder = Path(tempfile.mkdtemp(prefix="prune-memory-", dir=workdir))  # never a folder of the user's
        (folder / "r.rcp").write_text(f'recipec 1\ndense = load("{dense}")\nexport {call} to "out/p"\n')
        result = measure_process([sys.executable, "-m", "recipec", "run", "--cache", str(folder / "cache"),
                                  str(folder / "r.rcp")], env=env)
        if result["returncode"] != 0:
            raise SystemExit(f"compression_table: {call} failed: {result['output_tail']}")
        extra = max(0, result["peak_anon_bytes"] - base["peak_anon_bytes"])
        lines.append(f"- {label}: {extra / 2**20:,.0f} MiB ({extra / largest:.1f}× the largest tensor, "
                     f"{extra / files.nbytes:.2f}× the weights)")
        shutil.rmtree(folder, ignore_errors=True)
    return lines


def _ratio(value, first) -> float | None:
    return value / first if value is not None and first else None


def _fmt(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.3f}"


def table_rows(rows: list[Row], report: dict) -> list[dict]:
    """Each row's ratios to the first (dense) model: parameters, non-zeros, MACs, latencies, memory."""
    models = report["models"]
    first = models[0]
    result = []
    for row, model in zip(rows, models):
        measured, base = model["measured"], first["measured"]
        macs = _ratio(model["macs_per_token"], first["macs_per_token"])
        prefill = _ratio(measured["prefill_seconds"], base["prefill_seconds"])
        efficiency = (1 - prefill) / (1 - macs) if macs is not None and prefill is not None and macs < 1 else None
        result.append({
            "row": row.name, "structured": row.structured,
            "params": _ratio(model["params"], first["params"]), "nonzero": _ratio(model["nonzero"], first["nonzero"]),
            "macs": macs, "macs_check": model["macs_check"], "prefill": prefill,
            "decode": _ratio(measured["decode_seconds_per_token"], base["decode_seconds_per_token"]),
            "memory": _ratio(measured["peak_memory_bytes"], base["peak_memory_bytes"]),
            "efficiency": efficiency,
            "meets_target": None if not row.structured or efficiency is None else efficiency >= TARGET,
        })
    return result


def markdown(rows: list[dict], report: dict, arch: str, size: str) -> str:
    """The table as Markdown, with what it was measured on."""
    dense = report["models"][0]
    settings, machine = report["settings"], report["measurement"]
    context = (f"Ratios to the dense model. Prefill of {settings['batch']} × {settings['seq_len']} tokens, "
               f"{settings['decode_tokens']} decode steps, median of {settings['repeats']} runs, "
               f"{settings['threads']} thread(s), float32, on {machine['processor']} (torch {machine['torch']}, "
               f"transformers {machine['transformers']}). Dense: {dense['macs_per_token']:,} MACs per token, "
               f"{dense['measured']['prefill_seconds'] * 1000:.1f} ms per prefill.")
    header = ("| row | params | non-zeros | MACs/token | prefill latency | decode latency/token | peak memory | "
              "latency cut / MAC cut |")
    lines = [f"# Compression table: {arch} {size} ({dense['params']:,} parameters)", "", context, "", header,
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        verdict = "" if r["meets_target"] is None else (" ✓" if r["meets_target"] else f" ✗ (target {TARGET})")
        lines.append(f"| {r['row']} | {_fmt(r['params'])} | {_fmt(r['nonzero'])} | {_fmt(r['macs'])} | "
                     f"{_fmt(r['prefill'])} | {_fmt(r['decode'])} | {_fmt(r['memory'])} | "
                     f"{_fmt(r['efficiency'])}{verdict} |")
    for r in rows:
        if not r["structured"] and r["row"] != "dense":
            lines += ["", (f"{r['row']}: {1 - r['nonzero']:.0%} fewer non-zeros, stored as zeros in dense tensors; "
                           f"MACs {_fmt(r['macs'])}×, prefill latency {_fmt(r['prefill'])}× the dense model's: "
                           "dense kernels multiply the zeros all the same.")]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama", choices=("llama", "gpt2", "bert"))
    parser.add_argument("--size", default="base", help="an `init` size preset (base ≈ 125M parameters)")
    parser.add_argument("--rows", default=",".join(r.name for r in ROWS),
                        help="comma-separated rows to run (the first is the reference; default: all)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, help="write the Markdown table here too")
    parser.add_argument("--skip-prune-memory", action="store_true", help="do not measure pruning's own memory")
    parser.add_argument("--workdir", type=Path, help="where the recipe and its cache go (default: a temporary directory)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    by_name = {r.name: r for r in ROWS}
    unknown = [n for n in args.rows.split(",") if n not in by_name]
    if unknown:
        sys.stderr.write(f"compression_table: unknown rows {unknown}; rows are: {', '.join(by_name)}\n")
        return 2
    rows = [by_name[n] for n in args.rows.split(",")]
    missing = missing_ops(rows)
    if missing:
        for op, needing in missing.items():
            sys.stderr.write(f"compression_table: this recipec has no op `{op}`, needed by rows: {', '.join(needing)}\n")
        sys.stderr.write("  run with the ops merged, or choose rows with --rows (e.g. --rows dense)\n")
        return 2
    settings = {"seq_len": args.seq_len, "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
                "decode_tokens": args.decode_tokens}
    text = recipe_text(rows, args.arch, args.size, settings)
    with tempfile.TemporaryDirectory(prefix="recipec-compression-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        summary = run_recipe(text, workdir)
        report = summary["reports"]["table"]
        page = markdown(table_rows(rows, report), report, args.arch, args.size)
        if not args.skip_prune_memory:
            dense_key = next(n["key"] for n in summary["nodes"] if n["label"] == "dense")
            dense = Cache(workdir / "cache").lookup(dense_key).path
            page += "\n" + "\n".join(pruning_memory(dense, workdir)) + "\n"
    sys.stdout.write(page)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
