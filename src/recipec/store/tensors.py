"""Tensor I/O for the streaming engine: memory-mapped safetensors in, pre-laid-out safetensors out.

Reading maps each file once and hands out zero-copy torch views, so a model is never loaded whole.
Writing knows every output tensor's name, dtype and shape before any is computed (the plan has them),
so each shard's header is written first and its space reserved with `posix_fallocate` (a full disk
fails there, cleanly), then each tensor's bytes are written at their place as they are computed, with
`pwrite` from small reused buffers: no tensor, shard or model is ever held whole. On the way the writer
counts NaN and infinite values, so that a run can say where a result went wrong. Headers are
canonical — sorted names, 8-byte aligned, metadata exactly `{"format": "pt"}` — so the same tensors
always give the same bytes.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import warnings
from pathlib import Path

import torch

from ..dtypes import TensorSpec
from .filehash import content_digest, content_hash, content_hasher
from .model_dir import INDEX_FILE, SINGLE_FILE, ModelFiles

TORCH_DTYPES = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class ModelReader:
    """Zero-copy access to the tensors of a local model directory."""

    def __init__(self, files: ModelFiles):
        self.files = files
        self._maps: dict[Path, mmap.mmap] = {}

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[path]

    def tensor(self, name: str) -> torch.Tensor:
        """A read-only view of one tensor, in its stored dtype and shape."""
        entry = self.files.tensors[name]
        if entry.numel == 0:
            return torch.empty(entry.shape, dtype=TORCH_DTYPES[entry.dtype])
        buffer = self._map(self.files.shard_of[name])
        with warnings.catch_warnings():
            # The mapping is read-only on purpose; torch warns because it cannot prove we never write.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(buffer, dtype=TORCH_DTYPES[entry.dtype], count=entry.numel, offset=entry.begin)
        return flat.view(entry.shape)

    def raw(self, name: str) -> memoryview:
        """The stored bytes of one tensor."""
        entry = self.files.tensors[name]
        return memoryview(self._map(self.files.shard_of[name]))[entry.begin:entry.end]

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes when it does
                pass
        self._maps.clear()


def shard_layout(tensors: list[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Tensors in name order, cut into shards of at most `shard_size` bytes (a bigger tensor stands alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for t in sorted(tensors, key=lambda t: t.name):
        if shards[-1] and size + t.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def header_bytes(tensors: list[TensorSpec]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The canonical safetensors header for tensors laid out in the given order, and their data offsets."""
    doc: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets, cursor = {}, 0
    for t in tensors:
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [cursor, cursor + t.nbytes]}
        offsets[t.name] = (cursor, cursor + t.nbytes)
        cursor += t.nbytes
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-(len(blob) + 8) % 8)  # data starts 8-byte aligned, as safetensors itself pads
    return struct.pack("<Q", len(blob)) + blob, offsets


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ModelWriter:
    """Writes a model's safetensors files into `directory`, tensor by tensor, into pre-allocated space.

    Each tensor arrives as one or more contiguous pieces, in order (`write`); the writer hashes the bytes
    as they pass, the only time they are content-hashed (the tensor digests for the model's content
    digest; `SHA256SUMS` is the files' SHA-256, taken once when the object is committed), and, once a
    tensor is complete,
    asks the kernel to start writing it back, so the final fsync has little left to do.
    """

    def __init__(self, directory: Path, tensors: list[TensorSpec], shard_size: int):
        self.directory = directory
        self.layout = shard_layout(tensors, shard_size)
        self.files = shard_names(len(self.layout))
        self._fds: list[int] = []
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}
        self._done: dict[str, int] = {}
        self._hashes: dict[str, object] = {}  # tensor name -> its content hasher
        self.nonfinite: dict[str, int] = {}  # tensor name -> NaN and ±inf values written, where any
        for k, (shard, file) in enumerate(zip(self.layout, self.files)):
            header, offsets = header_bytes(shard)
            size = len(header) + sum(t.nbytes for t in shard)
            fd = os.open(directory / file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            if size:
                os.posix_fallocate(fd, 0, size)  # a full disk fails here, before any work is done
            os.pwrite(fd, header, 0)
            for t in shard:
                begin, _ = offsets[t.name]
                self._where[t.name] = (k, len(header) + begin, t)
                self._done[t.name] = 0
                self._hashes[t.name] = content_hasher()

    def write(self, name: str, piece: torch.Tensor) -> None:
        """Append the next contiguous piece of tensor `name`, already in its output dtype."""
        k, begin, t = self._where[name]
        data = memoryview(piece.contiguous().reshape(-1).view(torch.uint8).numpy())
        offset = self._done[name]
        if offset + data.nbytes > t.nbytes:
            raise ValueError(f"too much data for tensor {name}")
        self._hashes[name].update(data)
        bad = count_nonfinite(piece)
        if bad:
            self.nonfinite[name] = self.nonfinite.get(name, 0) + bad
        written = 0
        while written < data.nbytes:  # pwrite may write less than asked
            written += os.pwrite(self._fds[k], data[written:], begin + offset + written)
        self._done[name] = offset + data.nbytes
        if self._done[name] == t.nbytes:
            _start_writeback(self._fds[k], begin, t.nbytes)

    def digests(self) -> list[tuple]:
        """Every tensor's digest entry; all tensors must be complete."""
        entries = []
        for name, (_, _, t) in sorted(self._where.items()):
            if self._done[name] != t.nbytes:
                raise ValueError(f"tensor {name} is incomplete ({self._done[name]} of {t.nbytes} bytes)")
            entries.append(digest_entry(name, t.dtype, t.shape, self._hashes[name].hexdigest()))
        return entries

    def finish(self) -> str:
        """Fsync every shard, write the index when sharded, close; returns the model's content digest."""
        digest = model_digest(self.digests())
        for fd in self._fds:
            os.fsync(fd)
        self.close()
        if len(self.files) > 1:
            weight_map = {t.name: file for shard, file in zip(self.layout, self.files) for t in shard}
            total = sum(t.nbytes for shard in self.layout for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.directory / INDEX_FILE, index)
        return digest

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def count_nonfinite(values: torch.Tensor) -> int:
    """How many NaN and ±inf values a tensor holds (0 for integer dtypes).

    The common case, none, costs one pass and no allocation: NaN and ±inf propagate through min and max,
    so both are finite exactly when every value is. Only a tensor that has some is counted one by one.
    """
    if not values.is_floating_point() or values.numel() == 0:
        return 0
    low, high = torch.aminmax(values)
    if torch.isfinite(low) and torch.isfinite(high):
        return 0
    return values.numel() - int(torch.isfinite(values).sum())


def _load_sync_file_range():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return fn
    except (OSError, AttributeError):  # not Linux: the final fsync does all the work
        return None


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    if _SYNC_FILE_RANGE is not None and nbytes:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def write_json(path: Path, data: object) -> None:
    """Canonical JSON (sorted keys, two-space indent, trailing newline), fsynced."""
    blob = (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, blob)
        os.fsync(fd)
    finally:
        os.close(fd)


def digest_entry(name: str, dtype: str, shape: tuple[int, ...], content_hex: str) -> tuple:
    """One tensor's entry in a model digest: (name, dtype, shape, content hash of its bytes)."""
    return (name, dtype, list(shape), content_hex)


def tensor_digest(name: str, dtype: str, shape: tuple[int, ...], data: memoryview | bytes) -> tuple:
    """One tensor's entry in a model digest, hashing its bytes."""
    return digest_entry(name, dtype, shape, content_hash(data))


def model_digest(entries: list[tuple]) -> str:
    """A model's content digest: over sorted (name, dtype, shape, content hash of bytes), so it does not
    depend on how the model is sharded."""
    return content_digest(sorted(entries))
