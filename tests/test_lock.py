"""The lockfile's promises: inputs known by every file, a lock that `run --locked` and `verify` enforce,
and builds (keys, digests, locks) that do not depend on where the project lies."""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from pathlib import Path

import pytest

from helpers import SLOW_EXAMPLES, run_cli, tiny_llama
from recipec.store.cache import Cache

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"
RECIPE = 'recipec 1\na = load("models/a")\nb = load("models/b")\nexport a + 0.5*(b - a) to "out/m"\n'
DATA_FILES = {  # every non-weight file of an input that can reach the release, and a valid edit of it
    "config.json": None,  # edited as JSON below: a config field
    "generation_config.json": {"temperature": 0.7},
    "tokenizer.json": {"model": {"vocab": {"<s>": 0, "a": 1}}, "added_tokens": []},
    "tokenizer_config.json": {"model_max_length": 64},
    "chat_template.jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
}


run = run_cli


def write_data_file(root: Path, name: str, value) -> None:
    text = value if isinstance(value, str) else json.dumps(value, indent=2)
    (root / name).write_text(text)


def lock_file(recipe: Path) -> Path:
    return recipe.with_name(recipe.name + ".lock")


@pytest.fixture
def project(tmp_path) -> Path:
    """Two tiny local models with every data file, and a recipe combining them."""
    for name in ("a", "b"):
        root = tiny_llama(tmp_path / "models" / name)
        for file, value in DATA_FILES.items():
            if value is not None:
                write_data_file(root, file, value)
    recipe = tmp_path / "r.rcp"
    recipe.write_text(RECIPE)
    return recipe


def edit(recipe: Path, name: str, n: int) -> str:
    """Change `name` in both inputs (the release takes it from one or the other); returns what to find."""
    marker = f"edited-{n}"
    for model in ("a", "b"):
        path = recipe.parent / "models" / model / name
        if name.endswith(".json"):
            data = json.loads(path.read_text())
            data["recipec_test"] = marker
            path.write_text(json.dumps(data, indent=2))
        else:
            path.write_text(path.read_text() + marker)
    return marker


def built_nodes(out: str) -> list[str]:
    return [n["label"] for n in json.loads(out)["nodes"] if n["status"] == "built"]


def test_every_data_file_of_an_input_is_part_of_its_identity(project, capsys):
    assert run(["run", project], capsys)[0] == 0
    for n, name in enumerate(DATA_FILES):
        assert run(["lock", project], capsys)[0] == 0
        marker = edit(project, name, n)
        status, _, err = run(["run", "--locked", project], capsys)
        assert status == 65 and f"input `a` file {name} differs from r.rcp.lock" in err, (name, err)
        status, out, err = run(["run", "--json", project], capsys)
        assert status == 0 and built_nodes(out) == ["%2"], (name, err)  # rebuilt, not "1 cached"
        assert marker in (project.parent / "out" / "m" / name).read_text(), name


def test_same_weights_with_another_config_is_another_input(tmp_path, capsys):
    tiny_llama(tmp_path / "models" / "a")
    tiny_llama(tmp_path / "models" / "b", rope_theta=1234.0)
    recipe = tmp_path / "r.rcp"
    recipe.write_text(RECIPE)
    assert run(["lock", recipe], capsys)[0] == 0
    inputs = tomllib.loads(lock_file(recipe).read_text())["inputs"]
    assert inputs["a"]["digest"] != inputs["b"]["digest"]
    assert inputs["a"]["path"] == "models/a"  # relative to the recipe: the lock moves with the project
    assert {f["name"] for f in inputs["a"]["files"]} == {"config.json", "model.safetensors"}


def test_plan_knows_a_local_input_is_cached_after_a_run(project, capsys):
    assert run(["run", project], capsys)[0] == 0
    status, out, _ = run(["plan", "--json", project], capsys)
    assert status == 0 and json.loads(out)["summary"]["build"] == 0
    edit(project, "config.json", 0)
    assert json.loads(run(["plan", "--json", project], capsys)[1])["summary"]["build"] == 1


def tamper(recipe: Path, old: str, new: str) -> str:
    text = lock_file(recipe).read_text()
    assert old in text
    lock_file(recipe).write_text(text.replace(old, new, 1))
    return lock_file(recipe).read_text()


def test_run_locked_refuses_a_tampered_key_digest_or_output_and_never_writes_the_lock(project, capsys):
    assert run(["run", project], capsys)[0] == 0
    good = lock_file(project).read_text()
    lock = tomllib.loads(good)
    node = lock["nodes"]["%2"]
    sums = {f["name"]: f["sha256"] for f in lock["outputs"]["out/m"]["files"]}
    cases = [(node["key"], "0" * 64, "the key of node `%2`"),
             (node["digest"], "blake3:" + "0" * 64, "the digest of node `%2`"),
             (sums["config.json"], "0" * 64, "output out/m: file config.json")]
    released = project.parent / "out" / "m" / "config.json"
    before = released.stat().st_ino
    for old, new, named in cases:
        tampered = tamper(project, old, new)
        status, _, err = run(["run", "--locked", project], capsys)
        assert status == 65 and f"error[E506]: {named}" in err and "differs from r.rcp.lock" in err, err
        assert lock_file(project).read_text() == tampered  # never rewritten
        assert released.stat().st_ino == before  # and the release that matched the lock is still there
        lock_file(project).write_text(good)
    status, _, err = run(["run", "--locked", project], capsys)
    assert status == 0 and lock_file(project).read_text() == good


def test_run_locked_names_the_file_parameter_whose_content_moved_the_key(project, capsys):
    # The recipe's text, the toolchain and the inputs all match the lock; only a file a parameter names
    # was edited. The lock records each node's keyed parameters, so the message can say which.
    template = project.parent / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tokenizer = project.parent / "tok"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(project.parent / "models" / "a" / name, tokenizer / name)
    project.write_text('recipec 1\na = load("models/a")\nb = load("models/b")\n'
                       'm = combine(a + 0.5*(b - a), tokenizer="tok", chat_template="chat.jinja")\n'
                       'export m to "out/m"\n')
    assert run(["run", project], capsys)[0] == 0
    assert tomllib.loads(lock_file(project).read_text())["nodes"]["m"]["params"]["coefficients"] == [0.5, 0.5]
    template.write_text(template.read_text() + "\n")
    status, _, err = run(["run", "--locked", project], capsys)
    assert status == 65, err
    assert "error[E506]: parameter `chat_template` (the file's content) of node `m` differs" in err, err
    write_data_file(tokenizer, "tokenizer_config.json", {"model_max_length": 65})
    status, _, err = run(["run", "--locked", project], capsys)
    assert status == 65 and ("error[E506]: parameters `chat_template` (the file's content); `tokenizer` (file "
                             "tokenizer_config.json) of node `m`") in err, err


def test_a_lock_of_format_2_is_still_read_and_a_drifted_key_named_as_before(project, capsys):
    assert run(["run", project], capsys)[0] == 0
    lock = tomllib.loads(lock_file(project).read_text())
    text = lock_file(project).read_text().replace("version = 3", "version = 2", 1)
    text = text[:text.index("[nodes.\"%2\".params]")] + text[text.index("[outputs."):]  # format 2 had no params
    lock_file(project).write_text(text)
    assert "params" not in tomllib.loads(text)["nodes"]["%2"]
    assert run(["run", "--locked", project], capsys)[0] == 0
    tamper(project, lock["nodes"]["%2"]["key"], "0" * 64)
    status, _, err = run(["run", "--locked", project], capsys)
    assert status == 65 and "error[E506]: the key of node `%2`" in err, err


def test_the_lock_and_the_caches_root_are_written_while_the_run_holds_the_cache(project, capsys, monkeypatch):
    # `cache gc` takes the cache exclusively: were the root registered after the run let go, a gc in
    # between would find the new objects unreferenced and remove them.
    import fcntl

    held = []

    def register_root(cache, lock, references, building=False):
        if building:  # a result committed: the run registers it at once, before its lock exists
            return
        with open(cache.home / ".lock", "a+") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)

    monkeypatch.setattr(Cache, "register_root", register_root)
    assert run(["run", project], capsys)[0] == 0
    assert run(["lock", project], capsys)[0] == 0
    assert held == [True, True]


def test_a_lockfile_that_cannot_be_written_is_an_error_not_a_traceback(project, capsys, monkeypatch):
    from recipec.store import lockfile

    def refused(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(lockfile, "write_lock", refused)
    status, _, err = run(["run", project], capsys)
    assert status != 0 and "error[E504]: cannot write the lockfile" in err and "Permission denied" in err, err
    assert "Traceback" not in err and "run again" in err
    assert (project.parent / "out" / "m" / "model.safetensors").is_file()
    # What the run built is not garbage for gc, though no lockfile names it yet (as after a killed first run).
    status, _, err = run(["cache", "gc", str(project)], capsys)
    assert status == 0 and "removed 0 objects" in err and "its run did not finish?" in err, err


def test_run_locked_does_not_wait_for_another_run_on_the_cache(project, capsys):
    # Another run holds the cache (shared, as runs do); checking the inputs against the lock may not
    # wait for it to end.
    import fcntl
    import subprocess
    import sys

    assert run(["run", project], capsys)[0] == 0
    with open(Cache(Path(os.environ["RECIPEC_CACHE"])).home / ".lock", "a+") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_SH)
        done = subprocess.run([sys.executable, "-m", "recipec", "run", "--locked", str(project)],
                              capture_output=True, text=True, timeout=120, cwd=project.parent)
    assert done.returncode == 0 and "waiting" not in done.stderr, done.stderr


def test_a_tampered_key_is_refused_before_anything_is_built(project, capsys):
    assert run(["lock", project], capsys)[0] == 0
    tamper(project, tomllib.loads(lock_file(project).read_text())["nodes"]["%2"]["key"], "0" * 64)
    shutil.rmtree(project.parent / "out", ignore_errors=True)
    status, out, err = run(["run", "--locked", "--cache", project.parent / "fresh", project], capsys)
    assert status == 65 and "the key of node `%2`" in err
    objects = Cache(project.parent / "fresh").objects
    assert not objects.exists() or not any(objects.iterdir())
    assert not (project.parent / "out").exists()


def test_verify_compares_keys_digests_and_output_hashes(project, capsys):
    assert run(["run", project], capsys)[0] == 0
    status, _, err = run(["verify", project], capsys)
    assert status == 0 and "verified: 1 node, 2 inputs, 1 export (" in err and "files on disk" in err
    good = lock_file(project).read_text()
    lock = tomllib.loads(good)
    sums = {f["name"]: f["sha256"] for f in lock["outputs"]["out/m"]["files"]}
    cases = [(lock["nodes"]["%2"]["key"], "0" * 64, "the key of node `%2`"),
             (lock["nodes"]["%2"]["digest"], "blake3:" + "0" * 64, "the digest of node `%2`"),
             (sums["model.safetensors"], "0" * 64, "output out/m: file model.safetensors")]
    for old, new, named in cases:
        tamper(project, old, new)
        status, _, err = run(["verify", project], capsys)
        assert status == 1 and f"error[E507]: {named}" in err and "differs from the lock" in err, err
        lock_file(project).write_text(good)


def test_verify_names_the_edited_file_not_the_sums(project, capsys):
    assert run(["run", project], capsys)[0] == 0
    config = project.parent / "out" / "m" / "config.json"
    text = config.read_text()
    config.unlink()  # the release's file may be shared with the cache: replace it, as an editor would
    config.write_text(text.replace("10000", "20000") if "10000" in text else text + " ")
    status, _, err = run(["verify", project], capsys)
    assert status == 1 and "error[E507]: out/m: config.json differs" in err, err


def test_verify_claims_no_export_a_lock_does_not_record(project, capsys):
    assert run(["lock", project], capsys)[0] == 0  # `lock` records no outputs and writes none
    status, _, err = run(["verify", project], capsys)
    assert status == 0 and "export" not in err.splitlines()[0] and "no export was compared" in err, err


def test_lock_after_run_keeps_the_outputs_run_recorded(project, capsys):
    assert run(["run", project], capsys)[0] == 0
    outputs = tomllib.loads(lock_file(project).read_text())["outputs"]
    assert outputs
    status, _, err = run(["lock", project], capsys)
    assert status == 0 and "records no outputs" not in err, err
    locked = tomllib.loads(lock_file(project).read_text())
    assert locked["outputs"] == outputs and all("files" in i for i in locked["inputs"].values())
    status, _, err = run(["verify", project], capsys)
    assert status == 0 and "no export was compared" not in err, err
    # Once a result changes, the old outputs no longer hold, and `lock` says where they went.
    project.write_text(RECIPE.replace("0.5*(b - a)", "0.25*(b - a)"))
    status, _, err = run(["lock", project], capsys)
    assert status == 0 and "the lock records no outputs now" in err and "`recipec run`" in err, err
    assert not tomllib.loads(lock_file(project).read_text())["outputs"]


@pytest.mark.parametrize("text, says", [
    ("this is [not toml", "is not a valid lockfile"),
    ('version = 2\ninputs = "x"\n', "`recipe`"),
    ("version = 99\n", "lock format version 99"),
])
def test_an_unusable_lockfile_is_refused_before_anything_is_built(project, capsys, text, says):
    lock_file(project).write_text(text)
    for verb in (["run", "--locked"], ["verify"]):
        status, _, err = run([*verb, project], capsys)
        assert status == 65 and "error[E520]" in err and says in err and "recipec lock" in err, err
    assert not (project.parent / "out").exists()
    assert run(["run", project], capsys)[0] == 0  # a plain run replaces it
    assert tomllib.loads(lock_file(project).read_text())["version"] == 3


def test_the_wrong_shape_is_named(project, capsys):
    assert run(["lock", project], capsys)[0] == 0
    tamper(project, "[inputs.a]", '[inputs.z]\nop = 1\n[inputs.a]')
    status, _, err = run(["run", "--locked", project], capsys)
    assert status == 65 and "error[E520]" in err and "`inputs.z" in err, err


def copy_examples(target: Path, with_locks: bool) -> Path:
    skipped = ("out", ".recipec") + (() if with_locks else ("*.lock",))
    shutil.copytree(EXAMPLES, target, ignore=shutil.ignore_patterns(*skipped))
    return target


def test_locks_do_not_depend_on_where_the_project_lies(tmp_path, capsys):
    first = copy_examples(tmp_path / "one", with_locks=False)
    second = copy_examples(tmp_path / "elsewhere" / "deeper" / "two", with_locks=False)
    for root in (first, second):
        status, out, err = run(["run", "--json", root / "chat_vector_zh.rcp"], capsys)
        assert status == 0, err
    assert built_nodes(out) == []  # the same keys in both places: the shared cache holds every node
    lock = lock_file(first / "chat_vector_zh.rcp").read_text()
    assert lock == lock_file(second / "chat_vector_zh.rcp").read_text()
    assert str(tmp_path) not in lock
    digests = [n["digest"] for n in tomllib.loads(lock)["nodes"].values()]
    assert all(d.startswith("blake3:") for d in digests) and len(set(digests)) == len(digests)


def test_committed_locks_hold_at_any_path(tmp_path, capsys):
    copy = copy_examples(tmp_path / "a" / "fresh clone", with_locks=True)
    for recipe in sorted(r for r in copy.glob("*.rcp") if r.name not in SLOW_EXAMPLES):
        committed = lock_file(recipe).read_text()
        status, _, err = run(["run", "--locked", recipe], capsys)
        assert status == 0, (recipe.name, err)
        assert lock_file(recipe).read_text() == committed
    status, _, err = run(["verify", copy / "chat_vector_zh.rcp"], capsys)
    assert status == 0, err


def test_a_model_bound_to_a_string_is_named_by_its_binding(project, capsys):
    project.write_text('recipec 1\nbase = "models/a"\nchat = "models/b"\nexport base + 0.5*(chat - base) to "out/m"\n')
    status, out, _ = run(["plan", project], capsys)
    assert status == 0 and '< base  "models/a"' in out and '< chat  "models/b"' in out and "%0" not in out, out
    assert run(["run", project], capsys)[0] == 0
    assert set(tomllib.loads(lock_file(project).read_text())["inputs"]) == {"base", "chat"}


def test_a_parameter_toml_cannot_hold_is_recorded_as_json_or_its_hash(tmp_path, capsys):
    # init(config=...) keys the whole config; a null inside a list has no TOML form (it ended run and lock
    # in an internal error, after the release was written).
    from recipec.arch import preset_config

    config = preset_config("llama", "tiny") | {"extra_list": [1, None]}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    recipe = tmp_path / "r.rcp"
    recipe.write_text('recipec 1\nm = init("llama", config="cfg.json", seed=1)\nexport m to "out/m"\n')
    assert run(["run", recipe], capsys)[0] == 0
    recorded = tomllib.loads(lock_file(recipe).read_text())["nodes"]["m"]["params"]
    assert recorded["seed"] == 1 and recorded["config"].startswith("sha256:")
    assert run(["run", "--locked", recipe], capsys)[0] == 0
    (tmp_path / "cfg.json").write_text(json.dumps(config | {"extra_list": [2, None]}))
    status, _, err = run(["run", "--locked", recipe], capsys)
    assert status == 65 and "error[E506]: parameter `config` (its content) of node `m` differs" in err, err
