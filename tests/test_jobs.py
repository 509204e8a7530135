"""Long jobs: work directories that survive a kill and resume, per-key locks between runs sharing a
cache, launched jobs in a worker process, progress in a job's own units, and the plan's time column.

The toy op `count(model, steps=, tag=)` is a package written by the test (so that recipec runs in
subprocesses and launched workers can import it): it counts to `steps`, checkpointing each step in the
job's work directory, then copies its input model as its result. `launched_count` is the same rule,
declared launchable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import tiny_llama
from recipec.store.cache import Cache

SRC = Path(__file__).resolve().parents[1] / "src"

TOY = '''
import json, os, shutil, signal, time
from pathlib import Path

from recipec.backends.job import RunFailure
from recipec.ir.types import Kind
from recipec.ops.base import REGISTRY, Input, Op, Params, register


class CountParams(Params):
    steps: int = 4
    tag: str = ""


def _log(line):
    with open(os.environ["TOY_LOG"], "a") as f:
        f.write(line + "\\n")


def build_count(job):
    """Count to `steps`, one checkpoint per step in the work directory; env TOY_KILL_AT kills the
    process (SIGKILL) right after that step's checkpoint, TOY_FAIL raises a RunFailure."""
    steps = job.node.params["steps"]
    checkpoint = job.work / "step.json"
    start = json.loads(checkpoint.read_text())["step"] if checkpoint.exists() else 0
    _log(f"start {job.node.params['tag']} {start} pid {os.getpid()}")
    job.progress.update(start, steps, "steps")
    for step in range(start + 1, steps + 1):
        time.sleep(float(os.environ.get("TOY_STEP_SECONDS", "0.05")))
        job.work.mkdir(parents=True, exist_ok=True)
        tmp = job.work / "step.json.tmp"
        tmp.write_text(json.dumps({"step": step}))
        os.replace(tmp, checkpoint)
        job.progress.update(step)
        if os.environ.get("TOY_KILL_AT") == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("TOY_FAIL") == str(step):
            raise RunFailure("E560", f"toy failure at step {step}", "a hint from the rule")
    source = job.inputs[0].path
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(source / name, job.out / name)
    _log(f"built {job.node.params['tag']}")
    return f"count-{steps}"


def _op(op_name, can_launch):
    class Count(Op):
        name = op_name
        inputs = (Input("model", Kind.MODEL),)
        toolchain = ()
        launchable = can_launch
        rule = "toyjobs.rules:build_count"
        Params = CountParams

        @classmethod
        def output_type(cls, ctx, inputs, params):
            return inputs[0].type

    return Count


for _name, _launch in (("count", False), ("launched_count", True)):
    if _name not in REGISTRY:
        register(_op(_name, _launch))
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy package on this process's path and every child's; a project with a tiny model."""
    package = tmp_path / "pkgs" / "toyjobs"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "rules.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SRC), str(package.parent)]))
    monkeypatch.setenv("TOY_LOG", str(tmp_path / "toy.log"))
    import toyjobs.rules  # noqa: F401  registers the ops here

    project = tmp_path / "project"
    tiny_llama(project / "base")
    yield project
    from recipec.ops import REGISTRY  # the toy ops are this test's only: later tests see the real registry

    for name in ("count", "launched_count"):
        REGISTRY.pop(name, None)
    for module in ("toyjobs.rules", "toyjobs"):
        sys.modules.pop(module, None)


def _recipe(project: Path, name: str, expr: str) -> Path:
    path = project / f"{name}.rcp"
    path.write_text(f'recipec 1\nbase = load("base")\nm = {expr}\nexport m to "out/{name}"\n')
    return path


def _log(project: Path) -> list[str]:
    log = project.parent / "toy.log"
    return log.read_text().splitlines() if log.exists() else []


def _cache() -> Path:
    return Path(os.environ["RECIPEC_CACHE"])


def _spawn(recipe: Path, *options: str, **env) -> subprocess.Popen:
    """`recipec run` in a child process that registers the toy ops first."""
    code = "import sys, toyjobs.rules; from recipec.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, "run", *options, str(recipe)], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(recipe: Path, capsys, *extra: str) -> tuple[int, str]:
    from recipec.cli import main

    status = main(["run", *extra, str(recipe)])
    return status, capsys.readouterr().err


def test_a_node_killed_mid_job_resumes_from_its_checkpoint(toy, capsys):
    recipe = _recipe(toy, "a", 'count(base, steps=5, tag="a")')
    child = _spawn(recipe, TOY_KILL_AT="3")
    child.communicate(timeout=120)
    assert child.returncode != 0
    work = Cache(_cache()).work
    [kept] = list(work.iterdir())
    assert json.loads((kept / "step.json").read_text()) == {"step": 3}
    assert not list((Cache(_cache()).objects).glob(kept.name))  # no result where a finished one is expected

    status, err = _run(recipe, capsys)
    assert status == 0, err
    assert "recipec: `m` goes on from what an unfinished run of it left" in err, err  # said, not silent
    assert [line.split(" pid")[0] for line in _log(toy)] == ["start a 0", "start a 3", "built a"]
    assert (Cache(_cache()).objects / kept.name).is_dir() and not kept.exists()  # committed: work dir gone
    assert (toy / "out" / "a" / "model.safetensors").is_file()


def test_gc_keeps_the_checkpoints_of_a_failed_first_build_until_asked(toy, capsys, monkeypatch):
    # The first build of a node has no lock yet: its checkpoints are what the next run resumes from.
    recipe = _recipe(toy, "b", 'count(base, steps=4, tag="b")')
    monkeypatch.setenv("TOY_FAIL", "2")
    status, err = _run(recipe, capsys)
    assert status == 1 and "toy failure at step 2" in err and "b.rcp:3:" in err  # located at the op
    [kept] = list((Cache(_cache()).work).iterdir())
    from recipec.cli import main

    assert main(["cache", "ls", "--cache", str(_cache())]) == 0
    assert f"{kept.name[:16]}  work" in capsys.readouterr().out
    assert main(["cache", "gc", "--cache", str(_cache())]) == 0
    assert "kept 1 work directory" in capsys.readouterr().err and kept.is_dir()
    assert main(["cache", "gc", "--checkpoints", "--dry-run", "--cache", str(_cache())]) == 0
    assert "would remove work directory" in capsys.readouterr().out and kept.is_dir()
    assert main(["cache", "gc", "--checkpoints", "--cache", str(_cache())]) == 0
    assert "removed work directory" in capsys.readouterr().out
    assert not kept.exists()


def test_a_rule_that_keeps_nothing_leaves_no_work_directory(toy, capsys):
    recipe = _recipe(toy, "c", 'count(base, steps=0, tag="c")')
    assert _run(recipe, capsys)[0] == 0
    assert not list((Cache(_cache()).work).glob("*"))


def test_runs_of_different_recipes_on_one_cache_overlap(toy, capsys):
    slow = _recipe(toy, "slow", 'count(base, steps=40, tag="slow")')
    fast = _recipe(toy, "fast", 'count(base, steps=1, tag="fast")')
    child = _spawn(slow, TOY_STEP_SECONDS="0.1")
    try:
        deadline = time.monotonic() + 60
        while not any(line.startswith("start slow") for line in _log(toy)):
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.05)
        status, err = _run(fast, capsys)
        assert status == 0, err
        assert child.poll() is None  # the slow node is still being built: the fast run did not wait
    finally:
        output = child.communicate(timeout=120)
    assert child.returncode == 0, output


def test_two_runs_of_one_recipe_build_the_node_once(toy):
    recipe = _recipe(toy, "same", 'count(base, steps=10, tag="same")')
    children = [_spawn(recipe, TOY_STEP_SECONDS="0.1") for _ in range(2)]
    outputs = [c.communicate(timeout=120) for c in children]
    assert [c.returncode for c in children] == [0, 0], outputs
    assert [line for line in _log(toy) if line.startswith("built")] == ["built same"]


def test_a_launched_job_runs_in_a_worker_and_reports_steps(toy, tmp_path):
    from recipec.check import lower_file
    from recipec.engine import Engine, RunOptions

    recipe = _recipe(toy, "l", 'launched_count(base, steps=6, tag="l")')
    seen = []
    options = RunOptions(cache_dir=_cache(), progress=lambda m: seen.append((m.done, m.total, m.unit)))
    result = Engine(lower_file(recipe), recipe, options).run()
    [built] = [r for r in result.results if r.status == "built"]
    assert built.artifact.digest
    pids = {line.split(" pid ")[1] for line in _log(toy) if " pid " in line}
    assert pids and str(os.getpid()) not in pids  # the rule ran in another process
    assert (6, 6, "steps") in seen
    assert not list((Cache(_cache()).work).glob("*"))  # control files and checkpoints gone with the commit


# A launcher that runs the worker as its grandchild, as `accelerate launch` and `torchrun` run ranks.
DEEP_LAUNCHER = f"sh -c '\"$0\" \"$@\" & wait' {sys.executable}"


@pytest.mark.parametrize("launcher", [None, DEEP_LAUNCHER], ids=["child", "grandchild"])
def test_a_launched_worker_dies_with_its_driver(toy, launcher):
    # SIGKILL gives the driver no chance to stop its worker: the kernel kills its child (PR_SET_PDEATHSIG,
    # set up between fork and exec without importing anything there), and a deeper worker sees its
    # driver gone and ends itself.
    recipe = _recipe(toy, "orphan", 'launched_count(base, steps=100000, tag="orphan")')
    options = ("--launch", launcher) if launcher else ()
    driver, worker = _spawn(recipe, *options, TOY_STEP_SECONDS="0.1"), None
    try:
        deadline = time.monotonic() + 60
        while not any(line.startswith("start orphan") for line in _log(toy)):
            assert time.monotonic() < deadline and driver.poll() is None, driver.communicate()
            time.sleep(0.05)
        [worker] = [int(line.split(" pid ")[1]) for line in _log(toy) if line.startswith("start orphan")]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)  # not communicate(): a live worker holds the driver's pipes open
        deadline = time.monotonic() + 30
        while _alive(worker):
            assert time.monotonic() < deadline, "the worker outlived its driver"
            time.sleep(0.05)
    finally:
        driver.kill()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)
        driver.communicate()


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", "pass"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare and the right to make a pid namespace")
def test_a_worker_in_another_pid_namespace_runs(toy, capsys):
    # There the driver's pid names another process, or none: the worker must not take that for its
    # driver's death (as under a container launcher, or srun on another host).
    recipe = _recipe(toy, "ns", 'launched_count(base, steps=3, tag="ns")')
    status, err = _run(recipe, capsys, "--launch", f"unshare --pid --fork --mount-proc {sys.executable}")
    assert status == 0, err
    assert [line.split(" pid")[0] for line in _log(toy)] == ["start ns 0", "built ns"]


def test_a_new_attempt_waits_for_the_workers_of_a_stopped_one(toy, capsys, monkeypatch):
    from recipec.backends.launch import hold_work

    recipe = _recipe(toy, "wait", 'launched_count(base, steps=3, tag="wait")')
    monkeypatch.setenv("TOY_FAIL", "2")
    assert _run(recipe, capsys)[0] == 1
    monkeypatch.delenv("TOY_FAIL")
    [kept] = list((Cache(_cache()).work).iterdir())
    lingering = hold_work(kept, exclusive=False)  # as a worker of a killed run still would
    try:
        driver = _spawn(recipe)
        deadline = time.monotonic() + 60
        while "waiting for the workers of a stopped run building `m` to end" not in driver.stderr.readline():
            assert time.monotonic() < deadline and driver.poll() is None
        time.sleep(0.5)
        assert driver.poll() is None and _log(toy)[-1].startswith("start wait 0")  # nothing new started
    finally:
        os.close(lingering)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 0, err
    assert [line.split(" pid")[0] for line in _log(toy)][-2:] == ["start wait 2", "built wait"]


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by init, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_a_launched_failure_is_located_at_the_op_and_the_prefix_is_used(toy, capsys, monkeypatch, tmp_path):
    recipe = _recipe(toy, "f", 'launched_count(base, steps=3, tag="f")')
    monkeypatch.setenv("TOY_FAIL", "2")
    status, err = _run(recipe, capsys, "--launch", f"{sys.executable} -X utf8")
    assert status == 1
    assert "f.rcp:3:5" in err and "toy failure at step 2" in err and "a hint from the rule" in err
    monkeypatch.delenv("TOY_FAIL")
    status, err = _run(recipe, capsys, "--launch", "no-such-launcher-here")
    assert status == 1 and "E560" in err and "no-such-launcher-here" in err
    status, err = _run(recipe, capsys)
    assert status == 0, err
    assert [line.split(" pid")[0] for line in _log(toy)][-2:] == ["start f 2", "built f"]  # resumed


def test_plan_shows_time_per_step_and_in_total(toy, capsys):
    from recipec.cli import main

    recipe = _recipe(toy, "p", 'count(base, steps=1, tag="p")')
    assert main(["plan", "--json", str(recipe)]) == 0
    data = json.loads(capsys.readouterr().out)
    step = next(s for s in data["steps"] if s["op"] == "count")
    assert step["cost"]["seconds"] >= 0 and step["cost"]["accelerator_bytes"] is None
    assert data["totals"]["seconds"] == pytest.approx(step["cost"]["seconds"])
    assert main(["plan", str(recipe)]) == 0
    assert textwrap.dedent(capsys.readouterr().out).count(" · ~") == 2  # the step's line and the totals
