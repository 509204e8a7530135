"""Tensor I/O for the streaming engine: memory-mapped safetensors in, pre-laid-out safetensors out.

Reading maps each file once and hands out zero-copy torch views, so a model is never loaded whole.
Writing knows every output tensor's name, dtype and shape before any is computed (the plan has them),
so each shard's header is written first and its space reserved with `posix_fallocate` (a full disk
fails there, cleanly), then each tensor's bytes are written at their place as they are computed, with
`pwrite` from small reused buffers: no tensor, shard or model is ever held whole (`OrderedModelWriter`
writes a result front to back past the page cache instead, for threads that compute it nearly in file
order). On the way the writer counts NaN and infinite values, so that a run can say where a result went
wrong. Headers are canonical — sorted names, 8-byte aligned, metadata exactly `{"format": "pt"}` — so
the same tensors always give the same bytes, whichever writer writes them.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import queue
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

    _background_threads = 1

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
        # The writer's own threads: one hashes what is written in order (read back); ordered, they write.
        self._background = ThreadPoolExecutor(max_workers=self._background_threads, thread_name_prefix="recipec-writer")
        self._pending: list = []  # its futures, whose errors must surface
        self.sizes: list[int] = []  # each shard's size in bytes
        try:
            for k, (shard, file) in enumerate(zip(self.layout, self.files)):
                header, offsets = header_bytes(shard)
                self._file_sums.append(hashlib.sha256())
                self._file_hashed.append(0)
                self.sizes.append(len(header) + sum(t.nbytes for t in shard))
                fd = os.open(directory / file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                _reserve(fd, self.sizes[k])  # a full disk fails here, before any work is done
                for t in shard:
                    begin, _ = offsets[t.name]
                    self._where[t.name] = (k, len(header) + begin, t)
                    self._done[t.name] = 0
                    self._hashes[t.name] = content_hasher()
                self._start(k, header)
        except BaseException:  # no descriptor of a file about to be deleted stays open, holding its space
            self.close()
            raise

    def _start(self, k: int, header: bytes) -> None:
        """Begin shard `k` with its header."""
        self._file_sums[k].update(header)
        os.pwrite(self._fds[k], header, 0)

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
        self._place(k, begin + offset, data)
        self._done[name] = offset + data.nbytes
        if self._done[name] == t.nbytes:
            self._completed(k, begin, t.nbytes)

    def _place(self, k: int, position: int, data: memoryview) -> None:
        """Put bytes at `position` of shard `k`: written through the page cache, where `_completed` finds
        them to hash."""
        _pwrite_all(self._fds[k], data, position)

    def _completed(self, k: int, begin: int, nbytes: int) -> None:
        """A tensor of shard `k` is complete: start writing it back, hash what is now written in order."""
        _start_writeback(self._fds[k], begin, nbytes)
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
            self._pending.append(
                self._background.submit(_hash_range, self._file_sums[k], self._fds[k], begin, end))

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
        self._drain()
        for fd in self._fds:
            os.fsync(fd)  # while the hashing thread finishes the last tensors
        for file, sha256 in zip(self.files, self._file_sha256()):
            if sha256 is not None:
                remember_written_hash(self.directory / file, sha256)
        self.close()
        if len(self.files) > 1:
            weight_map = {t.name: file for shard, file in zip(self.layout, self.files) for t in shard}
            total = sum(t.nbytes for shard in self.layout for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.directory / INDEX_FILE, index)
        return digest

    def abort(self) -> None:
        """The result will not be finished: wake whatever waits on the writer (the ordered one's threads)."""

    def _drain(self) -> None:
        """Everything placed is on its way to the files, and every file's hashing is under way."""
        for k in range(len(self.layout)):
            self._hash_written_prefix(k)  # empty tensors at a shard's end, which are never written

    def _file_sha256(self) -> list[str | None]:
        """Each shard's SHA-256, None where the hashing did not see every byte."""
        for future in self._pending:
            future.result()
        return [total.hexdigest() if hashed == len(shard) else None
                for total, hashed, shard in zip(self._file_sums, self._file_hashed, self.layout)]

    def close(self) -> None:
        self._background.shutdown(wait=True, cancel_futures=True)  # before its files are closed
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class OrderedModelWriter(ModelWriter):
    """A `ModelWriter` for results written nearly in file order by a pool of threads (`stream_tensors`),
    that nothing else in the run reads: each shard is written front to back, from memory, past the page
    cache where the system allows it (O_DIRECT).

    Every byte is placed at its shard's frontier: a piece that arrives there is hashed (the file's
    SHA-256, in order, from memory: nothing is read back) and copied into an aligned buffer that a
    writing thread writes with O_DIRECT when full; a piece that arrives early (another thread's tensor
    further on) waits in memory until the frontier reaches it, at most `held_bytes` of them: a thread
    that would hold more waits for the frontier, which the thread computing the frontier's tensor
    moves. Buffered writes through the page cache cost this project's VMs more CPU than the computation
    (`dd` from /dev/zero: 4.8 s of system time for 2.2 GB, 0.4 s with O_DIRECT), and a result that no
    later node reads gains nothing from being cached. Where O_DIRECT is missing or refused (tmpfs, macOS),
    the same aligned buffers are written through the page cache."""

    def __init__(self, directory: Path, tensors: list[TensorSpec], shard_size: int, producers: int,
                 held_bytes: int, buffer_bytes: int, writers: int):
        # A shard holds a buffer from its first byte at the frontier to its last: at most one shard per
        # producing thread does at a time (they take tensors in file order), and each writing thread one.
        self._buffer_count, self._buffer_bytes = producers + writers + 1, -(-buffer_bytes // _ALIGN) * _ALIGN
        self._held_limit = held_bytes
        self._held: list[dict[int, bytes]] = []  # per shard: position -> bytes that arrived early
        self._held_bytes = 0
        self._frontier: list[int] = []  # per shard: every byte before it is hashed and buffered
        self._buffers: list[tuple[mmap.mmap, int, int] | None] = []  # per shard: (buffer, file offset, filled)
        self._direct: list[int | None] = []  # per shard: an O_DIRECT descriptor, where the system has one
        self._refused: list[bool] = []  # per shard: whether a write with it was refused (EINVAL)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._made = 0
        self._state = threading.Condition()
        self._failed = False
        self._background_threads = writers
        super().__init__(directory, tensors, shard_size)

    def _start(self, k: int, header: bytes) -> None:
        self._held.append({0: header})  # taken with the shard's first bytes at the frontier
        self._frontier.append(0)
        self._buffers.append(None)
        self._direct.append(_open_direct(self.directory / self.files[k]))
        self._refused.append(False)

    def _place(self, k: int, position: int, data: memoryview) -> None:
        with self._state:
            self._take_held(k)  # the header, before a shard's first tensor
            while (position != self._frontier[k] and self._held_bytes + data.nbytes > self._held_limit
                   and not self._failed):
                self._state.wait(0.1)  # the frontier's thread makes room
            if self._failed:
                raise OSError("the writing of this result was abandoned")
            if position != self._frontier[k]:
                self._held[k][position] = bytes(data)
                self._held_bytes += data.nbytes
                return
            self._append(k, data)
            self._take_held(k)
            self._state.notify_all()

    def _take_held(self, k: int) -> None:
        """Append what waits at shard `k`'s frontier, as long as something does."""
        while (early := self._held[k].pop(self._frontier[k], None)) is not None:
            self._held_bytes -= len(early) if self._frontier[k] else 0  # a header is not counted
            self._append(k, memoryview(early))

    def _completed(self, k: int, begin: int, nbytes: int) -> None:
        pass  # written and hashed as it arrived

    def _append(self, k: int, data: memoryview) -> None:
        """Hash bytes at shard `k`'s frontier and move them into its buffer, written out when full."""
        self._file_sums[k].update(data)
        self._frontier[k] += data.nbytes
        while data.nbytes:
            buffer, at, filled = self._buffers[k] or (self._buffer(), self._frontier[k] - data.nbytes, 0)
            take = min(len(buffer) - filled, data.nbytes)
            buffer[filled:filled + take] = data[:take]
            data, filled = data[take:], filled + take
            self._buffers[k] = (buffer, at, filled)
            if filled == len(buffer):
                self._submit(k)
        if self._frontier[k] == self.sizes[k] and self._buffers[k] is not None:
            self._submit(k)  # the shard is complete: its buffer goes back to the others

    def _buffer(self) -> mmap.mmap:
        """A free aligned buffer (anonymous memory is page-aligned, as O_DIRECT needs), made up to a few;
        beyond them, wait for the writing thread to free one: the disk sets the pace."""
        if self._made < self._buffer_count:
            self._made += 1
            return mmap.mmap(-1, self._buffer_bytes)
        return self._free.get()

    def _submit(self, k: int) -> None:
        """Hand shard `k`'s buffer to the writing thread; a write that failed already is raised here."""
        buffer, at, filled = self._buffers[k]
        self._buffers[k] = None
        for done in [w for w in self._pending if w.done()]:
            done.result()
            self._pending.remove(done)
        self._pending.append(self._background.submit(self._write_out, k, buffer, at, filled))

    def _write_out(self, k: int, buffer: mmap.mmap, at: int, nbytes: int) -> None:
        """On the writing thread: `nbytes` of `buffer` at `at` of shard `k` (a partial last block padded to
        a whole one: the file is cut to its size at the end), then the buffer is free again."""
        try:
            padded = -(-nbytes // _ALIGN) * _ALIGN
            buffer[nbytes:padded] = bytes(padded - nbytes)
            if self._direct[k] is not None and not self._refused[k]:
                try:
                    _pwrite_all(self._direct[k], memoryview(buffer)[:padded], at)
                    return
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
                    self._refused[k] = True  # for this file: the page cache takes the rest
            _pwrite_all(self._fds[k], memoryview(buffer)[:padded], at)
            _start_writeback(self._fds[k], at, padded)
        finally:
            self._free.put(buffer)

    def abort(self) -> None:
        """Wake every thread waiting to place a piece: the result will not be finished."""
        with self._state:
            self._failed = True
            self._state.notify_all()

    def _drain(self) -> None:
        with self._state:
            for k in range(len(self.layout)):
                self._take_held(k)  # a shard of empty tensors only: its header
                if self._held[k] or self._frontier[k] != self.sizes[k]:
                    raise ValueError(f"{self.files[k]} is incomplete: bytes {self._frontier[k]} on are missing")
                if self._buffers[k] is not None:
                    self._submit(k)
        for write in self._pending:
            write.result()
        self._pending = []
        for k, size in enumerate(self.sizes):
            os.ftruncate(self._fds[k], size)  # the last block's padding

    def _file_sha256(self) -> list[str | None]:
        return [total.hexdigest() for total in self._file_sums]

    def close(self) -> None:
        self.abort()
        super().close()
        for k, fd in enumerate(self._direct):
            if fd is not None:
                os.close(fd)
                self._direct[k] = None


def _reserve(fd: int, size: int) -> None:
    """The file's space, allocated now where the system can (not macOS: the writes claim it as they go)."""
    if size and hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)


_ALIGN = 4096  # what O_DIRECT asks of offsets, lengths and memory, on every device Linux supports


def _open_direct(path: Path) -> int | None:
    """A second descriptor of `path` that writes past the page cache, where the system offers one."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:  # tmpfs and others refuse it
        return None


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    written = 0
    while written < data.nbytes:  # pwrite may write less than asked
        written += os.pwrite(fd, data[written:], at + written)


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
