"""recipec: a declarative model-recipe compiler.

A recipe says how a model is made from other models and data; recipec parses it into a typed op graph,
plans its cost without reading a weight, and runs it reproducibly. See README.md for the language.
"""

__version__ = "0.1.0"
LANGUAGE_VERSION = 1

# Models with per-layer shapes or low-rank linears load through recipec's own classes, registered with
# transformers' Auto classes once transformers is imported (recipec itself stays torch-free until then).
from .modeling import install_registration as _install_registration  # noqa: E402

_install_registration()
