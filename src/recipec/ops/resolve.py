"""What an input op (`builds = False`) is given to resolve a node into an artifact at run time.

The engine makes one `ResolveContext` per run; an op's `resolve` hook turns its node into a
`Resolved`: the artifact, and what the lockfile records about where it came from. Failures are
`ArtifactError`s, reported by the engine at the node's span.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..artifacts import Artifact
from ..store.cache import Cache


@dataclass
class ResolveContext:
    recipe: Path  # the recipe file: lock entries name paths relative to its directory
    cache: Cache
    threads: int
    hash_files: bool  # read every input file for its sha256, as `recipec lock` does
    hub_snapshots: dict[tuple[str, str | None], tuple[Path, str]] = field(default_factory=dict)
    convert_pickle: Callable[[Path], Path] | None = None  # pickled weights -> a cache object's directory

    def relative(self, path: Path) -> str:
        """A path as the lock records it: relative to the recipe, so the lock moves with the project."""
        return os.path.relpath(path, self.recipe.resolve().parent)


@dataclass
class Resolved:
    artifact: Artifact
    record: dict[str, Any] = field(default_factory=dict)  # what the lock says it resolved to
