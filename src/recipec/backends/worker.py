"""The worker process of a launched job: `python -m recipec.backends.worker SPEC`.

It runs the op's rule on the job that `launch.py` described in SPEC and answers through files beside
it: progress lines, then the result or the failure (see launch.py). Under a multi-process launcher
(`accelerate launch`, `torchrun`) every process runs the rule; only rank 0 reports progress and the
result, while any rank's failure is written (rank 0's first), so the driver names the real cause.
Every worker holds the work directory's lock while it lives and ends itself when its driver is gone.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from ..store.atomic import write_bytes_atomic
from . import rule_at
from .job import Job, Meter, RunFailure
from .launch import DRIVER_VARIABLE, can_watch, hold_work, is_running

DRIVER_POLL_SECONDS = 0.5


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _write_json(path: Path, data: dict) -> None:
    write_bytes_atomic(path, json.dumps(data).encode("utf-8"))


def _progress_writer(path: Path):
    """A meter sink that appends each report as one JSON line (a line is written whole, so the driver
    reads complete lines only)."""
    handle = open(path, "a", encoding="utf-8", buffering=1)

    def report(meter: Meter) -> None:
        handle.write(json.dumps({"done": meter.done, "total": meter.total, "unit": meter.unit}) + "\n")

    return report


def _watch(driver: str) -> None:
    """End this process when the driver that launched it is gone (killed outright, it could not say
    so): its checkpoints are written whole, and the next run resumes from them."""
    while is_running(driver):
        time.sleep(DRIVER_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)


def run(spec_path: Path) -> int:
    control = spec_path.parent
    try:
        hold_work(control.parent, exclusive=False)  # held until this process ends, however it ends
    except FileNotFoundError:  # its job is over (committed, or cleaned away): nothing to do
        return 1
    driver = os.environ.get(DRIVER_VARIABLE)
    watched = driver is not None and can_watch(driver)  # not from another host or pid namespace
    if watched and not is_running(driver):  # started after its driver was killed: another run may be here
        return 1
    if watched:
        threading.Thread(target=_watch, args=(driver,), daemon=True, name="recipec-driver-watch").start()
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    node, inputs = pickle.loads(base64.b64decode(spec["objects"]))
    rank = _rank()
    meter = Meter(node.label, unit="bytes")
    if rank == 0:
        meter.sink = _progress_writer(control / "progress.jsonl")
    job = Job(node, inputs, Path(spec["out"]), Path(spec["work"]), spec["threads"], progress=meter)
    failure_file = control / ("failure.json" if rank == 0 else f"failure-rank{rank}.json")
    try:
        digest = rule_at(*spec["rule"])(job)
    except RunFailure as err:
        _write_json(failure_file, {"code": err.code, "message": err.message, "hint": err.hint})
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a bug in the rule: reported as one, at the op's span
        if os.environ.get("RECIPEC_DEBUG"):
            traceback.print_exc()
        _write_json(failure_file, {
            "code": "E561", "message": f"internal error in the launched job for `{node.label}`: "
                                       f"{type(err).__name__}: {err}",
            "hint": "this is a bug in recipec or the op's rule; rerun with RECIPEC_DEBUG=1 for a traceback"})
        return 1
    if rank == 0:
        _write_json(control / "result.json", {
            "digest": digest, "nonfinite": job.nonfinite,
            "warnings": [[w.code, w.message, w.hint] for w in job.warnings]})
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
