"""Facts about tensor dtypes and tensor specs that every layer shares; imports nothing of recipec.

safetensors names dtypes by codes (`BF16`); recipes and configs by names (`bfloat16`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

# dtype names as recipes and configs write them -> safetensors dtype codes
DTYPE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]
