"""Launched jobs: running an op's rule in a separate process, possibly under a launcher.

An op whose class says `launchable = True` is built by a worker process (`python -m
recipec.backends.worker SPEC`), so that it can run under `accelerate launch`, `torchrun` or `srun python`
(`recipec run --launch "accelerate launch --num_processes 2"`: the prefix is followed by `-m
recipec.backends.worker SPEC`, which every such launcher accepts). The driver and the worker talk through
files in `<work dir>/.recipec-launch/`, so nothing but a path crosses the process boundary:

- `spec.json`: what the job is (op, label, params, input directories and digests, out and work
  directories, threads, the rule's module and function) for people and tools, and the exact node and
  input objects for the worker;
- `progress.jsonl`: one `{"done", "total", "unit"}` line per progress report, tailed by the driver;
- `result.json`: the digest the rule returned, its warnings and non-finite count, written on success;
- `failure.json`: the code, message and hint of a `RunFailure` (or of an unexpected error), so that the
  driver reports it at the op's span like any in-process failure.

Ctrl-C in the driver stops the worker (SIGINT, then SIGKILL if it lingers). A driver killed outright
(SIGKILL) cannot: its direct child gets Linux's parent-death signal, and every worker, however deep
under a launcher, watches the driver (`RECIPEC_DRIVER`: its pid and start time) and kills itself when
the driver is gone. Each worker holds a shared lock on the work directory, which the next driver takes
exclusively before it launches: a new attempt never starts beside the workers of a killed one, so a
killed run never leaves a job writing behind it. The control folder is removed when the job ends; the
work directory around it is the rule's.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..store.atomic import death_signal, pid_exists
from ..store.locks import NO_LOCKS
from . import rule_module
from .job import Job, RunFailure, RunWarning

CONTROL = ".recipec-launch"
WORKER_MODULE = "recipec.backends.worker"
STOP_GRACE_SECONDS = 10.0
POLL_SECONDS = 0.1
DRIVER_VARIABLE = "RECIPEC_DRIVER"  # the driver's process_identity, for its workers to watch


def control_dir(work: Path) -> Path:
    return work / CONTROL


def write_spec(job: Job) -> Path:
    """The job as JSON, in a fresh control folder inside its work directory."""
    control = control_dir(job.work)
    shutil.rmtree(control, ignore_errors=True)  # a previous attempt's messages are not this one's
    control.mkdir(parents=True)
    spec = {
        "format": 1, "op": job.node.op, "label": job.node.label, "params": job.node.params,
        "inputs": [{"path": str(a.path), "digest": a.digest} if a is not None else None for a in job.inputs],
        "out": str(job.out), "work": str(job.work), "threads": job.threads,
        "rule": list(rule_module(job.node.op)),  # where the worker imports it from, whoever registered it
        # The node (types, spans) and input artifacts exactly as the driver has them: the worker is the
        # same recipec on the same machine, and the file lies in the cache that only recipec writes.
        "objects": base64.b64encode(pickle.dumps((job.node, job.inputs))).decode("ascii"),
    }
    path = control / "spec.json"
    path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    return path


def command(spec: Path, prefix: list[str]) -> list[str]:
    """The worker's command line: the launcher prefix (or this Python) then `-m worker SPEC`."""
    return [*(prefix or [sys.executable]), "-m", WORKER_MODULE, str(spec)]


def _environment() -> dict[str, str]:
    """The worker imports this very recipec, wherever it was imported from, and knows its driver."""
    package_parent = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    env[DRIVER_VARIABLE] = process_identity(os.getpid())
    return env


def process_identity(pid: int) -> str:
    """`pid` with its start time and where it can be seen from (this boot of this machine, this pid
    namespace; Linux's /proc), so that a pid reused by another process is not taken for the one that
    ended, and a worker elsewhere (another host under srun, another namespace under a container
    launcher) does not take an unrelated process for its driver."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        return f"{pid}:{fields[19]}:{_visibility()}"  # field 22, starttime, counted from the state (field 3)
    except (OSError, IndexError):
        return str(pid)


def _visibility() -> str:
    """This machine's boot and this process's pid namespace: where a pid means the same process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def can_watch(identity: str) -> bool:
    """Whether this process sees the pids the process `identity` describes does (same machine, same pid
    namespace); elsewhere its pid means nothing here."""
    parts = identity.split(":", 2)
    return len(parts) < 3 or parts[2] == _visibility()


def is_running(identity: str) -> bool:
    """Whether the process `process_identity` described is still running (a zombie is not); call only
    where `can_watch` it."""
    pid = int(identity.split(":")[0])
    if not pid_exists(pid):
        return False
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z"):
            return False
    except (OSError, IndexError):
        pass
    return process_identity(pid) == identity or ":" not in identity


def hold_work(work: Path, exclusive: bool, waiting: str | None = None) -> int | None:
    """A lock on the work directory itself (no file is left behind): workers hold it shared while they
    live; a driver takes it exclusively, saying `waiting` if it must wait, before it launches. Returns
    the descriptor that holds it; None where the filesystem locks no directory (NFS), where only the
    workers' watch on their driver remains. A driver creates the directory; a worker finds it, or raises
    FileNotFoundError."""
    if exclusive:
        work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                sys.stderr.write(f"recipec: {waiting}\n")
            fcntl.flock(fd, mode)
    except OSError as err:
        os.close(fd)
        if err.errno in NO_LOCKS | {errno.EBADF}:
            return None
        raise
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Tail:
    """Reads the progress lines a worker appends, from where it last stopped; a line still being
    written (no newline yet) waits for the next read."""

    def __init__(self, path: Path, job: Job):
        self.path, self.job, self.offset = path, job, 0

    def read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            try:
                report = json.loads(line)
                self.job.progress.update(int(report["done"]), report.get("total"), report.get("unit"))
            except (ValueError, KeyError, TypeError):
                continue  # a malformed line is a lost progress report, not a failed job


def run_launched(job: Job, prefix: list[str]) -> str:
    """Build `job` in a worker process and return the digest its rule returned; a failure becomes a
    `RunFailure`, as if the rule had raised it here."""
    held = hold_work(job.work, exclusive=True,
                     waiting=f"waiting for the workers of a stopped run building `{job.node.label}` to end")
    if held is not None:
        os.close(held)
    spec = write_spec(job)
    control = spec.parent
    tail = _Tail(control / "progress.jsonl", job)
    try:
        try:
            child = subprocess.Popen(command(spec, prefix), env=_environment(), preexec_fn=death_signal())
        except OSError as err:
            raise RunFailure("E560", f"cannot start the launched job for `{job.node.label}`: {err}",
                             "check the --launch command: it must accept `-m MODULE ARGS` like python") from None
        try:
            while child.poll() is None:
                tail.read()
                if job.cancelled.is_set():
                    _stop(child)
                time.sleep(POLL_SECONDS)
        except BaseException:  # Ctrl-C, or any error here: the worker must not outlive the build
            _stop(child)
            raise
        tail.read()
        return _outcome(job, control, child.returncode)
    finally:
        shutil.rmtree(control, ignore_errors=True)


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _outcome(job: Job, control: Path, status: int) -> str:
    failures = sorted(control.glob("failure*.json"))  # failure.json from rank 0, failure-rankN.json others
    if failures:
        failure = json.loads(failures[0].read_text(encoding="utf-8"))
        raise RunFailure(failure["code"], failure["message"], failure.get("hint"))
    result_file = control / "result.json"
    if status != 0 or not result_file.is_file():
        how = (f"was killed by signal {-status}" if status < 0 else f"exited with status {status}" if status
               else "ended without writing its result")
        raise RunFailure("E560", f"the launched job for `{job.node.label}` {how}",
                         f"its output is above; checkpoints in {job.work} are kept and the next run resumes "
                         "from them")
    result = json.loads(result_file.read_text(encoding="utf-8"))
    job.warnings.extend(RunWarning(*w) for w in result["warnings"])
    job.nonfinite = result["nonfinite"]
    return result["digest"]
