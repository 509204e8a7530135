"""Checking: lowering parsed recipes into the typed op graph (names, `use`, affine folding, argument
binding against the op registry), with every error of a phase collected. Sits above `ops` and `ir`."""

from .lower import Program, lower_file

__all__ = ["Program", "lower_file"]
