"""Test isolation: no network, no user caches. Every test sees an empty recipec cache and hub cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("RECIPEC_CACHE", str(root / "recipec"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    return root


@pytest.fixture
def one_torch_thread():
    """One torch thread: fast on a shared CPU, and the same reductions in every process of a test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
