"""Weight digests taken in a process of their own, so that hashing gigabytes never waits for a GIL.

A cold run hashes its input models while torch imports on another thread (see
`backends.import_torch_in_background`). Both need the interpreter: the import holds the GIL for long
stretches (bytecode, loading its shared libraries), and a hashing thread waits for it after every tensor.
In a process of its own the hashing never waits: on two cores the three 2.2 GB inputs of a 1.1B merge are
hashed, and torch imported, in ≈3.6 s instead of ≈4.2 s. Small models are hashed in this process, since
starting the worker costs ≈0.2 s.

The worker reads one request per line (a model directory and a thread count) and answers one line (the
directory again and the weights' digest, exactly as `hash_weights` computes it, or why it could not). It
ends when its input closes, and on Linux at once when its parent dies (SIGKILL included), so a killed
run leaves no process hashing gigabytes for no one. Whatever goes
wrong with it (it dies, answers for another directory, or its caller is interrupted while it hashes, so
that a late answer could be read for the next request), it is retired and the caller hashes in its own
process from then on, where a problem gets its usual diagnostic.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .atomic import death_signal
from .digests import hash_weights
from .model_dir import ModelFiles, read_model_dir

OUT_OF_PROCESS_BYTES = 1 << 30  # below this, the worker's start costs more than the GIL it spares


class _Worker:
    """One hashing process, started on first use, asked one model at a time."""

    def __init__(self) -> None:
        # -P: nothing from the working directory on the path, and this process's recipec first, so that the
        # worker runs the same code (a `recipec/` or `json.py` where the user stands must not answer).
        package_parent = str(Path(__file__).resolve().parents[2])
        self.process = subprocess.Popen([sys.executable, "-P", "-c", _BOOT, package_parent, str(os.getpid())],
                                        stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lock = threading.Lock()
        self.failed = False

    def digest(self, files: ModelFiles, threads: int) -> str | None:
        """The weights' digest, or None when the worker could not give it (then it is not asked again)."""
        root = str(files.root)
        with self.lock:
            if self.failed:
                return None
            try:
                self.process.stdin.write(json.dumps({"root": root, "threads": threads}) + "\n")
                self.process.stdin.flush()
                answer = json.loads(self.process.stdout.readline())
            except (OSError, ValueError):  # it died, or never ran: hash in this process from now on
                self.failed = True
                return None
            except BaseException:  # interrupted while it hashes: its late answer must never be taken for the next
                self.failed = True
                self.process.kill()
                raise
        if not isinstance(answer, dict) or answer.get("root") != root:
            self.failed = True
            return None
        return answer.get("digest")

    def close(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # still on a request nobody waits for
            self.process.kill()


_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]) if sys.argv[1] not in sys.path else None; "
         "from recipec.store.hash_process import _serve; _serve(int(sys.argv[2]))")
_worker: _Worker | None = None
_worker_unavailable = False
_worker_lock = threading.Lock()


def _shared_worker() -> _Worker | None:
    """This process's worker, started on first use; None when it cannot start."""
    global _worker, _worker_unavailable
    with _worker_lock:
        if _worker is None and not _worker_unavailable:
            try:
                _worker = _Worker()
            except OSError:
                _worker_unavailable = True
                return None
            atexit.register(_worker.close)
        return _worker


def weights_digest(files: ModelFiles, threads: int) -> str:
    """The content digest of a model's weights (`hash_weights`), large ones hashed in the worker process."""
    if files.nbytes >= OUT_OF_PROCESS_BYTES:
        worker = _shared_worker()
        digest = worker.digest(files, threads) if worker is not None else None
        if digest is not None:
            return digest
    return hash_weights(files, threads)


def _serve(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C reaches the whole process group: end quietly
    _die_with(parent)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            answer = {"root": request["root"],
                      "digest": hash_weights(read_model_dir(Path(request["root"])), int(request["threads"]))}
        except Exception as err:  # noqa: BLE001 - the caller hashes again in process and reports it there
            answer = {"error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def _die_with(parent: int) -> None:
    """Be killed when `parent` dies (Linux); if it is already gone, end now. The worker is started from the
    thread that hashes the inputs, the main thread in a run: the signal follows that thread."""
    arm = death_signal()
    if arm is None:  # not Linux: the closed input still ends it after its request
        return
    arm()
    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(0)
