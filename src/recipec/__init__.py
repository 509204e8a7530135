"""recipec: a declarative model-recipe compiler.

A recipe says how a model is made from other models and data; recipec parses it into a typed op graph,
plans its cost without reading a weight, and runs it reproducibly. See README.md for the language.
"""

__version__ = "0.1.0"
LANGUAGE_VERSION = 1
