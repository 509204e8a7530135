"""Build the peer's own virtual environment: mergekit 0.1.5 on a CPU-only torch.

mergekit is the baseline recipec is benchmarked against. It gets a venv of its
own so that its dependency pins never touch recipec's environment.

Order matters: torch goes in first, from the CPU wheel on local disk
(``/opt/wheels``). Had mergekit been installed first, its bare ``torch>=2.0.0``
requirement would have pulled PyPI's multi-GB CUDA build. mergekit is then
installed under a constraints file that pins the torch already present, so no
dependency can swap it.

mergekit 0.1.5 itself requires ``transformers>=5.0,<6.0``, so it runs on the
same transformers 5.x line as recipec: no older transformers is pinned.

Usage::

    python benchmarks/peer_env.py [VENV_DIR]
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

# The local version label makes the pin unsatisfiable by PyPI (which only has
# the CUDA build under plain 2.13.0): pip takes the CPU wheel from disk or fails
# at once, instead of downloading GBs of CUDA torch when the wheel is missing or
# does not fit this Python (it is cp311).
TORCH_PIN = "torch==2.13.0+cpu"
MERGEKIT_PIN = "mergekit==0.1.5"
# Where this machine keeps the CPU torch wheel; pip's config usually names it
# already, passing it again keeps this working with a bare pip config.
LOCAL_WHEELS = Path("/opt/wheels")
DEFAULT_VENV = Path(__file__).resolve().parent / ".peer-venv"
# Written last, so a half-finished install is never mistaken for a good one.
MARKER = "recipec-peer-ok"


def venv_python(path: Path) -> Path:
    """The interpreter inside the venv at ``path``."""
    return path / "bin" / "python"


def _run(cmd: list[str]) -> str:
    """Run a command, failing loudly with its output if it fails."""
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(
            f"command failed ({res.returncode}): {' '.join(cmd)}\n"
            f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
        )
    return res.stdout


def _pip(python: Path, *args: str) -> None:
    """pip install into the venv, with the local wheel folder as a source."""
    links = ["--find-links", str(LOCAL_WHEELS)] if LOCAL_WHEELS.is_dir() else []
    _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", *links, *args])


def _torch_version(python: Path) -> tuple[str, str | None]:
    """(torch.__version__, torch.version.cuda) as seen inside the venv."""
    out = _run([str(python), "-c", "import torch; print(torch.__version__); print(torch.version.cuda)"])
    version, cuda = out.split()
    return version, (None if cuda == "None" else cuda)


def _check_cpu_torch(python: Path) -> str:
    """Refuse a CUDA build: it is GBs larger and not what the benchmark measures."""
    version, cuda = _torch_version(python)
    if cuda is not None or version != "2.13.0+cpu":
        raise RuntimeError(f"peer venv got torch {version} (cuda={cuda}); want 2.13.0 CPU build")
    return version


def is_working(path: Path) -> bool:
    """True when the venv was completed before and mergekit still starts."""
    python = venv_python(path)
    if not (path / MARKER).is_file() or not python.exists():
        return False
    try:
        _check_cpu_torch(python)
        _run([str(path / "bin" / "mergekit-yaml"), "--help"])
    except (RuntimeError, OSError, ValueError):
        return False
    return True


def ensure_mergekit_venv(path: Path = DEFAULT_VENV) -> Path:
    """Create (or reuse) a venv with CPU torch 2.13.0 and mergekit 0.1.5.

    Returns the venv's python. Idempotent: a venv that already passes
    ``is_working`` is left untouched.
    """
    path = Path(path).resolve()
    if is_working(path):
        return venv_python(path)
    # clear=True: a broken earlier attempt must not leak packages into this one.
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    python = venv_python(path)
    _pip(python, TORCH_PIN)
    torch_version = _check_cpu_torch(python)
    constraints = path / "peer-constraints.txt"
    constraints.write_text(f"torch=={torch_version}\n")
    _pip(python, "-c", str(constraints), MERGEKIT_PIN)
    _check_cpu_torch(python)  # still the same torch after mergekit's deps
    _run([str(path / "bin" / "mergekit-yaml"), "--help"])
    (path / MARKER).write_text(_run([str(python), "-m", "pip", "freeze"]))
    return python


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_VENV
    print(ensure_mergekit_venv(target))
