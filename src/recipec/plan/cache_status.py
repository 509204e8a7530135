"""Which nodes the cache already holds, decided without reading a weight or importing torch.

A node's key needs its inputs' content digests: a built input's digest is in its cache object's
metadata; a model directory's weights digest is remembered by file identity from an earlier run, and its
small data files are hashed. Where a digest is not known, nothing downstream can be known to be cached,
and the plan says "build".
"""

from __future__ import annotations

from pathlib import Path

from ..ir.graph import Graph, Node
from ..ops import REGISTRY
from ..ops.base import cache_key
from ..store.cache import Cache
from ..store.digests import remembered_model_dir_digest
from ..store.hub import cached_snapshot
from ..store.model_dir import ModelDirError, weight_files


def _input_dir(node: Node) -> Path | None:
    if node.op == "load":
        return Path(node.params["path"])
    if node.op == "hf":
        found = cached_snapshot(node.params["id"], node.params.get("revision"))
        return found[0] if found else None
    return None


def cached_keys(graph: Graph, cache: Cache) -> dict[int, str]:
    """Node id -> cache key, for every built node whose result the cache holds."""
    if not cache.objects.is_dir():  # an empty cache holds nothing: skip even looking at the inputs
        return {}
    known = cache.known_digests()
    digests: dict[int, str] = {}
    found: dict[int, str] = {}
    for node in graph.reachable():
        if not REGISTRY[node.op].builds:
            root = _input_dir(node)
            try:
                digest = remembered_model_dir_digest(root, known) if root and weight_files(root) else None
            except (ModelDirError, OSError):
                digest = None
            if digest:
                digests[node.id] = digest
            continue
        if not all(i.id in digests for i in node.inputs):
            continue
        key = cache_key(node, [digests[i.id] for i in node.inputs])
        entry = cache.lookup(key)
        if entry is not None:
            digests[node.id] = entry.digest
            found[node.id] = key
    return found


def cached_nodes(graph: Graph, cache: Cache) -> set[int]:
    """Ids of the nodes whose results are in the cache."""
    return set(cached_keys(graph, cache))
