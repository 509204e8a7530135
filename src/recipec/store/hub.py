"""Find hub models in the local Hugging Face cache, without importing huggingface_hub or touching the network.

`check` and `plan` must never download; they look in the cache layout huggingface_hub writes
(`models--org--name/refs/<rev>` → `snapshots/<commit>/`). A model not found there is "unknown until
locked": `recipec lock` or `run` resolve it through huggingface_hub itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}(/[A-Za-z0-9_.\-]{1,96})?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_hub_id(text: str) -> bool:
    """Whether a string is shaped like a hub repository id (`org/name` or `name`)."""
    return bool(_HUB_ID.match(text)) and ".." not in text and "--" not in text and not text.endswith(".")


def cache_dir() -> Path:
    """huggingface_hub's cache directory, honouring the same environment variables it does."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str, revision: str | None = None) -> tuple[Path, str] | None:
    """(snapshot directory, commit) of a cached model at a revision, or None when it is not cached."""
    repo = cache_dir() / ("models--" + repo_id.replace("/", "--"))
    revision = revision or "main"
    if _COMMIT.match(revision):
        commit = revision
    else:
        ref = repo / "refs" / revision
        try:
            commit = ref.read_text(encoding="utf-8").strip()
        except OSError:
            return None
    snapshot = repo / "snapshots" / commit
    return (snapshot, commit) if (snapshot / "config.json").is_file() else None
