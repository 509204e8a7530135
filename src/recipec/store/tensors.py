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
import hashlib
import json
import os
import struct
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..dtypes import TensorSpec
from .digests import digest_entry, model_digest
from .filehash import content_hasher, remember_written_hash
from .model_dir import INDEX_FILE, SINGLE_FILE, MappedWeights

TORCH_DTYPES = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class ModelReader(MappedWeights):
    """Zero-copy access to the tensors of a local model directory."""

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

    Each tensor arrives as one or more contiguous pieces, in order (`write`); the writer content-hashes
    the bytes as they pass (the tensor digests of the model's content digest) and, once a tensor is
    complete, asks the kernel to start writing it back, so the final fsync has little left to do. Each
    file's SHA-256 (for `SHA256SUMS`) is taken on a thread of its own while the rest is being computed:
    whenever every byte of a file up to some tensor is written, those bytes are read back from the page
    cache and hashed, so writing tensors in file order (`file_order`) leaves only the last to hash when
    the writing ends. Either way each byte is hashed once per algorithm.
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
        self._file_sums: list = []  # per shard, the SHA-256 of its bytes up to tensor `_file_hashed[k]`
        self._file_hashed: list[int] = []
        self._file_lock = threading.Lock()
        self._file_hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recipec-sha256")
        self._file_hashing: list = []  # its futures, whose errors must surface
        for k, (shard, file) in enumerate(zip(self.layout, self.files)):
            header, offsets = header_bytes(shard)
            self._file_sums.append(hashlib.sha256(header))
            self._file_hashed.append(0)
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
            self._hash_written_prefix(k)

    def file_order(self) -> list[str]:
        """Tensor names in the order they lie in the files: the order that lets file hashing keep up."""
        return [t.name for shard in self.layout for t in shard]

    def _hash_written_prefix(self, k: int) -> None:
        """Hand the hashing thread the bytes of shard `k` that are now written without a gap after
        those it already has (tensors complete, in file order); the thread reads them in that order."""
        with self._file_lock:
            shard, first = self.layout[k], self._file_hashed[k]
            last = first
            while last < len(shard) and self._done[shard[last].name] == shard[last].nbytes:
                last += 1
            if last == first:
                return
            self._file_hashed[k] = last
            begin = self._where[shard[first].name][1]
            end = self._where[shard[last - 1].name][1] + shard[last - 1].nbytes
            self._file_hashing.append(
                self._file_hasher.submit(_hash_range, self._file_sums[k], self._fds[k], begin, end))

    def digests(self) -> list[tuple]:
        """Every tensor's digest entry; all tensors must be complete."""
        entries = []
        for name, (_, _, t) in sorted(self._where.items()):
            if self._done[name] != t.nbytes:
                raise ValueError(f"tensor {name} is incomplete ({self._done[name]} of {t.nbytes} bytes)")
            entries.append(digest_entry(name, t.dtype, t.shape, self._hashes[name].hexdigest()))
        return entries

    def finish(self) -> str:
        """Fsync every shard, write the index when sharded, close; returns the model's content digest.
        Each shard's SHA-256 is remembered for the object's `SHA256SUMS` (filehash.hash_file)."""
        digest = model_digest(self.digests())
        for k in range(len(self.layout)):
            self._hash_written_prefix(k)  # empty tensors at a shard's end, which are never written
        for fd in self._fds:
            os.fsync(fd)  # while the hashing thread finishes the last tensors
        for future in self._file_hashing:
            future.result()
        for file, total, hashed, shard in zip(self.files, self._file_sums, self._file_hashed, self.layout):
            if hashed == len(shard):
                remember_written_hash(self.directory / file, total.hexdigest())
        self.close()
        if len(self.files) > 1:
            weight_map = {t.name: file for shard, file in zip(self.layout, self.files) for t in shard}
            total = sum(t.nbytes for shard in self.layout for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.directory / INDEX_FILE, index)
        return digest

    def close(self) -> None:
        self._file_hasher.shutdown(wait=True, cancel_futures=True)  # before its files are closed
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


def _hash_range(total, fd: int, begin: int, end: int) -> None:
    """Add bytes [begin, end) of an open file to the SHA-256 `total` (read back: they are in the page cache)."""
    while begin < end:
        block = os.pread(fd, min(_HASH_BLOCK, end - begin), begin)
        if not block:
            raise OSError(f"the file ended at byte {begin} while {end - begin} more were expected")
        total.update(block)
        begin += len(block)


_HASH_BLOCK = 8 << 20


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
