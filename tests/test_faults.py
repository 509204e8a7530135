"""Bad inputs and faults at run time: each gets a diagnostic, never a traceback, and nothing is lost."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import run_cli, tiny_llama, write_model
from recipec.arch import preset_config
from recipec.store.cache import Cache

CHAT_VECTOR = ('recipec 1\nbase = load("models/base")\nchat = load("models/chat")\ncp = load("models/cp")\n'
               'export cp + 0.8*(chat - base) to "out/model"\n')


run = run_cli


def random_model(root: Path, seed: int, config: dict | None = None) -> Path:
    """A model directory with real (random) weights, written by transformers itself."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**(config or preset_config("llama", "tiny"))))
    model.save_pretrained(root)
    return root


@pytest.fixture
def chat_vector(tmp_path) -> Path:
    for seed, name in enumerate(("base", "chat", "cp")):
        random_model(tmp_path / "models" / name, seed)
    recipe = tmp_path / "cv.rcp"
    recipe.write_text(CHAT_VECTOR)
    return recipe


def flip_bytes_in_data(path: Path) -> None:
    """Same-size corruption: flip bytes near the end of the data region (safetensors has no checksum)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_locked_run_refuses_recipe_and_input_drift(chat_vector, capsys):
    assert run(["lock", str(chat_vector)], capsys)[0] == 0
    lock = chat_vector.with_name("cv.rcp.lock").read_text()
    assert "sha256" in lock and 'op = "load"' in lock and "[[inputs.chat.files]]" in lock
    assert run(["run", "--locked", str(chat_vector)], capsys)[0] == 0

    flip_bytes_in_data(chat_vector.parent / "models" / "chat" / "model.safetensors")
    status, _, err = run(["run", "--locked", str(chat_vector)], capsys)
    assert status == 65
    assert "error[E506]: input `chat` file model.safetensors differs from cv.rcp.lock" in err

    chat_vector.write_text(CHAT_VECTOR.replace("0.8", "0.5"))
    status, _, err = run(["run", "--locked", str(chat_vector)], capsys)
    assert status == 65 and "the recipe text differs" in err


def test_verify_names_the_first_differing_file_and_tensor(chat_vector, capsys):
    assert run(["run", str(chat_vector)], capsys)[0] == 0
    assert run(["verify", str(chat_vector)], capsys)[0] == 0
    flip_bytes_in_data(chat_vector.parent / "out" / "model" / "model.safetensors")
    status, _, err = run(["verify", str(chat_vector)], capsys)
    assert status == 1
    assert "error[E507]: out/model: model.safetensors differs, first at tensor `model.norm.weight`" in err


def test_verify_and_locked_need_a_lockfile(chat_vector, capsys):
    status, _, err = run(["verify", str(chat_vector)], capsys)
    assert status == 66 and "error[E508]: no lockfile" in err and "recipec lock" in err


def test_pickles_are_refused_unless_allowed_and_then_read_safely(tmp_path, capsys):
    model = random_model(tmp_path / "models" / "pickled", 0)
    state = {k: v.clone() for k, v in
             __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(model / "model.safetensors")).items()}
    torch.save(state, model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    recipe = tmp_path / "p.rcp"
    recipe.write_text('recipec 1\nexport load("models/pickled") to "out/p"\n')
    status, _, err = run(["run", str(recipe)], capsys)
    assert status == 65 and "error[E509]" in err and "allow_pickle=true" in err
    recipe.write_text('recipec 1\nexport load("models/pickled", allow_pickle=true) to "out/p"\n')
    assert run(["run", str(recipe)], capsys)[0] == 0
    from safetensors.torch import load_file
    out = load_file(str(tmp_path / "out" / "p" / "model.safetensors"))
    assert out.keys() == state.keys() and all(torch.equal(out[k], state[k]) for k in state)

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tiny_llama(tmp_path / "models" / "evil")
    (evil / "model.safetensors").unlink()
    torch.save({"x": Exploit()}, evil / "pytorch_model.bin", _use_new_zipfile_serialization=True)
    recipe.write_text('recipec 1\nexport load("models/evil", allow_pickle=true) to "out/e"\n')
    status, _, err = run(["run", str(recipe)], capsys)
    assert status == 65 and "error[E505]: cannot read pytorch_model.bin as weights" in err
    assert not (tmp_path / "pwned").exists()


def test_remote_code_is_never_run_or_copied(chat_vector, capsys):
    cp = chat_vector.parent / "models" / "cp"
    marker = chat_vector.parent / "imported"
    (cp / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((cp / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (cp / "config.json").write_text(json.dumps(config))
    assert run(["run", str(chat_vector)], capsys)[0] == 0
    assert not marker.exists() and not (chat_vector.parent / "out" / "model" / "modeling_evil.py").exists()


def test_a_hub_input_that_turns_out_not_to_fit_fails_at_run_time(tmp_path, capsys, monkeypatch):
    from recipec.engine import Engine, RunOptions
    from recipec.diagnostics import RecipeError
    from recipec.check import lower_file

    tiny_llama(tmp_path / "base")
    recipe = tmp_path / "r.rcp"
    recipe.write_text('recipec 1\nexport "base" + 0.5*(hf("org/chat", revision="main") - "base") to "out"\n')
    program = lower_file(recipe)  # the hub model is not cached: its signature is unknown until locked
    snapshot = Path(os.environ["HF_HUB_CACHE"]) / "models--org--chat" / "snapshots" / ("a" * 40)
    write_model(snapshot, preset_config("llama", "small"))  # ...and it is another size
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    with pytest.raises(RecipeError) as err:
        Engine(program, recipe, RunOptions(cache_dir=tmp_path / "cache", offline=True)).run()
    (diagnostic,) = err.value.diagnostics
    assert diagnostic.code == "E502" and "has shapes" in diagnostic.message
    assert diagnostic.span.text.startswith('"base" + 0.5*')
    assert not (tmp_path / "out").exists()


def test_offline_run_with_an_uncached_hub_model_says_so(tmp_path, capsys):
    recipe = tmp_path / "r.rcp"
    recipe.write_text('recipec 1\nexport hf("org/absent") to "out"\n')
    status, _, err = run(["run", "--offline", str(recipe)], capsys)
    assert status == 66 and "error[E501]: hub model org/absent@main is not in the local Hugging Face cache" in err


def _cli(recipe: Path, *extra: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "recipec", "run", *extra, str(recipe)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _release_is_complete(release: Path) -> bool:
    from recipec.store.filehash import hash_file
    sums = [line.split("  ") for line in (release / "SHA256SUMS").read_text().splitlines()]
    return all(hash_file(release / name) == digest for digest, name in sums)


def test_disk_full_leaves_the_previous_release_intact(chat_vector, capsys):
    assert run(["run", str(chat_vector)], capsys)[0] == 0
    release = chat_vector.parent / "out" / "model"
    before = (release / "SHA256SUMS").read_text()
    chat_vector.write_text(CHAT_VECTOR.replace("0.8", "0.6"))

    def small_files():  # 200 KB: the 800 KB result cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = _cli(chat_vector, preexec_fn=small_files)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "error[E504]: cannot write the result of `%" in err and "File too large" in err
    assert "Traceback" not in err
    assert (release / "SHA256SUMS").read_text() == before and _release_is_complete(release)
    leftovers = [p for p in (chat_vector.parent / ".recipec").rglob(".recipec-tmp-*")] if (
        chat_vector.parent / ".recipec").exists() else []
    assert leftovers == []
    assert run(["run", str(chat_vector)], capsys)[0] == 0  # with space again, it just works


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _big_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "big.rcp"
    recipe.write_text('recipec 1\nsmall = init("llama", size="small", seed=2)\nbig = init("llama", size="base", seed=1)\n'
                      'export small to "out/small"\nexport big to "out/big"\n')
    return recipe


def test_sigint_exits_130_removes_temporaries_and_the_next_run_resumes(tmp_path):
    recipe = _big_recipe(tmp_path)
    cache = Path(os.environ["RECIPEC_CACHE"])
    objects = Cache(cache).objects
    proc = _cli(recipe)
    # `small` is built first; interrupt while `big` is being built.
    _wait_for(lambda: objects.is_dir() and sum(1 for p in objects.iterdir() if not p.name.startswith(".")) == 1
              and any(p.name.startswith(".recipec-tmp-") for p in objects.iterdir()))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not any(p.name.startswith(".recipec-tmp-") for p in objects.iterdir())
    assert not (tmp_path / "out").exists()
    proc = _cli(recipe, "--json")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    statuses = {n["label"]: n["status"] for n in json.loads(out)["nodes"]}
    assert statuses == {"small": "cached", "big": "built"}


def test_sigkill_never_leaves_a_partial_release(tmp_path, capsys):
    recipe = _big_recipe(tmp_path)
    assert run(["run", str(recipe)], capsys)[0] == 0
    previous = (tmp_path / "out" / "big" / "SHA256SUMS").read_text()
    recipe.write_text(recipe.read_text().replace("seed=1", "seed=5"))
    proc = _cli(recipe)
    objects = Cache(Path(os.environ["RECIPEC_CACHE"])).objects

    def writing() -> bool:  # the new result is being built in the cache, or assembled as a release
        return any(p.name.startswith(".recipec-tmp-") for d in (objects, tmp_path / "out") for p in d.iterdir())

    _wait_for(writing)
    proc.kill()
    proc.wait()
    release = tmp_path / "out" / "big"
    if release.exists():  # killed before the swap: the previous release, complete
        assert _release_is_complete(release)
    assert run(["run", str(recipe)], capsys)[0] == 0
    assert (release / "SHA256SUMS").read_text() != previous and _release_is_complete(release)
    assert not any(p.name.startswith(".recipec-tmp-") for p in (tmp_path / "out").iterdir())


def test_two_runs_at_once_on_one_cache_and_output(chat_vector):
    procs = [_cli(chat_vector) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert _release_is_complete(chat_vector.parent / "out" / "model")


def test_a_release_interrupted_before_its_swap_leaves_the_previous_one(chat_vector, capsys, monkeypatch):
    import recipec.store.release as release_module

    assert run(["run", str(chat_vector)], capsys)[0] == 0
    release = chat_vector.parent / "out" / "model"
    before = (release / "SHA256SUMS").read_text()
    chat_vector.write_text(CHAT_VECTOR.replace("0.8", "0.3"))

    def killed(new, target, *rest):
        raise KeyboardInterrupt  # the moment before the new release would take the old one's place

    monkeypatch.setattr(release_module, "_swap_into_place", killed)
    assert run(["run", str(chat_vector)], capsys)[0] == 130
    assert (release / "SHA256SUMS").read_text() == before and _release_is_complete(release)
    assert not [p for p in release.parent.iterdir() if p.name.startswith(".recipec-tmp-")]
    # A temporary a SIGKILL left behind is removed by the next run, which then succeeds.
    (release.parent / ".recipec-tmp-model-99999").mkdir()
    monkeypatch.undo()
    assert run(["run", str(chat_vector)], capsys)[0] == 0
    assert (release / "SHA256SUMS").read_text() != before and _release_is_complete(release)
    assert not [p for p in release.parent.iterdir() if p.name.startswith(".recipec-tmp-")]
