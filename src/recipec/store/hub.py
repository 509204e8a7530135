"""Find hub models in the local Hugging Face cache, without importing huggingface_hub or touching the network.

`check` and `plan` must never download; they look in the cache layout huggingface_hub writes
(`models--org--name/refs/<rev>` → `snapshots/<commit>/`). A model not found there has an unknown
signature until it is fetched: `recipec lock` or `run` resolve it through huggingface_hub itself
(`resolve_all`, which reports every model it cannot get, in recipec's words, whatever the offline switch).
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


def fetch_hint(repo_id: str, revision: str | None, recipe: str) -> str:
    """The exact commands that put a hub model into the local cache, for a note or an error."""
    pin = f" --revision {revision}" if revision else ""
    return f"fetch it with `recipec lock {recipe}` while online, or `hf download {repo_id}{pin}`"


def offline_requested(offline: bool) -> bool:
    """--offline, or huggingface_hub's own switch: either way nothing may be downloaded."""
    return offline or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


class HubUnavailable(Exception):
    """A hub model that is neither cached nor fetchable now, said in recipec's words."""

    def __init__(self, repo_id: str, revision: str | None, reason: str):
        self.repo_id, self.revision = repo_id, revision
        self.message = f"hub model {repo_id}@{revision or 'main'} is not in the local Hugging Face cache{reason}"
        super().__init__(self.message)


# huggingface_hub's exceptions, by class name (so this module need not import it), in plain words.
_FETCH_FAILURES = {
    "RepositoryNotFoundError": "the repository does not exist or needs an access token",
    "GatedRepoError": "the repository is gated: accept its terms and log in with `hf auth login`",
    "RevisionNotFoundError": "the revision does not exist",
    "LocalEntryNotFoundError": "the hub could not be reached",
}


def resolve(repo_id: str, revision: str | None, offline: bool) -> tuple[Path, str]:
    """(snapshot directory, commit) of a hub model: from the local cache, or downloaded unless offline."""
    cached = cached_snapshot(repo_id, revision)
    if cached is not None:
        return cached
    if offline_requested(offline):
        raise HubUnavailable(repo_id, revision, " and downloads are off (--offline or HF_HUB_OFFLINE)")
    import huggingface_hub

    try:
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"])
    except Exception as err:  # network, auth, a missing repo: all are an unavailable input, said plainly
        reason = _FETCH_FAILURES.get(type(err).__name__, "the hub could not be reached")
        raise HubUnavailable(repo_id, revision, f" and cannot be fetched: {reason}") from None
    snapshot = Path(path)
    return snapshot, snapshot.name


def resolve_all(models: list[tuple[str, str | None]], offline: bool
                ) -> tuple[dict[tuple[str, str | None], tuple[Path, str]], list[HubUnavailable]]:
    """Resolve every hub model a run needs before building anything, so that all the missing ones
    are reported together: (what resolved, what did not)."""
    resolved, missing = {}, []
    for model in dict.fromkeys(models):
        try:
            resolved[model] = resolve(*model, offline)
        except HubUnavailable as err:
            missing.append(err)
    return resolved, missing
