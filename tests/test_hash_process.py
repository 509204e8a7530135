"""Large input models are hashed in a worker process (so the hashing never waits for the GIL that a
torch import holds): the same digest as in process, and in process again whenever the worker fails."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers import tiny_llama, write_model
from recipec.arch import preset_config
from recipec.store import hash_process
from recipec.store.digests import hash_weights
from recipec.store.model_dir import read_model_dir


@pytest.fixture
def worker(monkeypatch):
    """Every model counts as large; a worker of this test's own, closed at its end."""
    monkeypatch.setattr(hash_process, "OUT_OF_PROCESS_BYTES", 0)
    monkeypatch.setattr(hash_process, "_worker", None)
    monkeypatch.setattr(hash_process, "_worker_unavailable", False)
    yield
    if hash_process._worker is not None:
        hash_process._worker.close()


def flip_a_weight_byte(root: Path) -> None:
    shard = sorted(root.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("shards", [1, 3])
def test_the_worker_digests_a_model_as_this_process_does(worker, tmp_path, shards):
    root = write_model(tmp_path / "m", preset_config("llama", "tiny"), shards=shards)
    files = read_model_dir(root)
    before = hash_process.weights_digest(files, threads=2)
    assert before == hash_weights(files, threads=1)
    assert hash_process._worker.process.poll() is None  # it was the worker, and it waits for the next model

    flip_a_weight_byte(root)
    after = hash_process.weights_digest(read_model_dir(root), threads=2)
    assert after == hash_weights(read_model_dir(root), threads=1) != before


def test_a_worker_that_cannot_run_leaves_the_hashing_to_this_process(worker, tmp_path, monkeypatch):
    files = read_model_dir(tiny_llama(tmp_path / "m"))
    expected = hash_weights(files, threads=1)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # starts, reads nothing, exits
    assert hash_process.weights_digest(files, threads=2) == expected
    assert hash_process._worker.failed  # and is not asked again
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python-here"))  # cannot start at all
    hash_process._worker = None
    assert hash_process.weights_digest(files, threads=2) == expected


def test_a_model_the_worker_cannot_read_is_reported_by_this_process(worker, tmp_path):
    root = tiny_llama(tmp_path / "m")
    files = read_model_dir(root)
    (root / "model.safetensors").unlink()  # gone between reading the header and hashing
    with pytest.raises(OSError):
        hash_process.weights_digest(files, threads=2)
    assert hash_process._worker.process.poll() is None  # the worker answered, and still serves


class Answering:
    """A stand-in for the worker's output: `readline` gives `line`, or raises what it is given."""

    def __init__(self, line):
        self.line = line

    def readline(self):
        if isinstance(self.line, BaseException):
            raise self.line
        return self.line


def test_an_interrupted_request_retires_the_worker(worker, tmp_path):
    # Its answer, arriving late, must never be read as the answer to the next model's request.
    files = read_model_dir(tiny_llama(tmp_path / "m"))
    expected = hash_weights(files, threads=1)
    assert hash_process.weights_digest(files, threads=1) == expected
    running = hash_process._worker
    running.process.stdout = Answering(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        hash_process.weights_digest(files, threads=1)
    assert running.failed and running.process.wait(timeout=10) != 0  # killed
    assert hash_process.weights_digest(files, threads=1) == expected  # in this process from now on


def test_an_answer_for_another_directory_is_not_taken(worker, tmp_path):
    files = read_model_dir(tiny_llama(tmp_path / "m"))
    hash_process.weights_digest(files, threads=1)
    running = hash_process._worker
    running.process.stdout = Answering('{"root": "/elsewhere", "digest": "blake3:00"}\n')
    assert hash_process.weights_digest(files, threads=1) == hash_weights(files, threads=1)
    assert running.failed


def test_the_worker_runs_this_recipec_whatever_lies_in_the_working_directory(worker, tmp_path, monkeypatch):
    shadow = tmp_path / "cwd" / "recipec" / "store"
    shadow.mkdir(parents=True)
    (shadow.parent / "__init__.py").write_text("")
    (shadow / "__init__.py").write_text("")
    (shadow / "hash_process.py").write_text("import sys\ndef _serve():\n    for line in sys.stdin:\n"
                                            "        print('{\"root\": \"x\", \"digest\": \"blake3:shadow\"}', "
                                            "flush=True)\n")
    monkeypatch.chdir(tmp_path / "cwd")
    files = read_model_dir(tiny_llama(tmp_path / "m"))
    assert hash_process.weights_digest(files, threads=1) == hash_weights(files, threads=1)
    assert not hash_process._worker.failed  # the real worker answered


def test_the_worker_ends_when_its_parent_closes_it(worker, tmp_path):
    files = read_model_dir(tiny_llama(tmp_path / "m"))
    hash_process.weights_digest(files, threads=1)
    process = hash_process._worker.process
    hash_process._worker.close()
    assert process.poll() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_worker_dies_with_a_killed_parent_even_in_the_middle_of_a_request(tmp_path):
    # A run killed with SIGKILL: the worker's input closes, but a worker hashing gigabytes would read it only
    # once done. A stopped worker stands for one that is busy: only the parent-death signal reaches it.
    import os
    import signal
    import subprocess
    import time

    src = str(Path(hash_process.__file__).resolve().parents[2])
    parent = ("import sys, time; sys.path.insert(0, sys.argv[1]); from recipec.store import hash_process as h; "
              "print(h._shared_worker().process.pid, flush=True); time.sleep(60)")
    driver = subprocess.Popen([sys.executable, "-c", parent, src], stdout=subprocess.PIPE, text=True)
    worker = int(driver.stdout.readline())
    try:
        time.sleep(1)  # it has booted and asked for the signal
        os.kill(worker, signal.SIGSTOP)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 10
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(worker)
    finally:
        driver.kill()
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for whoever adopted it to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False
