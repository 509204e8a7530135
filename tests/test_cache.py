"""The cache as a user meets it: gc by roots, `cache ls`, `cache verify`, `cache rm`, bit rot caught by
`run --locked`, read-only caches, and a `--cache` that names a file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from helpers import tiny_llama
from recipec.store.cache import Cache
from test_run import copy_example, run

MERGES = 5  # merge_methods.rcp's merge nodes; its three inits are quickstart's too


def lock_keys(recipe: Path) -> dict[str, str]:
    lock = tomllib.loads(recipe.with_name(recipe.name + ".lock").read_text())
    return {label: node["key"] for label, node in lock["nodes"].items()}


def objects(cache: Path) -> set[str]:
    return {p.name for p in Cache(cache).objects.iterdir() if not p.name.startswith(".")}


@pytest.fixture
def shared(tmp_path, capsys):
    """quickstart.rcp and merge_methods.rcp built through one cache given with --cache."""
    cache = tmp_path / "shared-cache"
    recipes = [copy_example(tmp_path, name) for name in ("quickstart.rcp", "merge_methods.rcp")]
    for recipe in recipes:
        assert run(["run", "--cache", str(cache), str(recipe)], capsys)[0] == 0
    return cache, *recipes


def test_gc_keeps_what_another_recipe_sharing_the_cache_uses(shared, capsys):
    cache, quickstart, merges = shared
    before = objects(cache)
    assert len(before) == 4 + MERGES
    status, _, err = run(["cache", "gc", "--cache", str(cache), str(quickstart)], capsys)
    assert status == 0 and "removed 0 objects" in err and "used by 2 lockfiles" in err
    assert objects(cache) == before
    _, out, _ = run(["plan", "--cache", str(cache), str(merges)], capsys)
    assert f"Plan: 0 to build, {3 + MERGES} cached" in out
    # Once merge_methods' lock is gone, its merges are kept (the project may have moved) until asked for.
    merges_lock = merges.with_name(merges.name + ".lock").resolve()
    merges_lock.unlink()
    status, out, err = run(["cache", "gc", "--cache", str(cache)], capsys)
    assert status == 0 and "removed 0 objects" in err and "used by 1 lockfile" in err
    assert f"kept {MERGES} objects (" in err
    assert f"for {merges_lock}, which is not there: moved, deleted, or its run did not finish?" in err
    _, out, _ = run(["cache", "ls", "--cache", str(cache)], capsys)
    assert out.count(f"kept for {merges_lock}, which is not there") == MERGES
    status, out, err = run(["cache", "gc", "--forget-missing", "--cache", str(cache)], capsys)
    assert status == 0 and f"removed {MERGES} objects" in err and "used by 1 lockfile" in err
    assert f"forgot {merges_lock}: the lockfile is not there" in out
    assert objects(cache) == set(lock_keys(quickstart).values())
    assert len(list(Cache(cache).roots.iterdir())) == len(list(Cache(cache).root_references.iterdir())) == 1


def test_a_vanished_lockfile_s_objects_go_a_month_after_its_last_run(shared, capsys):
    cache, _, merges = shared
    merges_lock = merges.with_name(merges.name + ".lock").resolve()
    merges_lock.unlink()
    assert "removed 0 objects" in run(["cache", "gc", "--cache", str(cache)], capsys)[2]
    month_ago = time.time() - 31 * 86400
    for remembered in Cache(cache).root_references.iterdir():  # a live lockfile keeps its objects regardless
        os.utime(remembered, (month_ago, month_ago))
    status, out, err = run(["cache", "gc", "--cache", str(cache)], capsys)
    assert status == 0 and f"removed {MERGES} objects" in err and "which is not there" not in err
    assert f"forgot {merges_lock}: the lockfile is not there" in out


def test_a_root_entry_stays_the_lockfile_s_path_that_every_recipec_of_this_layout_reads(shared):
    cache, quickstart, _ = shared
    entries = {p.read_text() for p in Cache(cache).roots.iterdir()}
    assert f"{quickstart.with_name(quickstart.name + '.lock').resolve()}\n" in entries


def test_gc_keeps_a_moved_project_s_objects_and_forgets_its_old_place_once_it_ran_again(shared, capsys):
    cache, quickstart, merges = shared
    before = objects(cache)
    moved = quickstart.parent / "moved"
    copy_example(moved, quickstart.name)  # the project's other files
    for name in (quickstart.name, quickstart.name + ".lock"):
        shutil.move(quickstart.with_name(name), moved / name)
    status, _, err = run(["cache", "gc", "--cache", str(cache)], capsys)
    assert status == 0 and "removed 0 objects" in err and "which is not there: moved, deleted, or its run" in err
    assert objects(cache) == before
    status, _, err = run(["run", "--cache", str(cache), str(moved / quickstart.name)], capsys)
    assert status == 0 and "Built 0," in err, err
    status, out, err = run(["cache", "gc", "--cache", str(cache)], capsys)
    assert status == 0 and "removed 0 objects" in err and "which is not there" not in err
    assert f"forgot {quickstart.with_name(quickstart.name + '.lock').resolve()}: the lockfile is not there" in out
    assert objects(cache) == before


def test_gc_keeps_what_a_rerun_built_before_it_was_interrupted_while_the_old_lock_stands(tmp_path, capsys,
                                                                                       monkeypatch):
    # The project has a lock from its first run; the recipe is edited and run again, and that run is
    # interrupted after it built the new result, before it could write the lock. The old lock still
    # stands (and does not name the new result): gc must not take the new result for garbage.
    from recipec.engine import Engine

    cache = tmp_path / "cache"
    recipe = copy_example(tmp_path, "quickstart.rcp")
    assert run(["run", "--cache", str(cache), str(recipe)], capsys)[0] == 0
    recipe.write_text(recipe.read_text().replace("0.8*", "0.7*"))

    def interrupted(self, results):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(Engine, "_export_all", interrupted)
        assert run(["run", "--cache", str(cache), str(recipe)], capsys)[0] == 130
    new = set(objects(cache)) - set(lock_keys(recipe).values())
    assert len(new) == 1
    _, out, _ = run(["cache", "ls", "--cache", str(cache)], capsys)
    assert f"built by a run of {recipe} that did not finish" in out, out
    remembered = next(Cache(cache).root_references.iterdir())
    registered = remembered.stat().st_mtime_ns
    for gc in (["cache", "gc", "--cache", str(cache)], ["cache", "gc", "--cache", str(cache), str(recipe)]) * 2:
        status, _, err = run(gc, capsys)
        assert status == 0 and "removed 0 objects" in err and "kept 1 object (" in err, err
        assert "that did not finish (its lock still names the results before)" in err, err
        assert new <= objects(cache)
        # gc, even naming the recipe, neither forgets what the unfinished run built nor extends its grace
        assert remembered.stat().st_mtime_ns == registered
    status, _, err = run(["run", "--cache", str(cache), str(recipe)], capsys)  # finishes: nothing rebuilt
    assert status == 0 and "Built 0, 4 cached" in err, err
    status, _, err = run(["cache", "gc", "--cache", str(cache)], capsys)
    assert status == 0 and "removed 1 object" in err and "did not finish" not in err, err  # the old result
    assert new <= objects(cache)


def test_gc_dry_run_changes_nothing_and_a_real_gc_removes_leftovers(tmp_path, capsys):
    recipe = copy_example(tmp_path, "quickstart.rcp")
    cache = Path(os.environ["RECIPEC_CACHE"])
    assert run(["run", str(recipe)], capsys)[0] == 0
    old_model = lock_keys(recipe)["model"]
    recipe.write_text(recipe.read_text().replace("0.8*(chat - base)", "0.5*(chat - base)"))
    assert run(["run", str(recipe)], capsys)[0] == 0
    leftover = Cache(cache).objects / ".recipec-tmp-0123456789abcdef-999999"
    leftover.mkdir()
    status, out, err = run(["cache", "gc", "--dry-run", str(recipe)], capsys)
    assert status == 0 and f"would remove {old_model[:16]}  combine" in out and str(leftover) in out
    assert "would remove 1 object, " in err and leftover.exists() and old_model in objects(cache)
    status, out, err = run(["cache", "gc", str(recipe)], capsys)
    assert status == 0 and "removed 1 object, " in err and " freed" in err
    assert not leftover.exists() and objects(cache) == set(lock_keys(recipe).values())
    assert not list(Cache(cache).key_locks.glob("*.lock"))  # one per key ever built, gone with gc
    assert "Plan: 0 to build, 4 cached, 1 export." in run(["plan", str(recipe)], capsys)[1]


def test_a_lock_that_cannot_be_read_keeps_every_object(shared, capsys):
    cache, quickstart, merges = shared
    merges.with_name(merges.name + ".lock").write_text("inputs = 'x'\nnodes = 3\n")
    before = objects(cache)
    status, _, err = run(["cache", "gc", "--cache", str(cache), str(quickstart)], capsys)
    assert status == 0 and "cannot read" in err and "every object is kept" in err
    assert objects(cache) == before


def test_cache_ls_lists_one_recipes_objects_or_everything_with_its_users(shared, capsys, monkeypatch):
    cache, quickstart, merges = shared
    monkeypatch.chdir(quickstart.parent)
    status, out, _ = run(["cache", "ls", "--cache", str(cache), quickstart.name], capsys)
    header, *rows = out.splitlines()
    assert status == 0 and header.startswith("quickstart.rcp: 4 objects in ") and header.endswith("all present")
    assert sorted(r.split()[0] for r in rows) == sorted(k[:16] for k in lock_keys(quickstart).values())
    assert [r.split()[-1] for r in rows] == ["base", "chat", "cp", "model"]
    status, out, _ = run(["cache", "ls", "--cache", str(cache)], capsys)
    header, *rows = out.splitlines()
    assert status == 0 and header.startswith(f"{cache}: {4 + MERGES} objects (") and "used by 2 lockfiles" in header
    base = next(r for r in rows if r.startswith(lock_keys(quickstart)["base"][:16]))
    assert base.endswith("merge_methods.rcp (base), quickstart.rcp (base)")
    # Without FILE and --cache, the cache is $RECIPEC_CACHE (or .recipec/cache in the working directory).
    status, out, _ = run(["cache", "ls"], capsys)
    assert status == 0 and out.startswith(f"{os.environ['RECIPEC_CACHE']}: 0 objects")


def test_cache_ls_of_a_recipe_without_a_lock_says_how_to_make_one(tmp_path, capsys):
    recipe = copy_example(tmp_path, "quickstart.rcp")
    status, _, err = run(["cache", "ls", str(recipe)], capsys)
    assert status == 66 and "error[E508]: no lockfile" in err and f"recipec run {recipe}" in err


def _rot(path: Path) -> None:
    """Flip one bit of a file, keeping its size and modification time, as bit rot does."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_bit_rot_in_the_cache_is_refused_by_run_locked_and_found_by_cache_verify(tmp_path, capsys):
    recipe = copy_example(tmp_path, "quickstart.rcp")
    assert run(["run", str(recipe)], capsys)[0] == 0
    key = lock_keys(recipe)["model"]
    cache = Path(os.environ["RECIPEC_CACHE"])
    shutil.rmtree(tmp_path / "out")  # the release shares the cache's file; keep the damage to the cache
    _rot(Cache(cache).objects / key / "model.safetensors")
    status, out, err = run(["run", "--locked", str(recipe)], capsys)
    assert status == 1 and out == "" and not (tmp_path / "out" / "quickstart").exists()
    assert ("error[E530]: the cached result of `model` is damaged: model.safetensors does not have the sha256 "
            "recorded when it was built") in err
    assert f"recipec cache rm {key[:16]} --cache {cache}" in err
    status, _, err = run(["cache", "verify", str(recipe)], capsys)
    assert status == 1 and f"error[E530]: cache object {key[:16]} (combine) is damaged: model.safetensors" in err
    assert err.count("error[E530]") == 1
    status, _, err = run(["cache", "rm", key[:16]], capsys)
    assert status == 0 and "removed 1 object" in err
    assert run(["run", "--locked", str(recipe)], capsys)[0] == 0
    status, _, err = run(["cache", "verify"], capsys)
    assert status == 0 and "verified 4 objects" in err


def test_a_cache_object_changed_on_disk_is_rebuilt_with_a_warning(tmp_path, capsys):
    recipe = copy_example(tmp_path, "quickstart.rcp")
    assert run(["run", str(recipe)], capsys)[0] == 0
    weights = Cache(Path(os.environ["RECIPEC_CACHE"])).objects / lock_keys(recipe)["model"] / "model.safetensors"
    os.utime(weights, (1e9, 1e9))  # as an edit would leave it
    status, _, err = run(["run", str(recipe)], capsys)
    assert status == 0 and "Built 1, 3 cached" in err, err
    assert "warning[E530]: the cached result of `model` was changed on disk after it was built" in err
    status, _, err = run(["run", str(recipe)], capsys)
    assert status == 0 and "E530" not in err and "Built 0" in err


def test_cache_rm_needs_a_key_that_names_exactly_one_object(tmp_path, capsys):
    recipe = copy_example(tmp_path, "quickstart.rcp")
    assert run(["run", str(recipe)], capsys)[0] == 0
    status, _, err = run(["cache", "rm", "zz"], capsys)
    assert status == 2 and "'zz' names no object" in err
    status, _, err = run(["cache", "rm", ""], capsys)
    assert status == 2 and "names 4 objects; give more of the key" in err
    assert len(objects(Path(os.environ["RECIPEC_CACHE"]))) == 4
    model = lock_keys(recipe)["model"]
    status, out, err = run(["cache", "rm", model[:6]], capsys)
    assert status == 0 and out.startswith(f"removed {model[:16]}  combine  used by ") and "removed 1 object" in err
    assert out.endswith("quickstart.rcp (model): its next run builds it again\n"), out  # said, not refused


def test_gc_keeps_the_object_a_pickled_input_was_converted_into(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    model = tiny_llama(tmp_path / "models" / "pickled")
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    recipe = tmp_path / "p.rcp"
    recipe.write_text('recipec 1\nm = load("models/pickled", allow_pickle=true)\nexport m to "out/p"\n')
    assert run(["run", str(recipe)], capsys)[0] == 0
    converted = tomllib.loads(recipe.with_name("p.rcp.lock").read_text())["inputs"]["m"]["converted_key"]
    cache = Path(os.environ["RECIPEC_CACHE"])
    assert converted in objects(cache)
    status, _, err = run(["cache", "gc", str(recipe)], capsys)
    assert status == 0 and "removed 0 objects" in err and objects(cache) == {converted}


def _as_unprivileged() -> list[str]:
    """A command prefix under which a read-only file is read-only: root ignores permissions unless it
    gives up CAP_DAC_OVERRIDE (setpriv drops it for the child)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: read-only files are writable")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def test_a_read_only_cache_serves_a_run_that_builds_nothing(tmp_path, capsys):
    recipe = copy_example(tmp_path, "quickstart.rcp")
    cache = tmp_path / "cache"
    assert run(["run", "--cache", str(cache), str(recipe)], capsys)[0] == 0
    subprocess.run(["chmod", "-R", "a-w", str(cache)], check=True)
    try:
        command = [*_as_unprivileged(), sys.executable, "-m", "recipec", "run", "--cache", str(cache)]
        done = subprocess.run([*command, "--locked", str(recipe)], capture_output=True, text=True)
        assert done.returncode == 0 and "Built 0, 4 cached, 1 exported" in done.stderr, done.stderr
        # Something to build: a clear error at the node, not an internal one about the lock file.
        recipe.write_text(recipe.read_text().replace("0.8*(chat - base)", "0.5*(chat - base)"))
        done = subprocess.run([*command, str(recipe)], capture_output=True, text=True)
        assert done.returncode == 1 and "error[E504]: cannot write the result of `model`" in done.stderr
        assert "make the cache (or the export's folder) writable" in done.stderr, done.stderr
        assert "internal error" not in done.stderr
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(cache)], check=True)


@pytest.mark.parametrize("verb", ["run", "cache gc"])
@pytest.mark.parametrize("code", ["ENOSYS", "ENOLCK"])
def test_a_cache_on_a_filesystem_without_locks_is_a_clear_error(tmp_path, capsys, monkeypatch, verb, code):
    # Lustre without `-o flock` and NFS mounted `nolock` answer flock with an error: recipec must say so,
    # and never go on unlocked.
    import errno
    import fcntl

    recipe = copy_example(tmp_path, "quickstart.rcp")
    cache = tmp_path / "cache"
    assert run(["run", "--cache", str(cache), str(recipe)], capsys)[0] == 0
    (tmp_path / "out").rename(tmp_path / "out.before")

    def no_locks(handle, mode):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    status, _, err = run([*verb.split(), "--cache", str(cache), str(recipe)], capsys)
    assert status == 1 and f"error[E532]: {cache} is on a filesystem without file locks" in err, err
    assert "internal error" not in err and "--cache DIR" in err
    assert not (tmp_path / "out").exists() and len(objects(cache)) == 4


def test_a_filesystem_that_refuses_to_fsync_a_directory_still_runs(tmp_path, capsys, monkeypatch):
    # Some FUSE and SMB mounts answer fsync of a directory with EINVAL: the rename before it has happened,
    # and reporting it as a failure said "cannot write the lockfile" of a lockfile that was written.
    import errno
    import stat

    fsync = os.fsync

    def refuses_directories(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", refuses_directories)
    recipe = copy_example(tmp_path, "quickstart.rcp")
    status, _, err = run(["run", "--cache", str(tmp_path / "cache"), str(recipe)], capsys)
    assert status == 0 and "Built 4" in err, err
    assert run(["run", "--locked", "--cache", str(tmp_path / "cache"), str(recipe)], capsys)[0] == 0


def test_gc_on_a_read_only_mount_is_a_clear_error(tmp_path, capsys, monkeypatch):
    # A read-only mount says EROFS, which is no PermissionError: it was an internal error.
    import errno

    recipe = copy_example(tmp_path, "quickstart.rcp")
    cache = tmp_path / "cache"
    assert run(["run", "--cache", str(cache), str(recipe)], capsys)[0] == 0

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self.key_locks))

    monkeypatch.setattr(Cache, "drop_key_locks", read_only)
    monkeypatch.setattr(Cache, "remove", read_only)
    for verb in (["gc"], ["rm", lock_keys(recipe)["model"]]):
        status, _, err = run(["cache", *verb, "--cache", str(cache)], capsys)
        assert status == 1 and f"cannot change the cache {cache}: Read-only file system" in err, err
        assert "internal error" not in err


@pytest.mark.parametrize("verb", ["run", "plan", "cache ls"])
def test_a_cache_that_is_a_file_is_a_clear_error(tmp_path, capsys, verb):
    recipe = copy_example(tmp_path, "quickstart.rcp")
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    for cache in (file, file / "sub"):
        status, _, err = run([*verb.split(), "--cache", str(cache), str(recipe)], capsys)
        assert status == 1 and f"error[E531]: the cache {cache}" in err and "is a file, not a directory" in err
        assert "internal error" not in err and file.read_text() == "mine\n"


def test_a_run_that_finds_everything_cached_never_imports_torch(tmp_path):
    """The rules, and torch with them, are imported only when something is built (torch is imported on a
    thread of its own while inputs are hashed only when some node is not known to be cached)."""
    (tmp_path / "r.rcp").write_text('recipec 1\na = init("llama", size="tiny", seed=1)\n'
                                    'b = init("llama", size="tiny", seed=2)\nexport 0.5*a + 0.5*b to "out/m"\n')
    code = ("import sys; from recipec.cli import main; status = main(['run', 'r.rcp']); "
            "print(status, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}

    def imported() -> str:
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
        return done.stdout.strip().splitlines()[-1]

    assert imported() == "0 ['torch', 'transformers']"  # built
    assert imported() == "0 []"  # everything cached


def test_a_committed_object_is_never_replaced_by_another_build_of_its_key(tmp_path):
    # Two runs may build one key (a data source resolved by both): the second finds it committed and
    # leaves it, since the first may be reading it.
    cache = Cache(tmp_path / "cache")

    def build(text):
        def fill(tmp):
            (tmp / "data.txt").write_text(text)
            cache.commit_meta(tmp, "k" * 64, "text", "blake3:" + "0" * 64)
        return fill

    first = cache.obtain("k" * 64, build("first"))
    inode = (first.path / "data.txt").stat().st_ino
    with cache.new_object("k" * 64) as tmp:  # as a run that looked before the first committed
        build("second")(tmp)
    assert (first.path / "data.txt").read_text() == "first" and (first.path / "data.txt").stat().st_ino == inode
    assert cache.temporaries() == []


def test_a_leftover_of_a_killed_removal_does_not_block_the_next(tmp_path):
    cache = Cache(tmp_path / "cache")
    (cache.objects / "k").mkdir(parents=True)
    leftover = cache.objects / ".recipec-tmp-removed-k"  # what a removal killed mid-way left, by the old name
    leftover.mkdir()
    (leftover / "half").write_text("x")
    cache.remove("k")
    assert not (cache.objects / "k").exists()


RESOLVER = """
import sys, time
from pathlib import Path
from recipec.artifacts.data import RECORDS, resolve_records
from recipec.ops.sources import Text
from recipec.store.cache import Cache

cache, corpus, start = Cache(Path(sys.argv[1])), Path(sys.argv[2]), float(sys.argv[3])
reader = Text.reader({"field": "text"}, str)
for i in range(12):
    while time.time() < start + i * 0.25:
        time.sleep(0.0005)
    with cache.locked(exclusive=False):
        artifact, _ = resolve_records(Text.artifact_kind, "text", [corpus], {"field": "text", "round": i}, reader,
                                      str, cache, 1, False)
        for _ in range(20):
            assert sum(1 for _ in open(artifact.path / RECORDS)) == 2000
"""


def test_two_runs_resolving_one_corpus_at_once_share_its_object(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"text": "document {i} {"x" * 200}"}}\n' for i in range(2000)))
    script = tmp_path / "resolver.py"
    script.write_text(RESOLVER)
    start = f"{__import__('time').time() + 3:.3f}"
    children = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(corpus), start],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [c.communicate(timeout=120)[0] for c in children]
    assert [c.returncode for c in children] == [0, 0], outputs


def test_gc_names_what_an_input_was_read_into():
    from recipec.store.gc import references

    lock = {"nodes": {}, "inputs": {"w": {"converted_key": "k1", "converted_from_pickle": True},
                                    "corpus": {"glob": "data/*.jsonl", "converted_key": "k2"}}}
    assert references(lock) == {"k1": ["w (converted pickle)"], "k2": ["corpus (normalized records)"]}


@pytest.mark.parametrize("action, status", [(["gc"], 0), (["verify"], 0), (["rm", "abc"], 2)])
def test_cache_commands_on_no_cache_create_none(tmp_path, capsys, action, status):
    missing = tmp_path / "no-cache-here"
    code, _, err = run(["cache", *action, "--cache", str(missing)], capsys)
    assert code == status and f"there is no cache at {missing}" in err and not missing.exists()


def test_a_link_planted_in_the_cache_is_replaced_not_followed(tmp_path):
    cache = Cache(tmp_path / "cache")
    cache.home.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("not the cache's")
    (cache.home / "digests.json").symlink_to(victim)
    cache.remember_digest("identity", "blake3:" + "0" * 64)
    assert victim.read_text() == "not the cache's" and not (cache.home / "digests.json").is_symlink()
