"""`recipec run` end to end: recipes in, Hugging Face directories out, checked against direct formulas."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import run_cli, write_model
from recipec.arch import preset_config
from recipec.backends.merge_methods import merge_tensor
from recipec.store.cache import Cache

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"


def copy_example(tmp_path: Path, name: str) -> Path:
    for extra in ("tokenizers", "configs"):
        if (EXAMPLES / extra).is_dir() and not (tmp_path / extra).exists():
            shutil.copytree(EXAMPLES / extra, tmp_path / extra)
    shutil.copy(EXAMPLES / name, tmp_path / name)
    return tmp_path / name


run = run_cli


def lock_of(recipe: Path) -> dict:
    return tomllib.loads(recipe.with_name(recipe.name + ".lock").read_text())


def cached(recipe: Path, label: str) -> dict[str, torch.Tensor]:
    """The weights of a built node, from the cache (RECIPEC_CACHE is set per test)."""
    key = lock_of(recipe)["nodes"][label]["key"]
    obj = Cache(Path(os.environ["RECIPEC_CACHE"])).objects / key
    return load_file(str(obj / "model.safetensors"))


def test_quickstart_release_is_a_loadable_hf_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    recipe = copy_example(tmp_path, "quickstart.rcp")
    status, out, err = run(["run", str(recipe)], capsys)
    assert status == 0, err
    release = tmp_path / "out" / "quickstart"
    assert out.strip() == str(release)
    model = AutoModelForCausalLM.from_pretrained(release)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 1024)

    base, chat, cp = (cached(recipe, n) for n in ("base", "chat", "cp"))
    weights = load_file(str(release / "model.safetensors"))
    for name, value in weights.items():
        expected = cp[name] + 0.8 * (chat[name] - base[name])
        torch.testing.assert_close(value, expected, rtol=0, atol=2e-7)

    with safe_open(str(release / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    for file in release.iterdir():  # weights may be links shared with the cache: read-only
        assert stat.S_IMODE(file.stat().st_mode) == (0o444 if file.suffix == ".safetensors" else 0o644), file
    sums = dict(line.split("  ")[::-1] for line in (release / "SHA256SUMS").read_text().splitlines())
    from recipec.store.filehash import hash_file
    assert {name: hash_file(release / name) for name in sums} == sums
    card = (release / "README.md").read_text()
    assert card.startswith("---\ntags:\n- recipec\n---") and "model = cp + 0.8*(chat - base)" in card
    assert lock_of(recipe)["outputs"]["out/quickstart"]["digest"] in card


def test_bf16_chat_vector_accumulates_in_fp32_and_shards(tmp_path, capsys):
    recipe = tmp_path / "bf16.rcp"
    recipe.write_text('recipec 1\n'
                      'base = init("llama", size="tiny", seed=1, dtype="bfloat16")\n'
                      'chat = init("llama", size="tiny", seed=2, dtype="bfloat16")\n'
                      'cp   = init("llama", size="tiny", seed=3, dtype="bfloat16")\n'
                      'export combine(cp + 0.8*(chat - base), shard_size=100K) to "out/sharded"\n'
                      'export cp + 0.8*(chat - base) to "out/single"\n')
    assert run(["run", str(recipe)], capsys)[0] == 0
    sharded, single = tmp_path / "out" / "sharded", tmp_path / "out" / "single"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 3
    base, chat, cp = (cached(recipe, n) for n in ("base", "chat", "cp"))
    one = load_file(str(single / "model.safetensors"))
    for name, value in one.items():
        assert value.dtype == torch.bfloat16
        acc = cp[name].float()
        acc.add_(chat[name].float(), alpha=0.8)
        acc.add_(base[name].float(), alpha=-0.8)
        assert torch.equal(value, acc.to(torch.bfloat16)), name
    # The content digest does not depend on sharding; the sharded files load to the same tensors.
    lock = lock_of(recipe)
    assert lock["outputs"]["out/sharded"]["digest"] == lock["outputs"]["out/single"]["digest"]
    from transformers import AutoModelForCausalLM
    a = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    b = AutoModelForCausalLM.from_pretrained(single).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_merge_method_matches_its_reference(tmp_path, capsys):
    recipe = copy_example(tmp_path, "merge_methods.rcp")
    assert run(["run", str(recipe)], capsys)[0] == 0
    base, math, code = (cached(recipe, n) for n in ("base", "math", "code"))
    cases = {
        "merge_linear": lambda n: 0.5 * math[n] + 0.5 * code[n],
        "merge_task_arithmetic": lambda n: base[n] + 0.5 * (math[n] - base[n]) + 0.5 * (code[n] - base[n]),
        "merge_ties": lambda n: merge_tensor("ties", n, [math[n], code[n]], base[n], [1.0, 1.0], density=0.3,
                                             normalize=True),
        "merge_dare": lambda n: merge_tensor("dare", n, [math[n], code[n]], base[n], [1.0, 1.0], drop_rate=0.9, seed=7),
        "merge_slerp": lambda n: merge_tensor("slerp", n, [math[n], code[n]], None, [1.0, 1.0], t=0.33),
    }
    for out, reference in cases.items():
        merged = load_file(str(tmp_path / "out" / out / "model.safetensors"))
        for name, value in merged.items():
            torch.testing.assert_close(value, reference(name), rtol=1e-6, atol=1e-6, msg=f"{out}: {name}")
    # TIES really trimmed: many entries of the merged task vector are exactly zero.
    ties = load_file(str(tmp_path / "out" / "merge_ties" / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert ((ties[name] - base[name]) == 0).float().mean() > 0.3


def test_vocabulary_extended_chat_vector(tmp_path, capsys):
    recipe = copy_example(tmp_path, "chat_vector_zh.rcp")
    assert run(["run", str(recipe)], capsys)[0] == 0
    release = tmp_path / "out" / "zh_chat"
    base, chat, cp = (cached(recipe, n) for n in ("base", "chat", "zh_cp"))
    out = load_file(str(release / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (1200, 64)
        shared = cp[name][:1024] + 0.8 * (chat[name] - base[name])
        torch.testing.assert_close(out[name][3:1024], shared[3:], rtol=0, atol=2e-7)
        assert torch.equal(out[name][1024:], cp[name][1024:])  # the CP model's new rows, untouched
        assert torch.equal(out[name][:3], chat[name][:3])  # <unk> <s> </s>: the chat model's rows
    tokenizer_config = json.loads((release / "tokenizer_config.json").read_text())
    assert "chat_template" in tokenizer_config  # from the chat model
    assert len(json.loads((release / "tokenizer.json").read_text())["model"]["vocab"]) == 1200  # from the CP model
    assert json.loads((release / "generation_config.json").read_text())["eos_token_id"] == [2]

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(release)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "w5 w6"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    assert AutoModelForCausalLM.from_pretrained(release)(ids).logits.shape[-1] == 1200


def test_overlap_refuses_shared_rows_that_are_different_tokens(tmp_path, capsys):
    copy_example(tmp_path, "chat_vector_zh.rcp")
    shuffled = tmp_path / "tokenizers" / "llama-chat" / "tokenizer.json"
    data = json.loads(shuffled.read_text())
    vocab = data["model"]["vocab"]
    vocab["w10"], vocab["w11"] = vocab["w11"], vocab["w10"]
    shuffled.write_text(json.dumps(data))
    status, _, err = run(["run", str(tmp_path / "chat_vector_zh.rcp")], capsys)
    assert status == 65
    # named as the recipe names the models, never by cache hash
    assert ("error[E503]: the vocabularies disagree on shared rows: row 10 is token 'w10' in `zh_cp` "
            "but 'w11' in `chat`") in err
    assert not (tmp_path / "out" / "zh_chat").exists()


def test_rerun_rebuilds_only_what_changed(tmp_path, capsys):
    recipe = copy_example(tmp_path, "quickstart.rcp")
    assert run(["run", str(recipe)], capsys)[0] == 0
    status, out, _ = run(["run", "--json", str(recipe)], capsys)
    assert status == 0 and json.loads(out)["built"] == 0
    recipe.write_text(recipe.read_text().replace("0.8*(chat - base)", "0.5*(chat - base)"))
    status, out, _ = run(["plan", str(recipe)], capsys)
    assert "Plan: 1 to build, 3 cached, 1 export." in out
    status, out, _ = run(["run", "--json", str(recipe)], capsys)
    statuses = {n["label"]: n["status"] for n in json.loads(out)["nodes"]}
    assert statuses == {"base": "cached", "chat": "cached", "cp": "cached", "model": "built"}


def _run_in_subprocess(recipe: Path, cache: Path, threads: int) -> None:
    env = dict(os.environ, RECIPEC_CACHE=str(cache), OMP_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, "-m", "recipec", "run", "--threads", str(threads), str(recipe)],
                   env=env, check=True, capture_output=True)


def test_outputs_are_byte_identical_across_processes_and_thread_counts(tmp_path):
    trees = []
    for threads in (1, 2):
        work = tmp_path / f"t{threads}"
        work.mkdir()
        recipe = copy_example(work, "merge_methods.rcp")
        recipe.write_text(recipe.read_text() + 'export code + 0.7*(math - base) to "out/chat_vector"\n')
        _run_in_subprocess(recipe, work / "cache", threads)
        trees.append({p.relative_to(work / "out"): p.read_bytes() for p in (work / "out").rglob("*") if p.is_file()})
    assert trees[0].keys() == trees[1].keys() and len(trees[0]) > 20
    for name in trees[0]:
        assert trees[0][name] == trees[1][name], name


def test_local_sharded_inputs_and_tied_embeddings(tmp_path, capsys):
    tied = preset_config("llama", "tiny") | {"tie_word_embeddings": True}
    write_model(tmp_path / "tied", tied, shards=2)
    write_model(tmp_path / "untied", preset_config("llama", "tiny"), shards=3)
    recipe = tmp_path / "r.rcp"
    recipe.write_text('recipec 1\nexport "untied" + 0.5*("tied" - "untied") to "out/a"\n'
                      'export "tied" + 0.5*("untied" - "tied") to "out/b"\n')
    assert run(["run", str(recipe)], capsys)[0] == 0
    a = load_file(str(tmp_path / "out" / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "out" / "b" / "model.safetensors"))
    assert "lm_head.weight" in a and "lm_head.weight" not in b  # the first model decides tying
    inputs = lock_of(recipe)["inputs"]
    assert sorted(i["path"] for i in inputs.values()) == ["tied", "untied"]  # relative to the recipe
    assert all(i["digest"].startswith("blake3:") for i in inputs.values())


def test_tokenizer_and_chat_template_overrides(tmp_path, capsys):
    copy_example(tmp_path, "chat_vector_zh.rcp")
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "chat.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    recipe = tmp_path / "r.rcp"
    recipe.write_text('recipec 1\n'
                      'base = init("llama", size="tiny", seed=1, tokenizer="tokenizers/llama")\n'
                      'chat = init("llama", size="tiny", seed=2, tokenizer="tokenizers/llama-chat")\n'
                      'export combine(base + 0.5*(chat - base), tokenizer="tokenizers/llama-zh", '
                      'chat_template="templates/chat.jinja") to "out/m"\n')
    assert run(["run", str(recipe)], capsys)[0] == 0
    release = tmp_path / "out" / "m"
    assert (release / "tokenizer.json").read_bytes() == (tmp_path / "tokenizers/llama-zh/tokenizer.json").read_bytes()
    template = (tmp_path / "templates" / "chat.jinja").read_text()
    assert (release / "chat_template.jinja").read_text() == template
    assert json.loads((release / "tokenizer_config.json").read_text())["chat_template"] == template
    # The template's content is part of the key: editing it rebuilds the node.
    (tmp_path / "templates" / "chat.jinja").write_text("{{ messages[0]['content'] }}")
    status, out, _ = run(["run", "--json", str(recipe)], capsys)
    assert [n["status"] for n in json.loads(out)["nodes"]] == ["cached", "cached", "built"]


def test_special_token_rows_can_come_from_the_first_model(tmp_path, capsys):
    recipe = copy_example(tmp_path, "chat_vector_zh.rcp")
    recipe.write_text(recipe.read_text().replace('special_tokens="chat"', 'special_tokens="first"'))
    assert run(["run", str(recipe)], capsys)[0] == 0
    cp = cached(recipe, "zh_cp")
    out = load_file(str(tmp_path / "out" / "zh_chat" / "model.safetensors"))
    assert torch.equal(out["model.embed_tokens.weight"][:3], cp["model.embed_tokens.weight"][:3])
