"""Analysis ops: reports about models, built without instantiating them.

`stats` is the first: parameter, byte and dtype counts read from the safetensors files. Reports are
roots: a recipe that binds one (`s = stats(m)`) gets it built and printed by `run`, and may export it.
"""

from __future__ import annotations

from ..artifacts.report import REPORT
from ..ir.types import Kind, Type
from .base import Cost, Input, Op, Params, bytes_read, register


@register
class Stats(Op):
    """Parameters, non-zero parameters, bytes, dtypes, tensors and layers of models side by side, with
    ratios to the first. Example: `s = stats(base, merged)`"""

    name = "stats"
    inputs = (Input("models", Kind.MODEL, variadic=True, doc="one or more models; ratios are to the first"),)
    toolchain = ("numpy",)
    rule = "analysis:build_stats"

    class Params(Params):
        pass

    @classmethod
    def output_type(cls, ctx, inputs, params):
        return Type(REPORT)

    @classmethod
    def cost(cls, inputs, params, out, threads):
        # Every weight is read once, a chunk at a time.
        return Cost(bytes_read=bytes_read(inputs, out), peak_bytes=16 << 20)
