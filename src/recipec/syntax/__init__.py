"""Syntax: recipe text to an AST with spans. Knows nothing of ops, types or torch."""

from .parser import parse, parse_file

__all__ = ["parse", "parse_file"]
