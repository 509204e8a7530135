"""Run the peer: mergekit 0.1.5's chat-vector merge, timed and memory-metered.

The merge is ``cp + k * (chat - base)``. mergekit's ``task_arithmetic``
computes ``base + sum_i w_i * (m_i - base)`` (``normalize: false``), so with
``chat`` at weight ``k`` and ``cp`` at weight 1.0::

    base + k (chat - base) + (cp - base) = cp + k (chat - base)

mergekit does this arithmetic in the config's ``dtype``. With ``bfloat16``
(the default here, and what a user merging bf16 models writes) every
difference and product is rounded to bf16 on the way: about 12% of the output
elements then differ by one bf16 ulp from ``(cp + k*(chat-base))`` computed
in fp32 and rounded once. ``compute_dtype="float32"`` makes mergekit upcast
(inputs cast to fp32, result cast back to bf16 by ``out_dtype``), at a cost
in memory and time.

The options chosen for CPU speed and a fair memory number:

- ``--out-shard-size``: mergekit keeps the whole current output shard in RAM
  (its only memory lever on CPU). It is in *bytes*, whatever ``--help`` says
  ("number of parameters"); it is set to the input shard size.
- ``--lazy-unpickle``: only affects pickled ``.bin`` inputs (safetensors are
  mmapped anyway); on, as a user chasing memory would have it.
- ``--no-copy-tokenizer``: the synthetic checkpoints have no tokenizer; without
  this mergekit tries to load one and logs an error.
- ``--no-async-write``: (the default) async writing keeps more shards in RAM.
- no ``--cuda``: CPU only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

try:
    from benchmarks.procmeter import measure_process
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from procmeter import measure_process

DEFAULT_SHARD_BYTES = 1 << 30


def _yaml_str(path: Path) -> str:
    """An absolute path as a YAML double-quoted scalar (JSON's escaping is valid YAML)."""
    return json.dumps(str(Path(path).resolve()))


def mergekit_yaml(base: Path, chat: Path, cp: Path, k: float, compute_dtype: str = "bfloat16") -> str:
    """The mergekit config computing cp + k * (chat - base), written out in bf16.

    ``compute_dtype`` is mergekit's ``dtype``: the inputs are cast to it and the
    arithmetic runs in it; ``out_dtype`` then casts the result to bf16.
    """
    q = _yaml_str
    return (
        "merge_method: task_arithmetic\n"
        f"base_model: {q(base)}\n"
        "models:\n"
        f"  - model: {q(chat)}\n"
        "    parameters:\n"
        f"      weight: {float(k)!r}\n"
        f"  - model: {q(cp)}\n"
        "    parameters:\n"
        "      weight: 1.0\n"
        "parameters:\n"
        "  normalize: false\n"
        f"dtype: {compute_dtype}\n"
        "out_dtype: bfloat16\n"
    )


def mergekit_command(
    python: Path, config: Path, out: Path, *, threads: int | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[str]:
    """The mergekit-yaml command line, with the CPU options the module docstring explains."""
    cmd = [
        str(Path(python).parent / "mergekit-yaml"),
        str(config),
        str(out),
        "--lazy-unpickle",
        "--out-shard-size",
        str(shard_bytes),
        "--no-copy-tokenizer",
        "--no-async-write",
        "--quiet",
    ]
    if threads is not None:
        cmd += ["--num-threads", str(threads)]
    return cmd


def _offline_env(threads: int | None) -> dict[str, str]:
    # Local paths only: make sure nothing reaches for the Hub and stalls on a timeout.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_mergekit(
    python: Path,
    base: Path,
    chat: Path,
    cp: Path,
    out: Path,
    k: float = 0.8,
    threads: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    compute_dtype: str = "bfloat16",
) -> dict:
    """Merge with mergekit into ``out`` (which must not exist yet); return the measurements.

    The result has ``seconds``, ``peak_anon_bytes`` and ``peak_rss_bytes``,
    plus everything else ``procmeter.measure_process`` reports and the
    ``command`` and ``config`` that were run.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; the peer writes only into a new directory")
    config = out.parent / f"{out.name}.mergekit.yml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(mergekit_yaml(base, chat, cp, k, compute_dtype))
    cmd = mergekit_command(python, config, out, threads=threads, shard_bytes=shard_bytes)
    result = measure_process(cmd, env=_offline_env(threads))
    if result["returncode"] != 0:
        raise RuntimeError(f"mergekit failed ({result['returncode']}):\n{result['output_tail']}")
    return {**result, "command": cmd, "config": str(config)}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Run and meter mergekit's chat-vector merge.")
    ap.add_argument("python", type=Path, help="the peer venv's python")
    ap.add_argument("base", type=Path)
    ap.add_argument("chat", type=Path)
    ap.add_argument("cp", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("-k", type=float, default=0.8)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = ap.parse_args()
    res = run_mergekit(a.python, a.base, a.chat, a.cp, a.out, k=a.k, threads=a.threads, compute_dtype=a.compute_dtype)
    res.pop("output_tail")
    print(json.dumps(res, indent=2))
