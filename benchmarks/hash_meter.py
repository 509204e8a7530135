"""Run recipec's command line with every hash it computes timed: how long a run spends hashing, and on what.

Usage: python benchmarks/hash_meter.py REPORT.json run [recipec arguments...]

SHA-256 (`hashlib.sha256`) and BLAKE3 (`blake3.blake3`, when installed) are replaced, before recipec is
imported, by wrappers that time each call that hashes (`update`, `update_mmap`, or data given to the
constructor) on its thread's CPU clock and on the wall clock. REPORT.json gets, per algorithm: bytes
hashed, calls, CPU seconds, and wall seconds during which at least one thread was hashing (the union of
the calls' intervals, so two threads hashing at once count once). Works the same on a recipec that hashes
with SHA-256 only, so the numbers compare across versions. A wrapper costs a few microseconds per call;
recipec's calls hash a tensor or a chunk of megabytes each. Large input models that recipec hashes in a
worker process are counted too: each request's wall time, its bytes and the worker's CPU time.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path


class _Meter:
    """Per algorithm: bytes, calls, CPU seconds and the wall-clock intervals of hashing calls."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.totals: dict[str, dict] = {}

    def timed(self, algorithm: str, nbytes: int, call, cpu_clock=time.thread_time, hashed=lambda result: True):
        """Call `call`, counting `nbytes` hashed, the CPU time of `cpu_clock` and the wall time it took,
        unless `hashed(result)` says it hashed nothing (its caller then hashes elsewhere, and is counted there)."""
        cpu, wall = cpu_clock(), time.perf_counter()
        result = call()
        cpu, end = cpu_clock() - cpu, time.perf_counter()
        if hashed(result):
            with self.lock:
                entry = self.totals.setdefault(algorithm, {"bytes": 0, "calls": 0, "cpu_seconds": 0.0, "spans": []})
                entry["bytes"] += nbytes
                entry["calls"] += 1
                entry["cpu_seconds"] += cpu
                entry["spans"].append((wall, end))
        return result

    def report(self) -> dict:
        return {name: {"bytes": t["bytes"], "calls": t["calls"], "cpu_seconds": t["cpu_seconds"],
                       "wall_seconds": union_seconds(t["spans"])} for name, t in self.totals.items()}


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of [start, end] intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _size(data) -> int:
    return memoryview(data).nbytes


def metered(meter: _Meter, algorithm: str, make):
    """A stand-in for the hasher constructor `make` whose hashing calls are timed."""

    class Hasher:
        def __init__(self, data=None, **options):
            self._inner = make(**options)
            if data is not None:
                self.update(data)

        def update(self, data):
            return meter.timed(algorithm, _size(data), lambda: self._inner.update(data))

        def update_mmap(self, path, **options):
            nbytes = os.stat(path).st_size
            return meter.timed(algorithm, nbytes, lambda: self._inner.update_mmap(path, **options))

        def __getattr__(self, name):  # digest, hexdigest, copy, ...: untimed, they hash nothing large
            return getattr(self._inner, name)

    return Hasher


def install(meter: _Meter) -> None:
    """Replace the hashers recipec uses, before it is imported."""
    hashlib.sha256 = metered(meter, "sha256", hashlib.sha256)
    try:
        import blake3
    except ImportError:  # a recipec from before BLAKE3
        return
    blake3.blake3 = metered(meter, "blake3", blake3.blake3)


def worker_cpu_seconds(worker) -> float:
    """User plus system CPU seconds of the hashing process, from /proc (Linux, as the benchmarks are); 0 once
    it has ended."""
    try:
        fields = Path(f"/proc/{worker.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def install_worker_meter(meter: _Meter) -> None:
    """Time what recipec hands to its hashing process (store/hash_process.py), where the wrappers above do
    not reach: each request's wall time from this side, its bytes, and the worker's CPU from /proc."""
    try:
        from recipec.store import hash_process
    except ImportError:  # a recipec that hashes in its own process only
        return
    ask = hash_process._Worker.digest

    def timed_ask(worker, files, threads):
        return meter.timed(CONTENT_ALGORITHM, files.nbytes, lambda: ask(worker, files, threads),
                           cpu_clock=lambda: worker_cpu_seconds(worker), hashed=lambda digest: digest is not None)

    hash_process._Worker.digest = timed_ask


CONTENT_ALGORITHM = "blake3"


def main() -> int:
    report, argv = Path(sys.argv[1]), sys.argv[2:]
    meter = _Meter()
    install(meter)
    install_worker_meter(meter)
    from recipec.cli import entry  # as the `recipec` command runs, exit included

    sys.argv = ["recipec", *argv]
    try:
        entry()
    finally:
        report.write_text(json.dumps(meter.report(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
