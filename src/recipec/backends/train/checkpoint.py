"""Checkpoints of a training run in its work directory: written atomically, checked before use.

A checkpoint is a directory `checkpoints/step-NNNNNNNN` holding what accelerate saves (model, optimizer,
scheduler, each process's RNG states), the trainer's own state (step, data position, counters, the
settings it was made with) and, written last, a manifest of every file's size and sha256. It is built
under a temporary name and renamed into place, so a killed run leaves a complete checkpoint or none;
the manifest catches what a rename cannot (a file truncated or damaged afterwards). The newest
`KEEP` checkpoints stay, so a damaged newest one still leaves a good one to resume from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ...store.atomic import TMP_PREFIX, fsync_dir, remove_stale_temporaries
from ...store.filehash import hash_files

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
KEEP = 2


def checkpoint_root(work_dir: Path) -> Path:
    return work_dir / CHECKPOINTS


def _step_dirs(root: Path) -> list[Path]:
    """Checkpoint directories, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def save_checkpoint(accelerator, work_dir: Path, state: dict, threads: int = 2) -> Path:
    """Save the run at `state["step"]` on every process; the main process makes it appear atomically."""
    root = checkpoint_root(work_dir)
    final = root / f"step-{state['step']:08d}"
    building = root / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(building))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (building / TRAINER_STATE).write_text(json.dumps(state, sort_keys=True, indent=1))
        _write_manifest(building, threads)
        if final.exists():  # a damaged checkpoint of the same step, passed over on resume
            shutil.rmtree(final)
        os.replace(building, final)
        fsync_dir(root)
        for old in _step_dirs(root)[KEEP:]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_manifest(directory: Path, threads: int) -> None:
    files = sorted(p for p in directory.iterdir() if p.is_file())
    for path in files:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    hashes = hash_files(files, threads)
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": hashes[p]} for p in files}
    with open(directory / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, sort_keys=True, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(directory)


def checkpoint_problem(directory: Path, threads: int = 2) -> str | None:
    """Why a checkpoint directory cannot be resumed from, or None when every file is as written."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        json.loads((directory / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"no readable manifest or trainer state ({error.__class__.__name__})"
    present = {p.name for p in directory.iterdir() if p.is_file()} - {MANIFEST}
    if missing := sorted(set(manifest) - present):
        return f"missing {', '.join(missing)}"
    for name, entry in sorted(manifest.items()):
        if (size := (directory / name).stat().st_size) != entry["bytes"]:
            return f"{name} has {size} bytes, {entry['bytes']} were written"
    hashes = hash_files([directory / name for name in sorted(manifest)], threads)
    for path, digest in sorted(hashes.items()):
        if digest != manifest[path.name]["sha256"]:
            return f"{path.name} differs from what was written"
    return None


def latest_good_checkpoint(work_dir: Path, threads: int = 2) -> tuple[Path | None, dict | None, list[str]]:
    """The newest checkpoint that checks out, its trainer state, and a notice for each one passed over."""
    notices: list[str] = []
    for directory in _step_dirs(checkpoint_root(work_dir)):
        problem = checkpoint_problem(directory, threads)
        if problem is None:
            state = json.loads((directory / TRAINER_STATE).read_text(encoding="utf-8"))
            return directory, state, notices
        notices.append(f"checkpoint {directory.name} is damaged ({problem}); passed over")
    return None, None, notices


def remove_unfinished(work_dir: Path) -> None:
    """Delete checkpoints a killed run left half-written."""
    remove_stale_temporaries(checkpoint_root(work_dir))
