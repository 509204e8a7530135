"""Exports never destroy data, and releases hold only what recipec knows (issue 6, items 1, 3a, 4).

Each test writes a recipe over tiny models (zero weights, no torch needed to make them), runs the CLI
as a user would, and looks at exit statuses, messages and files.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from helpers import run_cli, tiny_llama

MERGE = 'a = load("models/a")\nb = load("models/b")\nm = 0.5*a + 0.5*b\n'


run = run_cli


@pytest.fixture
def project(tmp_path) -> Path:
    """A recipe directory with two tiny input models."""
    for name in ("a", "b"):
        tiny_llama(tmp_path / "models" / name)
    return tmp_path


def recipe(project: Path, body: str, name: str = "r.rcp") -> Path:
    path = project / name
    path.write_text("recipec 1\n" + body)
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- check time: targets that would destroy a source ------------------------------------------------------


@pytest.mark.parametrize("target, code, words", [
    (".", "E310", "would replace the recipe's directory"),
    ("", "E312", "an export path is empty"),
    ("..", "E312", "leaves the recipe's directory"),
    ("../elsewhere", "E312", "write an absolute path"),
    ("models", "E310", "would replace an input of `a` (models/a), which is inside it"),
    ("models/a", "E310", "would replace an input of `a`"),
    ("models/a/out", "E310", "writes inside an input of `a`"),
    ("r.rcp", "E310", "would replace the recipe r.rcp"),
    ("r.rcp.lock", "E310", "would replace the lockfile r.rcp.lock"),
    (".recipec", "E310", "would replace the cache"),
])
def test_check_refuses_targets_that_destroy_sources(project, capsys, monkeypatch, target, code, words):
    monkeypatch.delenv("RECIPEC_CACHE")  # the default cache, beside the recipe
    before = snapshot(project)
    r = recipe(project, MERGE + f'export m to "{target}"\n')
    for verb in ("check", "run"):
        status, _, err = run([verb, str(r)], capsys)
        assert status == 65 and f"error[{code}]" in err and words in err, err
        assert "hint:" in err and f'export m to "{target}"\n' in err  # located at the path, with a hint
    assert snapshot(project) == before | {"r.rcp": r.read_bytes()}


def test_check_refuses_a_parent_directory_and_the_cache_by_absolute_path(project, capsys):
    cache = Path(os.environ["RECIPEC_CACHE"])
    r = recipe(project, MERGE + f'export m to "{project.parent}"\nexport m to "{cache / "objects"}"\n')
    status, _, err = run(["check", str(r)], capsys)
    assert status == 65, err
    assert "error[E310]: export to" in err and "would replace the recipe's directory, which is inside it" in err
    assert "writes inside the cache" in err


def test_run_rechecks_the_cache_it_really_uses(project, capsys):
    r = recipe(project, MERGE + 'export m to "store/out"\n')
    status, _, err = run(["run", str(r), "--cache", str(project / "store")], capsys)
    assert status == 65 and "error[E310]: export to 'store/out' writes inside the cache" in err, err
    assert not (project / "store" / "out").exists()


def test_overlapping_exports_are_refused_in_either_order(project, capsys):
    for first, second in (("out/a", "out/a/sub"), ("out/a/sub", "out/a")):
        r = recipe(project, MERGE + f'export m to "{first}"\nexport a to "{second}"\n')
        status, _, err = run(["check", str(r)], capsys)
        assert status == 65 and "error[E311]: exports overlap: 'out/a/sub' is inside 'out/a'" in err, err
        assert "note:" in err


def test_a_symlinked_target_is_judged_by_where_it_points(project, capsys):
    (project / "out").mkdir()
    (project / "out" / "link").symlink_to(project / "models" / "a")
    r = recipe(project, MERGE + 'export m to "out/link"\n')
    status, _, err = run(["check", str(r)], capsys)
    assert status == 65 and "error[E310]: export to 'out/link' would replace an input of `a`" in err, err


# --- run time: what is at the target ----------------------------------------------------------------------


def test_a_symlink_to_a_folder_of_user_files_is_refused(project, capsys):
    elsewhere = project.parent / f"{project.name}-elsewhere"
    elsewhere.mkdir()
    (elsewhere / "thesis.tex").write_text("years of work")
    (project / "out").mkdir()
    (project / "out" / "link").symlink_to(elsewhere)
    r = recipe(project, MERGE + 'export m to "out/link"\n')
    status, _, err = run(["run", str(r)], capsys)
    assert status == 1 and "error[E510]" in err and str(elsewhere) in err and "--force" in err, err
    assert snapshot(elsewhere) == {"thesis.tex": b"years of work"}


def test_an_existing_file_is_never_turned_into_a_folder(project, capsys):
    (project / "out").mkdir()
    (project / "out" / "model").write_text("a file")
    (project / "out" / "file").write_text("another")
    r = recipe(project, MERGE + 'export m to "out/model"\nexport a to "out/file/under"\n')
    for flags in ([], ["--force"]):
        status, _, err = run(["run", str(r), *flags], capsys)
        assert status == 1 and err.count("error[E511]") == 2 and "a file is in the way" in err, err
    assert (project / "out" / "model").read_text() == "a file"
    assert sorted(p.name for p in (project / "out").iterdir()) == ["file", "model"]


def test_a_user_folder_is_refused_and_with_force_moved_aside_and_kept(project, capsys):
    target = project / "out" / "model"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    r = recipe(project, MERGE + 'export m to "out/model"\n')
    status, _, err = run(["run", str(r)], capsys)
    assert status == 1 and "error[E510]" in err and str(target) in err and "--force" in err, err
    assert snapshot(target) == {"notes.txt": b"mine"}
    assert not (project / ".recipec").exists() or not any((project / ".recipec").rglob("objects/*"))

    status, out, err = run(["run", str(r), "--force"], capsys)
    assert status == 0, err
    (aside,) = [p for p in (project / "out").iterdir() if p.name.startswith("model.replaced-")]
    assert f"moved to {aside}" in err
    assert snapshot(aside) == {"notes.txt": b"mine"}
    assert (target / ".recipec-release").is_file() and not (target / "notes.txt").exists()


def test_an_empty_folder_and_a_previous_release_are_replaced(project, capsys):
    target = project / "out" / "model"
    target.mkdir(parents=True)
    r = recipe(project, MERGE + 'export m to "out/model"\n')
    assert run(["run", str(r)], capsys)[0] == 0
    marker = json.loads((target / ".recipec-release").read_text())
    assert marker["format"] == 1 and marker["recipe"] == "r.rcp" and marker["model_digest"].startswith("blake3:")
    r.write_text(r.read_text().replace("0.5*a + 0.5*b", "0.25*a + 0.75*b"))
    status, _, err = run(["run", str(r)], capsys)
    assert status == 0, err
    assert "0.25*a" in (target / "README.md").read_text()
    assert sorted(p.name for p in (project / "out").iterdir()) == ["model"]  # nothing moved aside or left


def test_a_release_with_files_added_or_edited_is_refused_and_with_force_kept(project, capsys):
    target = project / "out" / "model"
    r = recipe(project, MERGE + 'export m to "out/model"\n')
    assert run(["run", str(r)], capsys)[0] == 0
    assert run(["run", str(r)], capsys)[0] == 0  # as recipec wrote it: replaced
    (target / "NOTES.md").write_text("my evaluation notes")
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | {"rope_theta": 5e5}))  # editable, edited
    before = snapshot(target)
    status, _, err = run(["run", str(r)], capsys)
    assert status == 1 and "error[E512]" in err and "r.rcp:5:" in err, err
    assert "NOTES.md added" in err and "config.json changed" in err and "--force" in err, err
    assert snapshot(target) == before

    status, _, err = run(["run", str(r), "--force"], capsys)
    assert status == 0, err
    (aside,) = [p for p in (project / "out").iterdir() if p.name.startswith("model.replaced-")]
    assert f"moved to {aside}" in err and snapshot(aside) == before
    assert not (target / "NOTES.md").exists() and (target / ".recipec-release").is_file()


def test_read_only_weights_put_in_a_release_are_not_taken_for_recipecs(project, capsys):
    # Weights are read-only, but a read-only file moved in (from another release, say) is the user's.
    target = project / "out" / "model"
    r = recipe(project, MERGE + 'export m to "out/model"\n')
    assert run(["run", str(r)], capsys)[0] == 0
    mine = project / "mine.safetensors"
    mine.write_bytes(b"my own weights")
    mine.chmod(0o444)
    os.replace(mine, target / "model.safetensors")
    status, _, err = run(["run", str(r)], capsys)
    assert status == 1 and "error[E512]" in err and "model.safetensors changed" in err, err
    assert (target / "model.safetensors").read_bytes() == b"my own weights"


def test_where_files_were_moved_is_said_even_when_the_run_then_fails(project, capsys):
    target = project / "out" / "model"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    r = recipe(project, MERGE + 'export m to "out/model"\n')
    (project / "r.rcp.lock").mkdir()  # the lockfile cannot be written
    status, _, err = run(["run", str(r), "--force"], capsys)
    (aside,) = [p for p in (project / "out").iterdir() if p.name.startswith("model.replaced-")]
    assert status == 1 and "error[E504]: cannot write the lockfile" in err and f"moved to {aside}" in err, err


def test_a_release_missing_a_file_is_still_recipecs_to_replace(project, capsys):
    target = project / "out" / "model"
    r = recipe(project, MERGE + 'export m to "out/model"\n')
    assert run(["run", str(r)], capsys)[0] == 0
    (target / "README.md").unlink()  # nothing of anyone's is lost by replacing it
    status, _, err = run(["run", str(r)], capsys)
    assert status == 0, err
    assert (target / "README.md").is_file() and sorted(p.name for p in (project / "out").iterdir()) == ["model"]


def test_a_file_added_while_the_release_is_replaced_moves_it_aside(project, capsys, monkeypatch):
    # Between the check and the swap a file may still arrive: the old release is looked at again once
    # renamed away, and kept if it changed.
    from recipec.store import release

    target = project / "out" / "model"
    r = recipe(project, MERGE + 'export m to "out/model"\n')
    assert run(["run", str(r)], capsys)[0] == 0
    swap = release._swap_into_place

    def late_file(new, where, *rest):
        (where / "late.txt").write_text("written during the run")
        return swap(new, where, *rest)

    monkeypatch.setattr(release, "_swap_into_place", late_file)
    status, _, err = run(["run", str(r)], capsys)
    assert status == 0, err
    (aside,) = [p for p in (project / "out").iterdir() if p.name.startswith("model.replaced-")]
    assert (aside / "late.txt").read_text() == "written during the run" and f"moved to {aside}" in err


def test_a_swap_that_fails_between_its_renames_puts_the_previous_release_back(project, capsys, monkeypatch):
    from recipec.store import release

    target = project / "out" / "model"
    r = recipe(project, MERGE + 'export m to "out/model"\n')
    assert run(["run", str(r)], capsys)[0] == 0
    before = snapshot(target)
    r.write_text(r.read_text().replace("0.5*a + 0.5*b", "0.25*a + 0.75*b"))
    rename = os.rename

    def interrupted(source, dest):
        if Path(source).name.startswith(".recipec-tmp-model-"):  # the new release, about to take its place
            raise KeyboardInterrupt
        rename(source, dest)

    monkeypatch.setattr(release.os, "rename", interrupted)
    assert run(["run", str(r)], capsys)[0] == 130
    monkeypatch.undo()
    assert snapshot(target) == before and sorted(p.name for p in (project / "out").iterdir()) == ["model"]


@pytest.mark.parametrize("changed", [False, True])
def test_a_release_a_killed_swap_left_renamed_away_is_put_back_or_kept(project, capsys, monkeypatch, changed):
    # Killed between the two renames: the previous release lies under its temporary name. The next export
    # puts it back where nothing took its place, and keeps it aside where it was changed by the user.
    import subprocess
    import sys

    target = project / "out" / "model"
    r = recipe(project, MERGE + 'export m to "out/model"\n')
    assert run(["run", str(r)], capsys)[0] == 0
    if changed:
        (target / "notes.txt").write_text("mine")
    before, card = snapshot(target), (target / "README.md").stat().st_ino
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = project / "out" / f".recipec-old-{dead.pid}-model"
    os.rename(target, old)
    # What another export's killed run left (a half-written release for a target named `old-model`, in the
    # older naming) is never taken for this target's previous release.
    (project / "out" / f".recipec-tmp-old-model-{dead.pid}").mkdir()
    (project / "out" / f".recipec-tmp-old-model-{dead.pid}" / "config.json").write_text("{}")
    if changed:  # the new release had arrived when the run was killed
        shutil.copytree(old, target, ignore=shutil.ignore_patterns("notes.txt"))
        status, _, err = run(["run", str(r)], capsys)
        assert status == 0, err
        (aside,) = [p for p in (project / "out").iterdir() if p.name.startswith("model.replaced-")]
        assert snapshot(aside) == before and (target / ".recipec-release").is_file()
        assert f"is kept as {aside}" in err
    else:  # and the next export fails too, writing its release (a full disk): the previous one is back
        from recipec.store import release

        def full(file, dest):
            raise OSError(28, "No space left on device", str(dest))

        monkeypatch.setattr(release, "_put", full)
        status, _, err = run(["run", str(r)], capsys)
        assert status != 0 and "No space left on device" in err, err
        assert snapshot(target) == before and (target / "README.md").stat().st_ino == card  # put back, not rewritten
    assert not [p for p in (project / "out").iterdir() if p.name.startswith((".recipec-tmp", ".recipec-old"))]


def test_a_weight_link_that_cannot_be_made_read_only_is_copied_never_written_through(project, capsys, monkeypatch):
    # Linked, then chmod refused (someone else's cache, root squashed): the copy that follows must not be
    # written through the link, which is the cache's own file.
    from recipec.store import release

    chmod = os.chmod

    def refused(path, mode, *args, **kwargs):
        if Path(path).name == "model.safetensors" and os.stat(path).st_nlink > 1:
            raise PermissionError(1, "Operation not permitted", str(path))
        chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(release.os, "chmod", refused)
    r = recipe(project, MERGE + 'export m to "out/model"\n')
    status, _, err = run(["run", str(r)], capsys)
    assert status == 0, err
    weights = project / "out" / "model" / "model.safetensors"
    assert weights.stat().st_nlink == 1 and weights.stat().st_size > 0
    monkeypatch.undo()
    status, _, err = run(["cache", "verify", str(r)], capsys)
    assert status == 0 and "damaged" not in err, err
    assert run(["run", "--locked", str(r)], capsys)[0] == 0


def test_an_input_reached_under_another_name_is_not_an_export_target(project):
    # One folder, two names (here a bind mount; a case-insensitive filesystem does the same): exporting to
    # the other name would replace the input. Judged by identity, not only by name.
    import shutil
    import subprocess
    import sys

    if not shutil.which("unshare"):
        pytest.skip("no unshare")
    (project / "alias").mkdir()
    r = recipe(project, 'a = load("models/a")\nb = load("models/b")\nexport 0.5*a + 0.5*b to "alias/a"\n')
    script = (f"mount --bind {project / 'models'} {project / 'alias'} && "
              f"{sys.executable} -m recipec check {r}")
    done = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script],
                          capture_output=True, text=True, cwd=project)
    if "mount" in done.stderr and "error[" not in done.stderr:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    assert done.returncode == 65 and "error[E310]: export to 'alias/a' would replace an input of `a` (models/a)\n" \
        in done.stderr, done.stderr  # the same folder, not one "inside it"


def test_an_export_to_another_filesystem_is_copied(project, capsys, monkeypatch):
    # Hard links and copy_file_range both fail across filesystems (EXDEV, on kernels since 5.19 for the
    # latter): the weights are then copied read-only through sendfile.
    import errno

    from recipec.store import release

    def cross_device(*args, **kwargs):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(release.os, "link", cross_device)
    monkeypatch.setattr(release.os, "copy_file_range", cross_device)
    r = recipe(project, MERGE + 'export m to "out/model"\n')
    status, _, err = run(["run", str(r)], capsys)
    assert status == 0, err
    weights = project / "out" / "model" / "model.safetensors"
    assert weights.stat().st_nlink == 1 and stat.S_IMODE(weights.stat().st_mode) == 0o444
    assert run(["verify", str(r)], capsys)[0] == 0


def test_an_export_is_copied_where_the_kernel_copies_nothing(project, capsys, monkeypatch):
    # macOS has no copy_file_range, and its sendfile writes only to sockets: a buffered copy then.
    import errno

    from recipec.store import release

    def no_links(*args, **kwargs):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(release.os, "link", no_links)
    monkeypatch.setattr(release, "_KERNEL_COPIES", [])
    r = recipe(project, MERGE + 'export m to "out/model"\n')
    assert run(["run", str(r)], capsys)[0] == 0
    assert run(["verify", str(r)], capsys)[0] == 0


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
def test_an_export_to_another_real_filesystem(project, capsys, tmp_path_factory):
    target = Path("/dev/shm") / f"recipec-test-{os.getpid()}-{tmp_path_factory.mktemp('x').name}"
    if os.stat("/dev/shm").st_dev == os.stat(project).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the tests' temporary folders")
    r = recipe(project, MERGE + f'export m to "{target}"\n')
    try:
        status, _, err = run(["run", str(r)], capsys)
        assert status == 0, err
        assert (target / "model.safetensors").stat().st_size > 0 and (target / ".recipec-release").is_file()
    finally:
        import shutil

        shutil.rmtree(target, ignore_errors=True)


def test_a_release_of_another_recipe_is_replaced_with_a_notice(project, capsys):
    first = recipe(project, MERGE + 'export m to "out/model"\n', "first.rcp")
    second = recipe(project, MERGE.replace("0.5*a + 0.5*b", "0.25*a + 0.75*b") + 'export m to "out/model"\n',
                    "second.rcp")
    assert run(["run", str(first)], capsys)[0] == 0
    status, _, err = run(["run", str(second)], capsys)
    assert status == 0 and "out/model was a release of first.rcp; it is this recipe's now" in err, err
    status, _, err = run(["run", str(second)], capsys)
    assert status == 0 and "was a release of" not in err, err


def test_a_release_leaves_no_stray_file_beside_it(project, capsys):
    r = recipe(project, MERGE + 'export m to "out/model"\n')
    (project / "out").mkdir()
    (project / "out" / ".recipec-tmp-mine").write_text("not recipec's: it does not name it so")
    assert run(["run", str(r)], capsys)[0] == 0
    assert sorted(p.name for p in (project / "out").iterdir()) == [".recipec-tmp-mine", "model"]


# --- release files ----------------------------------------------------------------------------------------


def test_editing_a_release_config_changes_no_other_release_or_the_cache(project, capsys):
    r = recipe(project, MERGE + 'export m to "out/a"\n')
    other = recipe(project, MERGE + 'export m to "release/b"\n', "other.rcp")
    assert run(["run", str(r)], capsys)[0] == 0
    assert run(["run", str(other)], capsys)[0] == 0
    a, b = project / "out" / "a", project / "release" / "b"
    with open(a / "config.json", "r+") as f:  # an edit in place, as an editor or `sed -i` may do
        f.seek(0)
        f.write("{\"edited\": 1,")
    assert (b / "config.json").read_bytes() != (a / "config.json").read_bytes()
    for name in ("config.json", "README.md", "SHA256SUMS", ".recipec-release"):
        assert (a / name).stat().st_nlink == 1 and stat.S_IMODE((a / name).stat().st_mode) == 0o644
    weights = a / "model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == 0o444  # shared with the cache, so read-only
    status, _, err = run(["run", str(other)], capsys)
    assert status == 0 and "Built 0" in err, err  # the cache object is intact


def models_with_code(project: Path) -> Path:
    model = tiny_llama(project / "models" / "withcode")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModel": "modeling_evil.EvilModel"}}))
    (model / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]},
                                                             "model_max_length": 64}))
    (model / "modeling_evil.py").write_text("import os; os.system('echo pwned')\n")
    (model / "notes.txt").write_text("unknown")
    (model / "special_tokens_map.json").write_text("{}")
    return model


def test_a_direct_export_ships_only_known_data_files_without_code_references(project, capsys):
    models_with_code(project)
    r = recipe(project, 'c = load("models/withcode")\nexport c to "out/direct"\n'
                        'export 0.5*c + 0.5*load("models/a") to "out/merged"\n')
    status, _, err = run(["check", str(r)], capsys)
    assert status == 0 and "warning[E313]" in err and "`auto_map`" in err and "remote_code=true" in err, err
    status, _, err = run(["run", str(r)], capsys)
    assert status == 0 and "warning[E313]" in err, err
    direct = project / "out" / "direct"
    assert sorted(p.name for p in direct.iterdir()) == sorted([
        ".recipec-release", "README.md", "SHA256SUMS", "config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer_config.json"])
    for release in (direct, project / "out" / "merged"):
        assert "auto_map" not in (release / "config.json").read_text()
        sums = dict(line.split("  ")[::-1] for line in (release / "SHA256SUMS").read_text().splitlines())
        from recipec.store.filehash import hash_file
        assert {name: hash_file(release / name) for name in sums} == sums
    assert "auto_map" not in (direct / "tokenizer_config.json").read_text()
    assert json.loads((direct / "tokenizer_config.json").read_text())["model_max_length"] == 64


def test_remote_code_true_keeps_the_references_but_never_the_code(project, capsys):
    models_with_code(project)
    r = recipe(project, 'export load("models/withcode", remote_code=true) to "out/direct"\n')
    status, _, err = run(["run", str(r)], capsys)
    assert status == 0 and "E313" not in err, err
    direct = project / "out" / "direct"
    assert "auto_map" in (direct / "config.json").read_text()
    assert not (direct / "modeling_evil.py").exists()


def test_an_input_file_linking_outside_its_directory_is_refused(project, capsys):
    outside = project / "secret.json"
    outside.write_text("{}")
    (project / "models" / "a" / "tokenizer.json").symlink_to(outside)
    r = recipe(project, MERGE + 'export m to "out/model"\n')
    for verb in ("check", "run"):
        status, _, err = run([verb, str(r)], capsys)
        assert status == 65 and "error[E314]: tokenizer.json in" in err and "links outside" in err, err
    assert not (project / "out").exists()


def test_a_hub_snapshot_may_link_into_its_own_blobs(project, capsys):
    hub = Path(os.environ["HF_HUB_CACHE"]) / "models--org--snap"
    snapshot_dir = tiny_llama(hub / "snapshots" / ("0" * 40))
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("0" * 40)
    (hub / "blobs").mkdir()
    for name in ("config.json", "model.safetensors"):
        (snapshot_dir / name).rename(hub / "blobs" / name)
        (snapshot_dir / name).symlink_to(Path("../../blobs") / name)
    r = recipe(project, 'export hf("org/snap") to "out/model"\n')
    status, _, err = run(["run", str(r), "--offline"], capsys)
    assert status == 0, err
    assert (project / "out" / "model" / "model.safetensors").is_file()
