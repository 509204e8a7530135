"""Ops: one module per family. Importing this package registers every op in `base.REGISTRY`."""

from . import analysis, arithmetic, merge, sources  # noqa: F401  (registration happens on import)
from .base import REGISTRY, Op

__all__ = ["REGISTRY", "Op"]
