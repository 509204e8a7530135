"""Which nodes the cache already holds, decided without reading a weight or importing torch.

A node's key needs its inputs' content digests: a built input's digest is in its cache object's
metadata; an input op's digest comes from its `remembered_digest` hook (a model directory's weights
digest and a data source's records are remembered by file identity from an earlier run). Where a digest is not known, nothing downstream can be known to be cached,
and the plan says "build".
"""

from __future__ import annotations

from ..ir.graph import Graph
from ..ops import REGISTRY
from ..ops.base import cache_key
from ..store.cache import Cache


def cached_keys(graph: Graph, cache: Cache) -> dict[int, str]:
    """Node id -> cache key, for every built node whose result the cache holds."""
    if not cache.objects.is_dir():  # an empty cache holds nothing: skip even looking at the inputs
        return {}
    digests: dict[int, str] = {}
    found: dict[int, str] = {}
    for node in graph.reachable():
        op = REGISTRY[node.op]
        if not op.builds:
            digest = op.remembered_digest(node, cache)  # the input op knows what its digest depends on
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
