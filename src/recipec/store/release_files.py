"""What a release may contain: the data files recipec knows, and never code or references to it.

A release holds weights, their index, configs, tokenizer files and the chat template, plus what recipec
writes itself (card, sums, marker). Code never travels, nor do the config keys that point loaders at
code (`auto_map`), unless the recipe asks for them. The one exception is recipec's own: a model whose shape
needs recipec's classes (`model_type: "recipec_*"`) carries recipec's modeling file, written from recipec's
package, and an `auto_map` naming it, so that it loads with `trust_remote_code=True` where recipec is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import modeling
from .model_dir import INDEX_FILE, TOKENIZER_FILES

WEIGHT_SUFFIX = ".safetensors"
TRAINING_FILES = ("training_metrics.jsonl", "loss_curve.png")  # what a training op keeps beside its model
RELEASE_DATA_FILES = frozenset(("config.json", INDEX_FILE, *TOKENIZER_FILES, *TRAINING_FILES))
CODE_FILES = ("config.json", "tokenizer_config.json")  # the files whose keys may point loaders at code
CODE_KEYS = ("auto_map", "custom_pipelines")


def is_release_file(name: str) -> bool:
    """Whether a file of a model directory belongs in a release."""
    return name in RELEASE_DATA_FILES or (name.endswith(WEIGHT_SUFFIX) and not name.startswith("."))


def is_weight_file(name: str) -> bool:
    """Large files a release may share (read-only) with the cache instead of copying."""
    return name.endswith(WEIGHT_SUFFIX)


def code_references_of(model_dir: Path | None) -> list[tuple[str, list[str]]]:
    """(file, keys) for each config file of a model directory that points loaders at code."""
    found = []
    for name in CODE_FILES if model_dir is not None else ():
        try:
            data = json.loads((model_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and code_references(data):
            found.append((name, code_references(data)))
    return found


def code_references(data: dict) -> list[str]:
    """The keys of a config that point loaders at code."""
    return [key for key in CODE_KEYS if key in data]


def without_code_references(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in CODE_KEYS}


def with_recipec_code(data: dict) -> dict:
    """A config without code references of its own; a recipec_* config then names recipec's modeling file."""
    clean = without_code_references(data)
    return clean | {"auto_map": modeling.auto_map(clean)} if modeling.is_recipec_config(clean) else clean


def recipec_code_file(config: dict) -> tuple[str, bytes] | None:
    """(file name, bytes) of recipec's own modeling file, for a release of a recipec_* model; else None."""
    return (modeling.MODELING_FILE, modeling.modeling_source()) if modeling.is_recipec_config(config) else None
