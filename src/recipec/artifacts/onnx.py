"""The ONNX model kind: `model.onnx`, the external data file its tensors may live in, and what it takes to
use it without recipec — the model's config and tokenizer files, and `parity.json`, what the parity check
against PyTorch measured. Exported `with_cache`, `model.onnx` is the prefill graph and `decode.onnx` (with
its own data file) the decode step on a KV cache. The `onnx` op (ops/export.py) builds one; its digest covers every file, and a
release holds them all, the graph and its data read-only (as weights are).
"""

from __future__ import annotations

from pathlib import Path

from ..ir.types import Kind
from ..store.release import ReleaseFile
from . import Artifact, ArtifactError, ArtifactKind, Problem, ReleaseInfo, register

ONNX_MODEL = Kind.register("OnnxModel")
GRAPH_FILE = "model.onnx"
DATA_FILE = GRAPH_FILE + ".data"  # the graph records this name: it must lie beside the graph, so named
DECODE_FILE = "decode.onnx"  # the decode step of a graph pair with a KV cache
PARITY_FILE = "parity.json"


@register
class OnnxKind(ArtifactKind):
    kind = ONNX_MODEL
    noun = "an ONNX model"
    formats = ("onnx",)

    @classmethod
    def read(cls, path: Path) -> Path:
        """The graph file; its external data file, if any, lies beside it."""
        if not (path / GRAPH_FILE).is_file():
            raise ArtifactError([Problem("E401", f"no {GRAPH_FILE} in {path}")])
        return path / GRAPH_FILE

    @classmethod
    def release_files(cls, artifact: Artifact, info: ReleaseInfo, fmt: str) -> list[ReleaseFile]:
        files = []
        for path in cls.content_files(artifact.path):
            known = info.known.get(path.name)
            # onnx refuses external data in a file with several hard links (a "hardlink attack"), so data
            # files are copied; graphs may be shared with the cache, read-only like weights.
            graph, data = path.suffix == ".onnx", path.name.endswith(".onnx.data")
            files.append(ReleaseFile(path.name, source=path, shared=graph and known is not None,
                                     read_only=graph or data, sha256=known))
        return files
