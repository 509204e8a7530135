"""Versions of everything that can change the bytes recipec writes (read without importing anything).

A package's version comes from its installed metadata (importlib.metadata), so asking for the version
of torch or accelerate never imports it. Each op lists the packages its bytes depend on (`Op.toolchain`);
its cache key holds exactly those.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from functools import lru_cache
from importlib import metadata

from . import __version__

# What the lockfile records besides the ops' own packages: the packages most results depend on.
LOCKED_PACKAGES = ("torch", "transformers", "safetensors", "numpy")


@lru_cache(maxsize=None)
def package_version(package: str) -> str:
    """The installed version of `package` ("absent" when it is not installed); `recipec` and `python` too."""
    if package == "recipec":
        return __version__
    if package == "python":
        return ".".join(map(str, sys.version_info[:2]))
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def toolchain_versions(packages: Iterable[str] = LOCKED_PACKAGES) -> dict[str, str]:
    """recipec's and Python's versions and those of `packages`, by name."""
    return {package: package_version(package) for package in ("recipec", "python", *packages)}
