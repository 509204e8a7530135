"""`merge` with vocabulary policies, parameters a method ignores, factors that cannot be computed with,
non-finite values in inputs and results, and dtypes recipec cannot compute in: recipes in, exit status,
messages and files out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import write_model
from recipec import arch
from recipec.arch import preset_config
from recipec.backends.merge_methods import merge_tensor
from test_run import cached, copy_example, run

INITS = ('base  = init("llama", size="tiny", seed=1, tokenizer="tokenizers/llama")\n'
         'chat  = init("llama", size="tiny", seed=2, tokenizer="tokenizers/llama-chat")\n'
         'zh_cp = init("llama", config="configs/llama_tiny_zh.json", seed=3, tokenizer="tokenizers/llama-zh")\n')
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def vocabulary_recipe(tmp_path: Path, merge_call: str) -> Path:
    """The chat_vector_zh example's three models (1,024 and 1,200 tokens), merged by `merge_call`."""
    recipe = copy_example(tmp_path, "chat_vector_zh.rcp")
    recipe.write_text(f"recipec 1\n{INITS}zh_chat = {merge_call}\nexport zh_chat to \"out/zh_chat\"\n")
    return recipe


def write_recipe(tmp_path: Path, body: str) -> Path:
    recipe = tmp_path / "r.rcp"
    recipe.write_text("recipec 1\n" + body)
    return recipe


def random_model(root: Path, seed: int, dtype: torch.dtype = torch.float32,
                 edit=lambda tensors: None) -> Path:
    """A tiny Llama directory with random weights; `edit` may change the tensors before they are saved."""
    config = preset_config("llama", "tiny")
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=generator).to(dtype)
               for name, shape in arch.tensor_shapes(config).items()}
    edit(tensors)
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    return root


# ------------------------------------------------------------------------------- vocabulary policies


def test_ties_merge_of_a_vocabulary_extended_model(tmp_path, capsys):
    recipe = vocabulary_recipe(tmp_path, 'merge(zh_cp, chat, base=base, method="ties", density=0.5, '
                                         'embeddings="overlap")')
    status, _, err = run(["run", str(recipe)], capsys)
    assert status == 0, err
    release = tmp_path / "out" / "zh_chat"
    base, chat, cp = (cached(recipe, n) for n in ("base", "chat", "zh_cp"))
    out = load_file(str(release / "model.safetensors"))
    for name in VOCAB:
        assert out[name].shape == (1200, 64)
        shared = merge_tensor("ties", name, [cp[name][:1024], chat[name]], base[name], [1.0, 1.0], density=0.5)
        assert torch.equal(out[name][3:1024], shared[3:])  # TIES on the 1,024 rows all three share
        assert torch.equal(out[name][1024:], cp[name][1024:])  # the CP model's new rows, untouched
        assert torch.equal(out[name][:3], chat[name][:3])  # <unk> <s> </s>: the chat model's rows
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(out[name], merge_tensor("ties", name, [cp[name], chat[name]], base[name], [1.0, 1.0],
                                               density=0.5))
    assert "chat_template" in json.loads((release / "tokenizer_config.json").read_text())  # from the chat model
    assert len(json.loads((release / "tokenizer.json").read_text())["model"]["vocab"]) == 1200  # from the CP model
    assert json.loads((release / "generation_config.json").read_text())["eos_token_id"] == [2]


def test_merge_keep_policies_and_special_tokens_from_the_first_model(tmp_path, capsys):
    recipe = vocabulary_recipe(tmp_path, 'merge(zh_cp, chat, base=base, method="dare", drop_rate=0.5, '
                                         'embeddings="keep", norms="keep")')
    assert run(["run", str(recipe)], capsys)[0] == 0
    cp = cached(recipe, "zh_cp")
    out = load_file(str(tmp_path / "out" / "zh_chat" / "model.safetensors"))
    kept = [n for n in out if n in VOCAB or arch.is_norm_tensor(n)]
    assert len(kept) > 3 and all(torch.equal(out[n], cp[n]) for n in kept)
    assert not torch.equal(out["model.layers.0.mlp.up_proj.weight"], cp["model.layers.0.mlp.up_proj.weight"])

    recipe = vocabulary_recipe(tmp_path, 'merge(zh_cp, chat, method="linear", embeddings="overlap", '
                                         'special_tokens="first")')
    assert run(["run", str(recipe)], capsys)[0] == 0
    chat = cached(recipe, "chat")
    out = load_file(str(tmp_path / "out" / "zh_chat" / "model.safetensors"))
    for name in VOCAB:
        assert torch.equal(out[name][:3], cp[name][:3])
        torch.testing.assert_close(out[name][3:1024], 0.5 * cp[name][3:1024] + 0.5 * chat[name][3:1024])


def test_merge_without_a_policy_is_told_how_to_give_one(tmp_path, capsys):
    recipe = vocabulary_recipe(tmp_path, 'merge(zh_cp, chat, base=base, method="ties")')
    status, _, err = run(["check", str(recipe)], capsys)
    assert status == 65
    assert "error[E304]: vocabularies differ: `zh_cp` has 1200 tokens, `chat` has 1024" in err
    assert 'hint: choose a vocabulary policy: merge(..., embeddings="overlap")' in err and "combine(" not in err


# ----------------------------------------------------------------------------- parameters and factors


@pytest.mark.parametrize(("call", "ignored", "users"), [
    ('merge(a, b, method="linear", density=0.5)', "density", '"ties"'),
    ('merge(a, b, method="slerp", t=0.3, weights=[1, 2])', "weights", '"linear", "task_arithmetic"'),
    ('merge(a, b, base=c, method="ties", seed=3)', "seed", '"dare"'),
])
def test_a_parameter_the_method_ignores_is_a_located_warning(tmp_path, capsys, call, ignored, users):
    inits = "".join(f'{n} = init("llama", size="tiny", seed={i})\n' for i, n in enumerate("abc"))
    recipe = write_recipe(tmp_path, f"{inits}export {call} to \"out/m\"\n")
    status, _, err = run(["check", str(recipe)], capsys)
    assert status == 0, err
    column = len("export ") + call.index(f"{ignored}=") + len(ignored) + 2  # at the value
    assert f"r.rcp:5:{column}: warning[E320]: method `" in err and f"` does not use `{ignored}`" in err
    assert f"choose a method that uses it: {users}" in err


@pytest.mark.parametrize("factor", ["nan", "inf", "-inf", "1e999", "-1e308", "2e6"])
def test_override_factors_must_be_finite_and_bounded(tmp_path, capsys, factor):
    recipe = write_recipe(tmp_path, 'a = init("llama", size="tiny", seed=1)\nb = init("llama", size="tiny", seed=2)\n'
                                    f'export combine(a + 0.5*(b - a), overrides=["lm_head.weight={factor}"]) '
                                    'to "out/m"\n')
    status, _, err = run(["check", str(recipe)], capsys)
    assert status == 65
    assert "r.rcp:4:43: error[E203]: `overrides` has the factor" in err
    assert "past ±1e+06 an output overflows fp16" in err


def test_merge_weights_must_be_bounded(tmp_path, capsys):
    recipe = write_recipe(tmp_path, 'a = init("llama", size="tiny", seed=1)\nb = init("llama", size="tiny", seed=2)\n'
                                    'export merge(a, b, method="linear", weights=[1e300, 1]) to "out/m"\n')
    status, _, err = run(["check", str(recipe)], capsys)
    assert status == 65 and "error[E203]: `weights` has 1e+300; weights must be finite and within ±1e+06" in err


def test_a_coefficient_beyond_fp32_is_refused_at_check_time(tmp_path, capsys):
    recipe = write_recipe(tmp_path, 'a = init("llama", size="tiny", seed=1)\nb = init("llama", size="tiny", seed=2)\n'
                                    'export 1e300*a + (1 - 1e300)*b to "out/m"\n')
    status, _, err = run(["run", str(recipe)], capsys)  # was a RuntimeError while running
    assert status == 65
    assert "error[E321]: the coefficient of `a` is 1e+300, beyond what fp32 can hold" in err


def test_coefficients_too_large_to_sum_to_one_in_floats_are_refused(tmp_path, capsys):
    # 1 - 1e16 rounds to -1e16 as a float: the weights the engine would use sum to 0, a delta, not a model.
    recipe = write_recipe(tmp_path, 'a = init("llama", size="tiny", seed=1)\nb = init("llama", size="tiny", seed=2)\n'
                                    'export a + 1e16*(b - a) to "out/m"\nexport a + 1e6*(b - a) to "out/n"\n')
    status, _, err = run(["check", str(recipe)], capsys)
    assert status == 65 and err.count("error[") == 1 and ":4:8: error[E321]: model weights sum to 1, but" in err, err


# ---------------------------------------------------------------------------------- non-finite values


def _poison(name: str, values: list[float]):
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name].view(-1)[:len(values)] = torch.tensor(values)
    return edit


@pytest.mark.parametrize("expression", ["base + 0.5*(chat - base)",
                                        'merge(chat, other, base=base, method="ties", density=0.5)'])
def test_non_finite_inputs_are_named_and_counted(tmp_path, capsys, expression):
    random_model(tmp_path / "models" / "base", 1)
    random_model(tmp_path / "models" / "chat", 2, edit=_poison("model.norm.weight", [float("nan"), float("inf"), 1.0]))
    random_model(tmp_path / "models" / "other", 3)
    recipe = write_recipe(tmp_path, 'base = load("models/base")\nchat = load("models/chat")\n'
                                    f'other = load("models/other")\nm = {expression}\nexport m to "out/m"\n')
    if "merge" not in expression:
        recipe.write_text(recipe.read_text().replace('other = load("models/other")\n', ""))
    status, _, err = run(["run", str(recipe)], capsys)
    assert status == 0, err
    assert "warning[E540]: input `chat` holds 2 NaN or infinite values: `model.norm.weight` (2)" in err
    assert "m = " in err.split("warning[E540]")[1]  # located at the op that built the result
    out = load_file(str(tmp_path / "out" / "m" / "model.safetensors"))
    written = int((~torch.isfinite(out["model.norm.weight"])).sum())  # TIES may trim some away
    assert written > 0 and f"; {written} NaN or infinite value{'s' if written > 1 else ''} written;" in err

    recipe.write_text(recipe.read_text().replace('"out/m"', '"out/m2"').replace("0.5", "0.25"))
    status, out_json, _ = run(["run", "--json", str(recipe)], capsys)  # a fresh build, reported as JSON
    report = json.loads(out_json)
    assert status == 0 and report["nonfinite"] == written
    (warning,) = report["warnings"]
    assert warning["code"] == "E540" and warning["severity"] == "warning"
    assert warning["snippet"].startswith("m = ")


def test_overflow_in_the_output_dtype_is_reported(tmp_path, capsys):
    random_model(tmp_path / "models" / "base", 1)
    random_model(tmp_path / "models" / "chat", 2)
    recipe = write_recipe(tmp_path, 'base = load("models/base")\nchat = load("models/chat")\n'
                                    'export combine(base + 1e5*(chat - base), dtype="float16") to "out/m"\n')
    status, _, err = run(["run", str(recipe)], capsys)
    assert status == 0, err
    assert "NaN or infinite values although its inputs are finite" in err and 'write dtype="float32"' in err


def test_finite_results_say_nothing_about_non_finite_values(tmp_path, capsys):
    random_model(tmp_path / "models" / "base", 1, torch.bfloat16)
    random_model(tmp_path / "models" / "chat", 2, torch.bfloat16)
    recipe = write_recipe(tmp_path, 'base = load("models/base")\nchat = load("models/chat")\n'
                                    'export base + 0.5*(chat - base) to "out/m"\n')
    status, _, err = run(["run", str(recipe)], capsys)
    assert status == 0 and "E540" not in err and "NaN" not in err


# ---------------------------------------------------------------------------- dtypes recipec cannot use


@pytest.mark.parametrize("dtype", ["F8_E4M3", "I8"])
def test_arithmetic_on_a_dtype_recipec_cannot_compute_in_is_a_check_error(tmp_path, capsys, dtype):
    write_model(tmp_path / "models" / "q", preset_config("llama", "tiny"), dtype=dtype)
    write_model(tmp_path / "models" / "f", preset_config("llama", "tiny"))
    for expression in ('0.5*f + 0.5*q', 'merge(f, q, method="linear")'):
        recipe = write_recipe(tmp_path, f'f = load("models/f")\nq = load("models/q")\nexport {expression} to "out/m"\n')
        for verb in ("check", "run"):
            status, _, err = run([verb, str(recipe)], capsys)
            assert status == 65, err
            assert f"error[E322]: `q` stores `lm_head.weight` as {dtype}, which recipec cannot compute with" in err
            assert "F64, F32, BF16, F16" in err and "`q` is defined here" in err

    recipe = write_recipe(tmp_path, 'q = load("models/q")\nexport q to "out/q"\n')
    status, _, err = run(["run", str(recipe)], capsys)
    assert status == 0, err
    assert (tmp_path / "out" / "q" / "model.safetensors").read_bytes() == \
        (tmp_path / "models" / "q" / "model.safetensors").read_bytes()


def test_a_dtype_first_seen_while_running_is_refused_with_the_same_diagnostic(tmp_path):
    """A hub model that is not cached has no signature at check time: the run checks its dtypes."""
    from recipec.diagnostics import RecipeError
    from recipec.engine import Engine, RunOptions
    from recipec.check import lower_file

    write_model(tmp_path / "models" / "f", preset_config("llama", "tiny"))
    write_model(tmp_path / "models" / "q", preset_config("llama", "tiny"))
    recipe = write_recipe(tmp_path, 'f = load("models/f")\nq = load("models/q")\nexport 0.5*f + 0.5*q to "out/m"\n')
    program = lower_file(recipe)
    write_model(tmp_path / "models" / "q", preset_config("llama", "tiny"), dtype="F8_E5M2")  # changed since
    with pytest.raises(RecipeError) as info:
        Engine(program, recipe, RunOptions(cache_dir=tmp_path / "cache")).run()
    (diagnostic,) = info.value.diagnostics
    assert diagnostic.code == "E322" and diagnostic.span.line == 4  # the export's expression
    assert diagnostic.message.startswith("`q` stores `") and "as F8_E5M2" in diagnostic.message


def test_merge_refuses_shared_rows_that_are_different_tokens(tmp_path, capsys):
    recipe = vocabulary_recipe(tmp_path, 'merge(zh_cp, chat, base=base, method="ties", embeddings="overlap")')
    shuffled = tmp_path / "tokenizers" / "llama-chat" / "tokenizer.json"
    data = json.loads(shuffled.read_text())
    vocab = data["model"]["vocab"]
    vocab["w10"], vocab["w11"] = vocab["w11"], vocab["w10"]
    shuffled.write_text(json.dumps(data))
    status, _, err = run(["run", str(recipe)], capsys)
    assert status == 65 and "error[E503]: the vocabularies disagree on shared rows: row 10" in err
