"""The executor behind `recipec run`, `lock` and `verify`: build the plan's nodes through the cache,
write the releases, and record everything in the lockfile.

Nodes run in plan order. An input (`load`, `hf`) resolves to a directory and a content digest; every
other node's cache key is computed from its parameters and its inputs' digests, and it is built only
when the cache lacks that key. Failures become diagnostics at the span of the op that failed, and
nothing partial is ever left where a finished result is expected.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .backends import RULES, Artifact, Job, RunFailure, rule_for
from .diagnostics import Diagnostic, RecipeError
from .ir.graph import Node
from .ir.lower import Program
from .ops import REGISTRY
from .ops.base import cache_key
from .plan.plan import default_threads
from .store.cache import Cache, file_identity
from .store.filehash import hash_files
from .store.hub import HubUnavailable, resolve
from .store.lockfile import lock_digest
from .store.model_dir import ModelDirError, pickled_weights, read_model_dir, weight_files
from .store.release import Card, write_release
from .toolchain import toolchain_versions


@dataclass
class RunOptions:
    cache_dir: Path
    threads: int = field(default_factory=default_threads)
    offline: bool = False
    write_exports: bool = True
    hash_input_files: bool = False  # file sha256s for the lock (a full read of every input)
    progress: object = None  # a callable(bytes) or None


@dataclass
class NodeResult:
    node: Node
    artifact: Artifact | None
    key: str | None = None
    status: str = "input"  # input | cached | built
    seconds: float = 0.0
    resolved: dict = field(default_factory=dict)  # for inputs: what the reference resolved to


@dataclass
class RunResult:
    results: list[NodeResult]
    exports: list[dict]
    lock: dict
    seconds: float


def _failure(node: Node, code: str, message: str, hint: str | None = None) -> RecipeError:
    return RecipeError([Diagnostic(code, message, node.spans[0] if node.spans else None, hint)])


def _os_failure(node: Node, err: OSError) -> RecipeError:
    if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
        return _failure(node, "E504", f"cannot write the result of `{node.label}`: {os.strerror(err.errno)}",
                        "free space or lift the limit and run again; finished steps are cached")
    return _failure(node, "E505", f"I/O error while building `{node.label}`: {err}", "check the input files")


class Engine:
    def __init__(self, program: Program, recipe: Path, options: RunOptions):
        self.program, self.recipe, self.options = program, recipe, options
        self.cache = Cache(options.cache_dir)
        self.versions = toolchain_versions()
        self.cancelled = threading.Event()

    def check_rules(self) -> None:
        missing = [n for n in self.program.graph.reachable() if REGISTRY[n.op].builds and n.op not in RULES]
        if missing:
            raise RecipeError([Diagnostic("E305", f"no rule for `{n.op}`: this recipec cannot build it yet",
                                          n.spans[0] if n.spans else None) for n in missing])

    def run(self) -> RunResult:
        self.check_rules()
        started = time.monotonic()
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit is an error, not a kill
        try:
            with self.cache.locked():
                results = self._build_all()
                exports = self._export_all(results) if self.options.write_exports else []
        finally:
            signal.signal(signal.SIGXFSZ, previous)
        lock = self.lock_data(results, exports)
        return RunResult(results, exports, lock, time.monotonic() - started)

    def _build_all(self) -> list[NodeResult]:
        by_id: dict[int, NodeResult] = {}
        for node in self.program.graph.reachable():
            op = REGISTRY[node.op]
            if not op.builds:
                by_id[node.id] = self._resolve_input(node)
                continue
            inputs = [by_id[i.id].artifact for i in node.inputs]
            by_id[node.id] = self._build(node, inputs)
        return list(by_id.values())

    def _resolve_input(self, node: Node) -> NodeResult:
        params = node.params
        resolved: dict = {}
        if node.op == "load":
            path = Path(params["path"])
            resolved["path"] = str(path)
        elif node.op == "hf":
            try:
                path, commit = resolve(params["id"], params.get("revision"), self.options.offline)
            except HubUnavailable as err:
                raise _failure(node, "E501", err.message, err.hint) from None
            resolved.update(id=params["id"], revision=params.get("revision") or "main", commit=commit)
        else:  # data sources have no artifact until an op reads them
            return NodeResult(node, None)
        if params.get("allow_pickle") and pickled_weights(path) and not (path / "model.safetensors").exists():
            path = self._converted_pickle(node, path)
            resolved["converted_from_pickle"] = True
        try:
            files = read_model_dir(path)
        except ModelDirError as err:
            raise _failure(node, err.code, err.message, err.hint) from None
        digest = self._input_digest(files)
        if self.options.hash_input_files:
            sums = hash_files(list(files.files) + [path / "config.json"], self.options.threads)
            resolved["files"] = [{"name": p.name, "size": p.stat().st_size, "sha256": h}
                                 for p, h in sorted(sums.items())]
        return NodeResult(node, Artifact(path, files, digest), status="input", resolved=resolved)

    def _converted_pickle(self, node: Node, root: Path) -> Path:
        """Pickled weights converted once into a cache object, keyed by the pickle files' hashes."""
        from .backends.sources import convert_pickle  # torch, only when a pickle must be converted

        pickles = pickled_weights(root)
        sums = hash_files(pickles + [root / "config.json"], self.options.threads)
        blob = "pickle:" + ",".join(sums[p] for p in pickles + [root / "config.json"])
        key = hashlib.sha256(blob.encode()).hexdigest()
        if self.cache.lookup(key) is None:
            try:
                with self.cache.new_object(key) as tmp:
                    digest = convert_pickle(pickles, root, tmp)
                    self.cache.commit_meta(tmp, key, "load", digest, self.options.threads)
            except RunFailure as err:
                raise _failure(node, err.code, err.message, err.hint) from None
        return self.cache.lookup(key).path

    def _input_digest(self, files) -> str:
        identity = "|".join(file_identity(p) for p in weight_files(files.root))
        known = self.cache.known_digests().get(identity)
        if known and not self.options.hash_input_files:
            return known
        from .store.digests import hash_model  # torch's zero-copy views, only when a digest is unknown

        digest = hash_model(files, self.options.threads)
        self.cache.remember_digest(identity, digest)
        return digest

    def _build(self, node: Node, inputs: list[Artifact]) -> NodeResult:
        key = cache_key(node, [a.digest for a in inputs], self.versions)
        cached = self.cache.lookup(key)
        started = time.monotonic()
        status = "cached"
        if cached is None:
            status = "built"
            rule = rule_for(node.op)
            try:
                with self.cache.new_object(key) as tmp:
                    job = Job(node, inputs, tmp, self.options.threads, self.cancelled,
                              self.options.progress or (lambda n: None))
                    digest = rule(job)
                    self.cache.commit_meta(tmp, key, node.op, digest, self.options.threads)
            except RunFailure as err:
                raise _failure(node, err.code, err.message, err.hint) from None
            except OSError as err:
                raise _os_failure(node, err) from None
            cached = self.cache.lookup(key)
        files = read_model_dir(cached.path)
        return NodeResult(node, Artifact(cached.path, files, cached.digest), key, status, time.monotonic() - started)

    def _export_all(self, results: list[NodeResult]) -> list[dict]:
        by_node = {r.node.id: r for r in results}
        recipe_text = self.recipe.read_text(encoding="utf-8")
        partial_lock = self.lock_data(results, [])
        exports = []
        for export in self.program.graph.exports:
            result = by_node[export.node.id]
            artifact = result.artifact
            built = self.cache.lookup(result.key) if result.key else None
            known = {name: info["sha256"] for name, info in built.files.items()} if built else None
            relation = "merge" if export.node.op in ("combine", "merge") else "finetune"
            card = Card(self._base_models(export.node, by_node), relation, self.recipe.name, recipe_text,
                        lock_digest(partial_lock), artifact.digest)
            try:
                sums = write_release(artifact.path, export.path, card, known)
            except OSError as err:
                raise _os_failure(export.node, err) from None
            exports.append({"path": export.display, "resolved": str(export.path), "node": export.node.label,
                            "digest": artifact.digest, "files": sums})
        return exports

    def _base_models(self, node: Node, by_node: dict[int, NodeResult]) -> tuple[str, ...]:
        found: list[str] = []
        stack = [node]
        while stack:
            n = stack.pop()
            resolved = by_node[n.id].resolved
            if n.op == "hf" and resolved.get("id") not in found:
                found.append(resolved["id"])
            stack.extend(n.inputs)
        return tuple(sorted(found))

    def lock_data(self, results: list[NodeResult], exports: list[dict]) -> dict:
        recipe_bytes = self.recipe.read_bytes()
        inputs, nodes = {}, {}
        for r in results:
            if r.status == "input" and r.artifact is not None:
                inputs[r.node.label] = {"op": r.node.op, "written": _written(r.node), "digest": r.artifact.digest,
                                        **r.resolved}
            elif r.key is not None:
                nodes[r.node.label] = {"op": r.node.op, "key": r.key, "digest": r.artifact.digest}
        outputs = {e["path"]: {"node": e["node"], "digest": e["digest"],
                               "files": [{"name": n, "sha256": h} for n, h in sorted(e["files"].items())]}
                   for e in exports}
        return {"recipe": {"path": self.recipe.name, "sha256": hashlib.sha256(recipe_bytes).hexdigest()},
                "toolchain": self.versions, "inputs": inputs, "nodes": nodes, "outputs": outputs}


def _written(node: Node) -> str:
    return " ".join(node.spans[0].text.split()) if node.spans else node.op
