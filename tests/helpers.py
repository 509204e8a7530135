"""Test helpers: write small, valid (or deliberately broken) model directories without torch."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from recipec import arch
from recipec.cli import main
from recipec.dtypes import DTYPE_BYTES


def safetensors_bytes(tensors: dict[str, tuple[str, tuple[int, ...]]], fill: bytes = b"\0") -> bytes:
    """A valid safetensors file whose tensors hold repeated `fill` bytes."""
    header, offset = {}, 0
    for name, (dtype, shape) in sorted(tensors.items()):
        n = math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + (fill * offset)[:offset]


def write_model(root: Path, config: dict, dtype: str = "F32", shards: int = 1) -> Path:
    """A model directory for `config`, with zero weights, single-file or sharded."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {n: (dtype, s) for n, s in arch.tensor_shapes(config).items()}
    if shards == 1:
        (root / "model.safetensors").write_bytes(safetensors_bytes(tensors))
        return root
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        (root / file).write_bytes(safetensors_bytes({n: tensors[n] for n in part}))
        weight_map.update({n: file for n in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def tiny_llama(root: Path, **overrides) -> Path:
    config = arch.preset_config("llama", "tiny") | overrides
    return write_model(root, config)


def run_cli(args: list, capsys, cwd: Path | None = None) -> tuple[int, str, str]:
    """`recipec ARGS` in this process (from `cwd` if given): exit status, stdout, stderr. A bad input
    is a diagnostic, never a traceback or an internal error."""
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        status = main([str(a) for a in args])
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    return status, out, err


# Examples that train or measure models take a minute or more each. The tests that would run every example
# several times run these once: .ci/run already runs every example with `run --locked` and `verify` at two
# other paths.
SLOW_EXAMPLES = frozenset({"chain_tiny.rcp", "compress_tiny.rcp", "inscp_tiny.rcp", "train_tiny.rcp"})
