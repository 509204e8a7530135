"""The executor behind `recipec run`, `lock` and `verify`: build the plan's nodes through the cache,
write the releases, and record everything in the lockfile.

Nodes run in plan order. An input op (`load`, `hf`, `text`, `chat`) resolves itself to an artifact
through its `resolve` hook; every other node's cache key is computed from its parameters and its inputs'
digests, and it is built only when the cache lacks that key. Every result is an `Artifact` of some kind
(recipec/artifacts): its kind says how its directory is digested and what a release of it holds, so the
engine never asks what an op or a result is. Every report the recipe binds is built, exported or not. Under `run --locked` every key is checked against the lock before
its node is built, and every digest after. Failures become diagnostics at the span of the op that failed, and
nothing partial is ever left where a finished result is expected.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .artifacts import Artifact, ArtifactError, ReleaseInfo, artifact_kind
from .backends import Job, Meter, RunFailure, import_torch_in_background, rule_for
from .backends.job import RunWarning
from .backends.launch import run_launched
from .check import Program
from .diagnostics import Diagnostic, RecipeError
from .exports import Problem, cache_place, keeps_code_references, leaves, place_problem
from .ir.graph import Node, plain_data
from .ops import REGISTRY
from .ops.base import cache_key, keyed_params
from .ops.resolve import ResolveContext
from .plan.cache_status import cached_keys
from .plan.plan import Libraries, default_threads, measured_speed, modelled_seconds, startup, step_cost
from .store.cache import Cache
from .store.digests import model_dir_digest
from .store.filehash import hash_files
from .store.hub import fetch_hint, resolve_all
from .store.lockfile import export_drift, lock_data, lock_digest, lock_path, node_drift
from .store.model_dir import pickled_weights
from .store.release import TargetRefused, check_target, release_recipe, reproducible_hashes, write_release
from .toolchain import toolchain_versions


@dataclass
class RunOptions:
    cache_dir: Path
    threads: int = field(default_factory=default_threads)
    offline: bool = False
    write_exports: bool = True
    force: bool = False  # move aside (and keep) what is at an export target that recipec did not write
    hash_input_files: bool = False  # file sha256s for the lock (a full read of every input)
    verify_cache: bool = False  # re-hash every cached result used, against the sha256s recorded at commit
    locked: dict | None = None  # under `run --locked`: the lock every node's key and digest must match
    progress: object = None  # None, or a callable(Meter) told of every node's start, progress and finish
    launch: list[str] = field(default_factory=list)  # launcher prefix for launchable ops (`run --launch`)


@dataclass
class NodeResult:
    node: Node
    artifact: Artifact | None
    key: str | None = None
    status: str = "input"  # input | cached | built
    seconds: float = 0.0
    resolved: dict = field(default_factory=dict)  # for inputs: what the reference resolved to
    warnings: list[Diagnostic] = field(default_factory=list)  # from building it (a cached node has none)
    nonfinite: int = 0  # NaN and ±inf values its build wrote


@dataclass
class RunResult:
    results: list[NodeResult]
    exports: list[dict]
    lock: dict
    seconds: float
    root_ids: frozenset[int] = frozenset()  # the graph's roots: what `run` shows besides writing exports

    @property
    def shown(self) -> list[NodeResult]:
        """The results `run` prints: the reports the recipe binds."""
        return [r for r in self.results if r.node.id in self.root_ids]


def _failure(node: Node, code: str, message: str, hint: str | None = None) -> RecipeError:
    return RecipeError([Diagnostic(code, message, node.spans[0] if node.spans else None, hint)])


def _artifact_failure(node: Node, err: ArtifactError) -> RecipeError:
    """Every problem an input or a result had, at the span of the op that read it."""
    span = node.spans[0] if node.spans else None
    return RecipeError([Diagnostic(p.code, p.message, span, p.hint) for p in err.problems])


def _os_failure(node: Node, err: OSError) -> RecipeError:
    if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return _failure(node, "E504", f"cannot write the result of `{node.label}`: {os.strerror(err.errno)}",
                        "free space or lift the limit and run again; finished steps are cached")
    if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        where = f" ({err.filename})" if err.filename else ""
        return _failure(node, "E504", f"cannot write the result of `{node.label}`: {os.strerror(err.errno)}{where}",
                        "make the cache (or the export's folder) writable, or give another with --cache, and "
                        "run again; finished steps are cached")
    return _failure(node, "E505", f"I/O error while building `{node.label}`: {err}", "check the input files")


class Engine:
    def __init__(self, program: Program, recipe: Path, options: RunOptions):
        self.program, self.recipe, self.options = program, recipe, options
        self.cache = Cache(options.cache_dir)
        self.versions = toolchain_versions()
        self.cancelled = threading.Event()
        self.importing: threading.Thread | None = None  # torch, imported while the inputs are hashed
        self.libraries = Libraries()  # what rules imported into this process (for the time model)
        # What happened to what stood at the export paths, as it happens: said even if a later step fails.
        self.notices: list[str] = []

    def check_rules(self) -> None:
        missing = [n for n in self.program.graph.reachable() if REGISTRY[n.op].builds and REGISTRY[n.op].rule is None]
        if missing:
            raise RecipeError([Diagnostic("E305", f"no rule for `{n.op}`: this recipec cannot build it yet",
                                          n.spans[0] if n.spans else None) for n in missing])

    def check_targets(self) -> None:
        """Before anything is built: every export target may be written (the cache rule again, with
        the cache this run really uses, and what is at the target now)."""
        cache = cache_place(self.options.cache_dir)
        problems = []
        for export in self.program.graph.exports:
            problem = place_problem(export.path, export.display, cache)
            try:
                check_target(export.path, self.options.force)
            except TargetRefused as err:
                problem = problem or Problem(err.code, err.message, err.hint)
            if problem is not None:
                problems.append(Diagnostic(problem.code, problem.message, export.span, problem.hint))
        if problems:
            raise RecipeError(problems)

    def run(self, then: Callable[[RunResult], None] | None = None) -> RunResult:
        """Build and export; `then(result)` runs while the cache is still held by this run (to write the
        lockfile and register it as the cache's root before `cache gc` may look)."""
        self.check_rules()
        if self.options.write_exports:
            self.check_targets()
        started = time.monotonic()
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit is an error, not a kill
        try:
            with self.cache.locked(exclusive=False):  # each node is locked by its key as it is built
                results = self._build_all()
                exports = self._export_all(results) if self.options.write_exports else []
                roots = frozenset(n.id for n in self.program.graph.roots)
                result = RunResult(results, exports, self.lock_data(results, exports), time.monotonic() - started,
                                   roots)
                if then is not None:
                    then(result)
        finally:
            signal.signal(signal.SIGXFSZ, previous)
        return result

    def _build_all(self) -> list[NodeResult]:
        by_id: dict[int, NodeResult] = {}
        self.hub_snapshots = self._resolve_hub_inputs()
        if self._may_build():
            self.importing = import_torch_in_background()  # torch loads while the inputs are hashed
            self.libraries.loaded.add("torch")  # so no build's time is taken to include it
        # Every input first, and every problem of every input at once (a malformed line in the last corpus
        # is said before hours of training on the first, not after).
        problems: list[Diagnostic] = []
        nodes = self.program.graph.reachable()
        for node in nodes:
            if not REGISTRY[node.op].builds:
                try:
                    by_id[node.id] = self._resolve_input(node)
                except RecipeError as err:
                    problems.extend(err.diagnostics)
        if problems:
            raise RecipeError(problems)
        for node in nodes:
            if not REGISTRY[node.op].builds:
                continue
            inputs = [by_id[i.id].artifact for i in node.inputs]
            by_id[node.id] = self._build(node, inputs, {n.id: by_id[n.id].artifact for n in _upstream(node)})
        return [by_id[node.id] for node in nodes]

    def _may_build(self) -> bool:
        """Whether this process may have to build a node: one not known to be cached (without reading a
        weight), and not launched as a process of its own."""
        cached = cached_keys(self.program.graph, self.cache)
        return any(REGISTRY[n.op].builds and n.id not in cached
                   and not (REGISTRY[n.op].launchable and self.options.launch)
                   for n in self.program.graph.reachable())

    def _imported(self) -> None:
        """Wait for the torch import started by `_build_all`: a rule imports torch and transformers itself,
        and transformers must not be imported while another thread imports anything it needs."""
        if self.importing is not None:
            self.importing.join()

    def _resolve_hub_inputs(self) -> dict:
        """Every hub input, resolved before anything is built, so that all missing ones are reported at once."""
        first_use: dict[tuple[str, str | None], Node] = {}
        for node in self.program.graph.reachable():
            reference = REGISTRY[node.op].hub_reference(node.params)
            if reference is not None:
                first_use.setdefault(reference, node)
        resolved, missing = resolve_all(list(first_use), self.options.offline)
        if missing:
            spans = [first_use[(err.repo_id, err.revision)].spans for err in missing]
            raise RecipeError([Diagnostic("E501", err.message, span[0] if span else None,
                                          fetch_hint(err.repo_id, err.revision, str(self.recipe)))
                               for err, span in zip(missing, spans)])
        return resolved

    def _resolve_input(self, node: Node) -> NodeResult:
        """An input op's artifact, from its own `resolve` hook."""
        context = ResolveContext(self.recipe, self.cache, self.options.threads, self.options.hash_input_files,
                                 self.hub_snapshots, lambda root: self._converted_pickle(node, root))
        try:
            resolved = REGISTRY[node.op].resolve(node, context)
        except ArtifactError as err:
            raise _artifact_failure(node, err) from None
        except OSError as err:
            raise _failure(node, "E505", f"cannot read the input of `{node.label}`: {err}", "check the input files") from None
        return NodeResult(node, resolved.artifact, status="input", resolved=resolved.record)

    def _converted_pickle(self, node: Node, root: Path) -> Path:
        """Pickled weights converted once into a cache object, keyed by the pickle files' hashes."""
        self._imported()
        from .backends.sources import convert_pickle  # torch, only when a pickle must be converted

        pickles = pickled_weights(root)
        sums = hash_files(pickles + [root / "config.json"], self.options.threads)
        blob = "pickle:" + ",".join(sums[p] for p in pickles + [root / "config.json"])
        key = hashlib.sha256(blob.encode()).hexdigest()

        def build(tmp: Path) -> None:
            digest = model_dir_digest(tmp, convert_pickle(pickles, root, tmp))
            self.cache.commit_meta(tmp, key, "load", digest, self.options.threads)

        try:
            return (self.cache.lookup(key) or self.cache.obtain(key, build)).path
        except RunFailure as err:
            raise _failure(node, err.code, err.message, err.hint) from None

    def _check_locked(self, node: Node, key: str | None = None, digest: str | None = None) -> None:
        if self.options.locked is None:
            return
        drift = node_drift(self.options.locked, node.label, key, digest, plain_data(keyed_params(node)))
        if drift:
            raise _failure(node, "E506", f"{drift} differs from {lock_path(self.recipe).name}",
                           "run `recipec lock` to accept the change, or restore the lockfile")

    def _build(self, node: Node, inputs: list[Artifact], upstream: dict[int, Artifact]) -> NodeResult:
        key = cache_key(node, [a.digest for a in inputs])
        self._check_locked(node, key=key)  # before anything is built
        started = time.monotonic()
        status, job = "cached", None
        cached = self.cache.lookup(key)
        if cached is None:
            with self.cache.building(key):  # another run building this key finishes first
                cached = self.cache.lookup(key)
                if cached is None:
                    status = "built"
                    changed = (self.cache.objects / key).is_dir()  # there, but edited since it was committed
                    job = self._run_job(node, inputs, key, upstream)
                    cached = self.cache.lookup(key)
                    if cached is None:  # something changed it between its commit and now
                        raise _failure(node, "E530", f"the result of `{node.label}` was changed on disk as "
                                       "soon as it was built (a file's size or time differs)",
                                       "make sure no other program writes into the cache, and run again")
                    if changed:
                        job.warnings.append(RunWarning(
                            "E530", f"the cached result of `{node.label}` was changed on disk after it was built "
                            "(a file's size or time differs), so it was built again",
                            "an edit to a release's weights reaches the cache through their hard links: copy a "
                            "release before editing it"))
        if status == "cached" and self.options.verify_cache and (
                damage := self.cache.damage(cached.path, self.options.threads)):
            raise _failure(node, "E530", f"the cached result of `{node.label}` is damaged: {damage}",
                           self.cache.repair_hint(key))
        self._check_locked(node, digest=cached.digest)
        artifact = Artifact(node.type.kind, cached.path, cached.digest)
        result = NodeResult(node, artifact, key, status, time.monotonic() - started)
        if job is not None:
            span = node.spans[0] if node.spans else None
            result.warnings = [Diagnostic(w.code, w.message, span, w.hint, severity="warning") for w in job.warnings]
            result.nonfinite = job.nonfinite
        return result

    def _run_job(self, node: Node, inputs: list[Artifact], key: str, upstream: dict[int, Artifact]) -> Job:
        """Build `key` (in this process, or launched when the op allows it) and commit it; its work
        directory is removed once the result is committed, kept on failure when it holds anything."""
        op = REGISTRY[node.op]
        cost = step_cost(node, self.options.threads)
        fixed = startup(node, self.libraries)[0]
        meter = Meter(node.label, total=cost.bytes_written or None, sink=self.options.progress or (lambda m: None))
        work = self.cache.work_dir(key)
        if work.is_dir() and any(work.iterdir()):
            self.notices.append(f"`{node.label}` goes on from what an unfinished run of it left ({work}: checkpoints, "
                                "prepared data), not from the start")
        started = time.monotonic()
        try:
            with self.cache.new_object(key) as tmp:
                job = Job(node, inputs, tmp, self.cache.work_dir(key), self.options.threads, self.cancelled, meter,
                          upstream=upstream, read_again=self._read_again(node))
                meter.sink(meter)  # started: shown before its first report
                self._imported()
                weights = run_launched(job, self.options.launch) if op.launchable else rule_for(node.op)(job)
                digest = artifact_kind(node.type.kind).digest(tmp, weights)
                self.cache.commit_meta(tmp, key, node.op, digest, self.options.threads)
            self.cache.register_root(lock_path(self.recipe), {key: [node.label]}, building=True)
            self.cache.drop_work(key)
            self._calibrate(node.op, cost, fixed, time.monotonic() - started)
        except RunFailure as err:
            raise _failure(node, err.code, err.message, err.hint) from None
        except OSError as err:
            raise _os_failure(node, err) from None
        finally:
            self.cache.drop_work_if_empty(key)
            meter.finish()
        return job

    def _read_again(self, node: Node) -> bool:
        """Whether another node this run builds reads `node`'s result (it then stays in the page cache)."""
        return any(node in n.inputs for n in self.program.graph.reachable())

    def _calibrate(self, op: str, cost, fixed: float, seconds: float) -> None:
        """Remember how this machine compares with the plan's time model for `op`'s work (its start-up
        taken out); only builds whose modelled work takes a while count."""
        speed = measured_speed(seconds, modelled_seconds(cost, self.options.threads), fixed)
        if speed is not None:
            self.cache.remember_speed(op, speed)

    def _export_all(self, results: list[NodeResult]) -> list[dict]:
        by_node = {r.node.id: r for r in results}
        recipe_text = self.recipe.read_text(encoding="utf-8")
        partial_lock = self.lock_data(results, [])
        written = []
        for export in self.program.graph.exports:
            result = by_node[export.node.id]
            artifact = result.artifact
            built = self.cache.lookup(result.key) if result.key else None
            info = ReleaseInfo(self.recipe.name, recipe_text, lock_digest(partial_lock),
                               self._base_models(export.node, by_node), REGISTRY[export.node.op].card_relation,
                               {name: f["sha256"] for name, f in built.files.items()} if built else {},
                               keeps_code_references(export.node), self._card_sections(export.node, results))
            kind = artifact_kind(artifact.kind)
            files = kind.release_files(artifact, info, export.format)
            entry = {"path": export.display, "resolved": str(export.path), "node": export.node.label,
                     "digest": artifact.digest}

            def accept(release: Path, sums: dict[str, str], export=export, kind=kind, entry=entry) -> None:
                """Under `run --locked`, a release that differs from the lock replaces nothing."""
                reproducible = reproducible_hashes(release, kind.reproducible_views(release))
                entry.update(files=sums, reproducible=reproducible, measured=kind.measured_what(release))
                drift = (export_drift(self.options.locked, export.display, sums, reproducible)
                         if self.options.locked is not None else None)
                if drift:
                    raise RecipeError([Diagnostic(
                        "E506", f"{drift} differs from {lock_path(self.recipe).name}", export.span,
                        "the release was made from the locked nodes and not written; run `recipec lock` to "
                        "accept it, or restore the lockfile")])

            try:
                previous = release_recipe(export.path)
                _, aside = write_release(files, export.path, self.recipe.name, artifact.digest, self.options.force,
                                         accept)
            except TargetRefused as err:
                raise RecipeError([Diagnostic(err.code, err.message, export.span, err.hint)]) from None
            except ArtifactError as err:
                raise _artifact_failure(export.node, err) from None
            except OSError as err:
                raise _os_failure(export.node, err) from None
            if aside:
                self.notices.append(f"{export.display} held files that were not the release recipec wrote there; "
                                    f"they were moved to {aside}")
            if previous not in (None, self.recipe.name):
                self.notices.append(f"{export.display} was a release of {previous}; it is this recipe's now "
                                    "(give each recipe its own export paths)")
            written.append(entry)
        return written

    def _card_sections(self, node: Node, results: list[NodeResult]) -> tuple[str, ...]:
        """What the results built from `node` (reports) say about it, for its card, in plan order; each
        report names `node` as its op shows it (`shown_names`)."""
        sections = []
        for r in results:
            if r.key is not None and any(i.id == node.id for i in r.node.inputs):
                shown = REGISTRY[r.node.op].shown_names(r.node).get(node.id, node.label)
                sections.append(artifact_kind(r.artifact.kind).card_section(r.artifact.path, shown, r.node.label))
        return tuple(section for section in sections if section)

    def _base_models(self, node: Node, by_node: dict[int, NodeResult]) -> tuple[str, ...]:
        """What a card names as base models: each leaf input that names itself one (hub models)."""
        names = (REGISTRY[leaf.op].base_model(by_node[leaf.id].resolved) for leaf in leaves(node))
        return tuple(sorted({name for name in names if name}))

    def lock_data(self, results: list[NodeResult], exports: list[dict]) -> dict:
        """The lockfile's content for these results and written exports (store/lockfile.py lays it out)."""
        inputs = {r.node.label: {"op": r.node.op, "written": _written(r.node), "digest": r.artifact.digest,
                                 **r.resolved} for r in results if r.status == "input"}
        nodes = {r.node.label: {"op": r.node.op, "key": r.key, "digest": r.artifact.digest,
                                "params": plain_data(keyed_params(r.node))}
                 for r in results if r.status != "input" and r.key is not None}
        return lock_data(self.recipe, self.versions, inputs, nodes, exports)


def _upstream(node: Node) -> list[Node]:
    """Every node `node` is built from, its inputs and theirs, each once."""
    found: dict[int, Node] = {}
    stack = list(node.inputs)
    while stack:
        n = stack.pop()
        if n.id not in found:
            found[n.id] = n
            stack.extend(n.inputs)
    return list(found.values())


def _written(node: Node) -> str:
    return " ".join(node.spans[0].text.split()) if node.spans else node.op
