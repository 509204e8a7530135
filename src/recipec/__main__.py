"""`python -m recipec` runs the command line."""

from .cli import entry

entry()
