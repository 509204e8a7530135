"""Versions of everything that can change the bytes recipec writes (read without importing anything)."""

from __future__ import annotations

import sys
from importlib import metadata

from . import __version__


def toolchain_versions() -> dict[str, str]:
    versions = {"recipec": __version__, "python": ".".join(map(str, sys.version_info[:2]))}
    for package in ("torch", "transformers", "safetensors", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions
