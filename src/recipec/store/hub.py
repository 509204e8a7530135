"""Find hub models in the local Hugging Face cache, without importing huggingface_hub or touching the network.

`check` and `plan` must never download; they look in the cache layout huggingface_hub writes
(`models--org--name/refs/<rev>` → `snapshots/<commit>/`). A model not found there is "unknown until
locked": `recipec lock` or `run` resolve it through huggingface_hub itself (`resolve`).
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


class HubUnavailable(Exception):
    """A hub model that is neither cached nor fetchable now; carries a hint for the user."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message, self.hint = message, hint


def resolve(repo_id: str, revision: str | None, offline: bool) -> tuple[Path, str]:
    """(snapshot directory, commit) of a hub model: from the local cache, or downloaded unless offline."""
    cached = cached_snapshot(repo_id, revision)
    if cached is not None:
        return cached
    if offline:
        raise HubUnavailable(f"{repo_id}@{revision or 'main'} is not in the local hub cache and --offline is set",
                             "run `recipec lock` without --offline once, or download it with `hf download`")
    import huggingface_hub

    try:
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"])
    except Exception as err:  # network, auth, a missing repo: all are an unavailable input, said plainly
        raise HubUnavailable(f"cannot fetch {repo_id}@{revision or 'main'}: {err}",
                             "check the id, the revision and your access to the hub") from None
    snapshot = Path(path)
    return snapshot, snapshot.name
