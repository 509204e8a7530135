"""The ordered writer (store/tensors.py): a result written front to back past the page cache must be the
same files, byte for byte, with the same SHA-256 and content digest, as the plain writer makes, whatever
the threads, the held budget, the buffer size and whether the system takes O_DIRECT."""

from __future__ import annotations

import errno
import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from helpers import run_cli
from recipec.dtypes import TensorSpec
from recipec.store import tensors
from recipec.store.filehash import hash_file
from recipec.store.tensors import ModelWriter, OrderedModelWriter

# Odd sizes, empty tensors, several shards; one tensor larger than a write buffer and than the held budget.
SPECS = [TensorSpec(f"t{i:02d}", "F32", (0,) if i % 7 == 0 else (i + 1, 33)) for i in range(24)]
SPECS.append(TensorSpec("z_big", "BF16", (3001, 7)))


def _values(t: TensorSpec) -> torch.Tensor:
    n = 1
    for d in t.shape:
        n *= d
    return (torch.arange(n, dtype=torch.float32) * (len(t.name) + 0.25)).to(tensors.TORCH_DTYPES[t.dtype])


def _write(writer: ModelWriter, threads: int) -> str:
    """Every tensor in pieces, on `threads` threads taking tensors in file order, as stream_tensors does."""
    by_name = {t.name: t for t in SPECS}

    def one(name: str) -> None:
        for piece in _values(by_name[name]).split(97):
            writer.write(name, piece)

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, [n for n in writer.file_order() if by_name[n].nbytes]))
        return writer.finish()
    finally:
        writer.close()


def _files(directory: Path, writer: ModelWriter) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in writer.files}


@pytest.mark.parametrize("threads, held, buffer", [(1, 0, 4096), (3, 0, 4096), (3, 1 << 12, 8192), (4, 1 << 20, 1 << 20)])
def test_the_ordered_writer_writes_what_the_plain_one_does(tmp_path, monkeypatch, threads, held, buffer):
    (tmp_path / "plain").mkdir()
    plain = ModelWriter(tmp_path / "plain", SPECS, shard_size=6_000)
    expected_digest = _write(plain, 2)
    expected = _files(tmp_path / "plain", plain)
    assert len(expected) > 2

    (tmp_path / "ordered").mkdir()
    ordered = OrderedModelWriter(tmp_path / "ordered", SPECS, 6_000, threads, held, buffer, writers=2)
    assert _write(ordered, threads) == expected_digest
    assert _files(tmp_path / "ordered", ordered) == expected
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in expected.items()}
    monkeypatch.setattr(hashlib, "sha256", None)  # remembered from the writing: nothing is read back
    assert {name: hash_file(tmp_path / "ordered" / name) for name in ordered.files} == sums


def test_without_o_direct_or_when_it_is_refused_the_page_cache_takes_the_same_bytes(tmp_path, monkeypatch):
    (tmp_path / "plain").mkdir()
    plain = ModelWriter(tmp_path / "plain", SPECS, shard_size=6_000)
    _write(plain, 1)
    expected = _files(tmp_path / "plain", plain)

    monkeypatch.setattr(tensors, "_open_direct", lambda path: None)  # macOS, tmpfs
    (tmp_path / "none").mkdir()
    writer = OrderedModelWriter(tmp_path / "none", SPECS, 6_000, 2, 1 << 12, 8192, 1)
    _write(writer, 2)
    assert _files(tmp_path / "none", writer) == expected

    monkeypatch.undo()
    (tmp_path / "refused").mkdir()
    writer = OrderedModelWriter(tmp_path / "refused", SPECS, 6_000, 2, 1 << 12, 8192, 1)
    direct = {fd for fd in writer._direct if fd is not None}
    with_direct = [k for k, fd in enumerate(writer._direct) if fd is not None]
    real = tensors._pwrite_all

    def refuse(fd, data, at):
        if fd in direct:
            raise OSError(errno.EINVAL, "Invalid argument")  # as a filesystem without O_DIRECT writes says
        real(fd, data, at)

    monkeypatch.setattr(tensors, "_pwrite_all", refuse)
    _write(writer, 2)
    assert _files(tmp_path / "refused", writer) == expected
    assert all(writer._refused[k] for k in with_direct)


def test_a_thread_waiting_for_the_frontier_is_woken_when_the_result_is_abandoned(tmp_path):
    writer = OrderedModelWriter(tmp_path, SPECS, 6_000, 2, 0, 4096, 1)
    later = next(t for t in SPECS[2:] if t.nbytes)
    failed: list[BaseException] = []

    def write_ahead() -> None:
        try:
            writer.write(later.name, _values(later))  # not at the frontier, and nothing may be held
        except OSError as err:
            failed.append(err)

    thread = threading.Thread(target=write_ahead)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive()  # waiting for the frontier
    writer.abort()
    thread.join(5)
    assert not thread.is_alive() and failed
    writer.close()


@pytest.mark.parametrize("read_again", [False, True])
def test_a_combine_that_a_later_node_reads_stays_in_the_page_cache(tmp_path, capsys, monkeypatch, read_again):
    """A result that only is exported goes past the page cache; one the next node reads does not."""
    from recipec.backends import arithmetic

    recipe = tmp_path / "r.rcp"
    recipe.write_text('recipec 1\na = init("llama", size="tiny", seed=1)\nb = init("llama", size="tiny", seed=2)\n'
                      'm = a + 0.5*(b - a)\nexport m to "out/m"\n'
                      + ('export drop_layers(m, keep=1) to "out/d"\n' if read_again else ""))
    made: list[Path] = []

    class Recording(OrderedModelWriter):
        def __init__(self, directory, *args):
            made.append(directory)
            super().__init__(directory, *args)

    monkeypatch.setattr(arithmetic, "OrderedModelWriter", Recording)
    status, _, err = run_cli(["run", str(recipe)], capsys)
    assert status == 0, err
    assert len(made) == (0 if read_again else 1)
    out = tmp_path / "out" / "m"
    assert (out / "SHA256SUMS").read_text().count(".safetensors") == 1
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("ordered", [False, True])
def test_a_writer_that_cannot_reserve_a_shard_closes_every_file_it_opened(tmp_path, monkeypatch, ordered):
    # A full disk at the second shard: the first shard's descriptor would keep its space allocated after
    # the failed build's folder is deleted, until the process ends.
    import os

    specs = [TensorSpec(f"t{i}", "F32", (1024,)) for i in range(4)]
    reserve = tensors._reserve
    calls = []

    def full(fd, size):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        reserve(fd, size)

    monkeypatch.setattr(tensors, "_reserve", full)
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(3):
        calls.clear()
        with pytest.raises(OSError, match="No space left"):
            if ordered:
                OrderedModelWriter(tmp_path, specs, 8192, 2, 1 << 20, 1 << 20, 1)
            else:
                ModelWriter(tmp_path, specs, 8192)
    assert set(os.listdir("/proc/self/fd")) == before
