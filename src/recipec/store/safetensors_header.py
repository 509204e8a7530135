"""Read and validate safetensors headers without reading a tensor.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
{dtype, shape, data_offsets}, then the data. Everything the planner knows about a checkpoint comes
from here, so the checks are strict: a header that lies about the data (offsets past the end, gaps,
overlaps, a size that does not match shape × dtype) is refused before any backend trusts it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from ..dtypes import DTYPE_BYTES

# Headers are JSON metadata; 100 MB is what the safetensors reference implementation allows.
MAX_HEADER_BYTES = 100_000_000


class HeaderError(Exception):
    """The file is not a valid safetensors file; the message says why, for a user."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: Path) -> Header:
    """Parse and validate one safetensors file's header; raises HeaderError."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            prefix = f.read(8)
            if len(prefix) < 8:
                raise HeaderError(f"file is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise HeaderError(f"header length {n} is implausibly large")
            if 8 + n > size:
                raise HeaderError(f"header claims {n} bytes but the file is only {size} bytes (truncated?)")
            raw = f.read(n)
    except OSError as err:
        raise HeaderError(f"cannot read: {err.strerror or err}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HeaderError(f"header is not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise HeaderError("header is not a JSON object")
    return _validate(path, doc, 8 + n, size)


def _validate(path: Path, doc: dict, data_start: int, size: int) -> Header:
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("`__metadata__` must map strings to strings")
    tensors: dict[str, TensorEntry] = {}
    for name, info in doc.items():
        tensors[name] = _entry(name, info, data_start)
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.nbytes)
    cursor = data_start
    for begin, end, name in spans:
        if begin < cursor:
            raise HeaderError(f"tensor `{name}` overlaps the tensor before it")
        cursor = end
    if cursor > size:
        raise HeaderError(f"tensor data runs to byte {cursor} but the file has {size} bytes (truncated?)")
    return Header(path, tensors, metadata, data_start, size)


def _entry(name: str, info: object, data_start: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise HeaderError(f"entry for `{name}` is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise HeaderError(f"tensor `{name}` has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise HeaderError(f"tensor `{name}` has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise HeaderError(f"tensor `{name}` has invalid data_offsets {offsets!r}")
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise HeaderError(f"tensor `{name}` has {offsets[1] - offsets[0]} bytes but shape {shape} "
                          f"of {dtype} needs {expected}")
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
