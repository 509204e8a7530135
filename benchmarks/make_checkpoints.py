"""Write synthetic Llama checkpoints (base, chat, continued-pretraining) for merge benchmarks.

Each model is a Hugging Face Llama directory: ``config.json`` plus bf16
safetensors shards and ``model.safetensors.index.json``, with exactly the
tensor names ``LlamaForCausalLM.save_pretrained`` writes. The defaults are
TinyLlama-1.1B's shape.

The first name is the base model (random weights, norms at 1.0); every other
name is base + a small seeded perturbation, so ``chat - base`` is a real,
non-zero task vector and a chat-vector merge has something to compute.

Weights are made straight with torch + safetensors, one shard at a time: no
transformers model is ever built and the whole model is never in memory (peak
is about two shards). Every tensor comes from its own seeded
``torch.Generator``, so the bytes depend only on the shape and ``seed``, not on
the sharding or the order things are written in.

No tokenizer is written: mergekit does not need one (with
``--no-copy-tokenizer`` it does not look for it; without that flag it only logs
an error).

Usage::

    python benchmarks/make_checkpoints.py /tmp/recipec-bench --size 1.1b
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

# Named sizes. "half" halves the depth only, so a benchmark can show memory
# that does not grow with model size; "tiny" is for smoke tests.
SIZES: dict[str, dict[str, int]] = {
    "1.1b": {},
    "half": {"layers": 11},
    "tiny": {"hidden": 256, "layers": 4, "intermediate": 688, "heads": 8, "kv_heads": 2, "vocab": 1024},
}

WEIGHT_STD = 0.02  # Llama's initializer_range
DELTA_STD = 0.002  # 10% of a weight: far above bf16's ~0.4% rounding, so deltas survive
NORM_DELTA_STD = 0.01
BYTES_PER_PARAM = 2  # bf16
# Sidecar recording the seed, kept out of config.json so that stays a stock Llama config.
STAMP = "recipec-bench.json"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint: its saved name, shape and place in the order."""

    name: str
    shape: tuple[int, ...]
    index: int

    @property
    def is_norm(self) -> bool:
        return self.name.endswith("layernorm.weight") or self.name == "model.norm.weight"

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * BYTES_PER_PARAM


def llama_tensor_specs(
    *, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int
) -> list[TensorSpec]:
    """Tensor names and shapes in the order LlamaForCausalLM's state_dict has them (from recipec's
    architecture table, which is tested against transformers)."""
    from recipec import arch

    config = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
              "intermediate_size": intermediate, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "vocab_size": vocab, "tie_word_embeddings": False}
    return [TensorSpec(name, shape, i) for i, (name, shape) in enumerate(arch.tensor_shapes(config).items())]


def plan_shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in order, like save_pretrained: a shard closes before it would pass the limit."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _generator(seed: int, index: int, role: int) -> torch.Generator:
    # One stream per (seed, tensor, model): independent of sharding and write order.
    return torch.Generator().manual_seed((seed * 1_000_003 + index) * 16 + role)


def base_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """The base model's tensor: N(0, 0.02) weights, or ones for RMSNorm weights."""
    if spec.is_norm:
        return torch.ones(spec.shape, dtype=torch.bfloat16)
    t = torch.randn(spec.shape, generator=_generator(seed, spec.index, 0))
    return t.mul_(WEIGHT_STD).to(torch.bfloat16)


def perturbed(base: torch.Tensor, spec: TensorSpec, seed: int, role: int) -> torch.Tensor:
    """base + a small seeded delta (role >= 1 picks the model), rounded once to bf16."""
    std = NORM_DELTA_STD if spec.is_norm else DELTA_STD
    delta = torch.randn(spec.shape, generator=_generator(seed, spec.index, role))
    return delta.mul_(std).add_(base).to(torch.bfloat16)


def llama_config(*, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> dict:
    """A config.json that transformers 5.x and mergekit both read as plain Llama."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": WEIGHT_STD,
        "intermediate_size": intermediate,
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab,
    }


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_index(model_dir: Path, shards: list[list[TensorSpec]]) -> None:
    weight_map = {s.name: _shard_name(i, len(shards)) for i, shard in enumerate(shards) for s in shard}
    total = sum(s.nbytes for shard in shards for s in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _is_complete(model_dir: Path, config: dict, seed: int, n_shards: int) -> bool:
    """Written earlier with the same config and seed? The index is written last, so it marks completion."""
    try:
        same = json.loads((model_dir / "config.json").read_text()) == config
        same = same and json.loads((model_dir / STAMP).read_text()) == {"seed": seed}
    except (OSError, ValueError):
        return False
    shards_there = all((model_dir / _shard_name(i, n_shards)).is_file() for i in range(n_shards))
    return same and shards_there and (model_dir / "model.safetensors.index.json").is_file()


def make_llama_checkpoints(
    root: Path,
    *,
    hidden: int = 2048,
    layers: int = 22,
    intermediate: int = 5632,
    heads: int = 32,
    kv_heads: int = 4,
    vocab: int = 32000,
    shard_bytes: int = 1 << 30,
    names: tuple[str, ...] = ("base", "chat", "cp"),
    seed: int = 0,
) -> dict[str, Path]:
    """Write one Llama directory per name under ``root``; return {name: directory}.

    ``names[0]`` is the base; the others are base + small independent deltas.
    Directories already complete with the same config and seed are kept as they are.
    """
    dims = dict(hidden=hidden, layers=layers, intermediate=intermediate, heads=heads, kv_heads=kv_heads, vocab=vocab)
    if hidden % heads or heads % kv_heads:
        raise ValueError("heads must divide hidden and kv_heads must divide heads")
    shards = plan_shards(llama_tensor_specs(**dims), shard_bytes)
    config = llama_config(**dims)
    dirs = {name: Path(root) / name for name in names}
    todo = [(role, name) for role, name in enumerate(names) if not _is_complete(dirs[name], config, seed, len(shards))]
    if not todo:
        return dirs
    for _, name in todo:
        dirs[name].mkdir(parents=True, exist_ok=True)
        (dirs[name] / "model.safetensors.index.json").unlink(missing_ok=True)
        (dirs[name] / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (dirs[name] / STAMP).write_text(json.dumps({"seed": seed}) + "\n")
    for i, shard in enumerate(shards):
        _write_shard(i, shard, len(shards), todo, dirs, seed)
    for _, name in todo:
        _write_index(dirs[name], shards)
    return dirs


def _write_shard(
    i: int, shard: list[TensorSpec], n: int, todo: list[tuple[int, str]], dirs: dict[str, Path], seed: int
) -> None:
    """Write shard i of every model still to do; holds the base shard plus one other at a time."""
    base = {s.name: base_tensor(s, seed) for s in shard}
    # Fixed metadata only: more keys make the file bytes vary run to run.
    meta = {"format": "pt"}
    for role, name in todo:
        tensors = base if role == 0 else {s.name: perturbed(base[s.name], s, seed, role) for s in shard}
        save_file(tensors, str(dirs[name] / _shard_name(i, n)), metadata=meta)
        del tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--size", choices=sorted(SIZES), default="1.1b")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name, path in make_llama_checkpoints(args.root, seed=args.seed, **SIZES[args.size]).items():
        print(name, path)


if __name__ == "__main__":
    main()
