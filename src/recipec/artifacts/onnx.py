"""The ONNX model kind: `model.onnx` and the external data files its tensors live in, digested and
released as those files. No op builds one yet; export to ONNX (a later op) produces it."""

from __future__ import annotations

from pathlib import Path

from ..ir.types import Kind
from . import ArtifactError, ArtifactKind, Problem, register

ONNX_MODEL = Kind.register("OnnxModel")
GRAPH_FILE = "model.onnx"


@register
class OnnxKind(ArtifactKind):
    kind = ONNX_MODEL
    noun = "an ONNX model"
    formats = ("onnx",)

    @classmethod
    def read(cls, path: Path) -> Path:
        """The graph file; its external data files lie beside it."""
        if not (path / GRAPH_FILE).is_file():
            raise ArtifactError([Problem("E401", f"no {GRAPH_FILE} in {path}")])
        return path / GRAPH_FILE
