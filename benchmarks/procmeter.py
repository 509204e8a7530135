"""Measure a command's wall time and peak memory, its child processes included.

Used for both sides of the merge benchmark (mergekit and recipec), so they are
measured the same way.

Why anonymous memory: a merge that reads its inputs through mmap (safetensors
does) shows those pages as file-backed RSS, which the kernel can drop at any
time and which says little about what the merge needs. ``RssAnon`` is the
memory the process actually allocated (tensors, buffers, heap); it is the
number a machine without spare RAM cares about.

A sampler thread reads ``/proc/<pid>/status`` of the whole process tree every
~20 ms and keeps the largest sum seen. Short spikes between samples can be
missed, so two kernel-tracked peaks are reported too: ``VmHWM`` (peak total
RSS, per process, summed over the tree) and ``ru_maxrss`` from ``wait4``.
The tree itself is found by scanning all of /proc, a few milliseconds of CPU,
so only every ~0.5 s: scanning at every sample took a fifth of a core from
the process being timed, which a 2-core machine shows in its wall time.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

POLL_SECONDS = 0.02
TREE_SECONDS = 0.5  # how often the process tree is looked for again (new children)
STATUS_FIELDS = ("RssAnon", "VmRSS", "VmHWM")


def read_status(pid: int) -> dict[str, int] | None:
    """The memory fields of /proc/<pid>/status in bytes; None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            out[key] = int(value.split()[0]) * 1024  # the kernel reports kB
    return out


def _parent_map() -> dict[int, int]:
    """pid -> ppid for every process. /proc/<pid>/task/*/children is not built into every kernel."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces or parentheses: split after its last ')'.
        parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    return parents


def process_tree(root: int) -> list[int]:
    """root and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parent_map().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


@dataclass
class _Peaks:
    """Largest values seen so far, updated by the sampler thread."""

    anon: int = 0
    rss: int = 0
    hwm: dict[int, int] = field(default_factory=dict)  # per pid: VmHWM only grows
    samples: int = 0

    def sample(self, tree: list[int]) -> None:
        anon = rss = 0
        for pid in tree:
            st = read_status(pid)
            if not st:
                continue
            anon += st.get("RssAnon", 0)
            rss += st.get("VmRSS", 0)
            self.hwm[pid] = max(self.hwm.get(pid, 0), st.get("VmHWM", 0))
        self.anon = max(self.anon, anon)
        self.rss = max(self.rss, rss)
        self.samples += 1


def _sampler(root: int, peaks: _Peaks, stop: threading.Event) -> None:
    tree, found = [root], 0.0
    while not stop.is_set():
        if time.monotonic() - found >= TREE_SECONDS:
            tree, found = process_tree(root), time.monotonic()
        peaks.sample(tree)
        stop.wait(POLL_SECONDS)


def measure_process(cmd: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None) -> dict:
    """Run ``cmd`` to completion; return its time, peak memory and exit status.

    Keys: ``seconds`` (wall), ``peak_anon_bytes`` (largest sampled sum of
    RssAnon over the tree), ``peak_rss_bytes`` (same for VmRSS),
    ``vmhwm_bytes`` (sum of each process's kernel-tracked VmHWM),
    ``ru_maxrss_bytes`` (wait4's peak RSS of the child), ``cpu_seconds``
    (user + system time of the child and the descendants it waited for), ``samples``,
    ``returncode`` and ``output_tail`` (last 4000 characters of stdout+stderr).
    """
    with tempfile.TemporaryFile(mode="w+b") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        peaks, stop = _Peaks(), threading.Event()
        thread = threading.Thread(target=_sampler, args=(proc.pid, peaks, stop), daemon=True)
        thread.start()
        # wait4 rather than proc.wait(): it also hands back the child's rusage.
        _, status, rusage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        stop.set()
        thread.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read().decode(errors="replace")[-4000:]
    return {
        "seconds": seconds,
        "peak_anon_bytes": peaks.anon,
        "peak_rss_bytes": peaks.rss,
        "vmhwm_bytes": sum(peaks.hwm.values()),
        "ru_maxrss_bytes": rusage.ru_maxrss * 1024,  # Linux reports kB
        # CPU time barely moves when other work shares the cores; wall time does.
        "cpu_seconds": rusage.ru_utime + rusage.ru_stime,
        "samples": peaks.samples,
        "returncode": proc.returncode,
        "output_tail": tail,
    }
