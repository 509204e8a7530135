"""The language end to end: recipes in, typed graphs out (names, `use`, arithmetic, paths)."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import pytest

from recipec.diagnostics import RecipeError
from recipec.check import lower_file
from recipec.ir.types import Kind
from recipec.syntax import ast, parse

DESIGN_CARD = 'model = prune(cp("llama2", corpus_zh) + 0.8*(llama2_chat - llama2), heads=0.3)'


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def lower(tmp_path: Path, body: str, name: str = "r.rcp"):
    return lower_file(write(tmp_path / name, "recipec 1\n" + body))


def combine_nodes(program):
    return [n for n in program.graph.nodes if n.op == "combine"]


def test_design_card_line_parses_verbatim():
    recipe = parse("recipec 1\n" + DESIGN_CARD + "\n")
    (stmt,) = recipe.statements
    assert isinstance(stmt, ast.Assign) and stmt.name.id == "model"
    call = stmt.value
    assert call.func.id == "prune" and call.kwargs[0].name == "heads" and call.kwargs[0].value.value == Fraction(3, 10)
    arith = call.args[0]
    assert arith.op == "+" and arith.left.func.id == "cp"
    assert arith.right.op == "*" and arith.right.left.value == Fraction(4, 5)


def test_design_card_arithmetic_type_checks_with_hub_references(tmp_path):
    program = lower(tmp_path, 'llama2 = hf("meta-llama/Llama-2-7b-hf")\n'
                              'llama2_chat = hf("meta-llama/Llama-2-7b-chat-hf")\n'
                              'm = "llama2_cp" + 0.8*(llama2_chat - llama2)\n'
                              'export m to "out"\n')
    (node,) = combine_nodes(program)
    assert node.type.kind is Kind.MODEL and node.type.signature is None  # unknown until locked
    assert [i.op for i in node.inputs] == ["hf", "hf", "hf"]
    assert node.inputs[0].params["id"] == "llama2_cp"
    assert node.params["coefficients"] == [1, 0.8, -0.8]


def test_affine_normalization_folds_every_form_to_one_combination(tmp_path):
    program = lower(tmp_path, '\n'.join([
        'a = init("llama", size="tiny", seed=1)',
        'b = init("llama", size="tiny", seed=2)',
        'c = init("llama", size="tiny", seed=3)',
        'k = 0.5',
        'd = b - c',  # a delta bound to a name stays symbolic until used
        'm1 = a + k*d',
        'm2 = (a + a + b - b)/2 + (b - c)*0.5 - -0.0*a',
        'avg = (a + b + c)/3',
        'export m1 to "o1"', 'export m2 to "o2"', 'export avg to "o3"']))
    chat_vector, average = combine_nodes(program)
    assert chat_vector.names == ["m1", "m2"]  # identical combinations are one node
    assert chat_vector.params["coefficients"] == [1, 0.5, -0.5]
    assert average.names == ["avg"] and average.params["coefficients"] == pytest.approx((1 / 3,) * 3)


def test_identical_subexpressions_are_one_node(tmp_path):
    program = lower(tmp_path, 'a = init("llama", size="tiny", seed=1)\n'
                              'b = init("llama", size="tiny", seed=1)\n'
                              'export a to "o1"\nexport b to "o2"\n')
    assert program.graph.exports[0].node is program.graph.exports[1].node
    assert program.graph.exports[0].node.names == ["a", "b"]


def test_number_suffixes(tmp_path):
    recipe = parse("recipec 1\nx = [100M, 2B, 1e9, 1_000, .5, 1.5K, 3T]\n")
    values = [item.value for item in recipe.statements[0].value.items]
    assert values == [10**8, 2 * 10**9, 10**9, 1000, Fraction(1, 2), 1500, 3 * 10**12]


def test_use_shares_definitions_and_paths_resolve_against_each_recipe(tmp_path, monkeypatch):
    from helpers import tiny_llama

    tiny_llama(tmp_path / "lib" / "models" / "base")
    write(tmp_path / "lib" / "common.rcp", 'recipec 1\nbase = load("models/base")\n')
    write(tmp_path / "recipes" / "main.rcp",
          'recipec 1\nuse "../lib/common.rcp"\nchat = init("llama", size="tiny", seed=2)\n'
          'export 0.5*base + 0.5*chat to "out/avg"\n')
    monkeypatch.chdir(tmp_path / "lib")  # anywhere but the recipe's directory
    program = lower_file(tmp_path / "recipes" / "main.rcp")
    (export,) = program.graph.exports
    assert export.path == (tmp_path / "recipes" / "out" / "avg").resolve()
    load = next(n for n in program.graph.nodes if n.op == "load")
    assert load.params["path"] == str((tmp_path / "lib" / "models" / "base").resolve())


def test_string_reference_prefers_an_existing_local_directory(tmp_path):
    from helpers import tiny_llama

    tiny_llama(tmp_path / "org" / "model")  # shaped like a hub id, but a local directory exists
    program = lower(tmp_path, 'export "org/model" to "out"\n')
    assert program.graph.exports[0].node.op == "load"


def test_sharded_local_models_combine(tmp_path):
    from helpers import write_model
    from recipec.arch import preset_config

    config = preset_config("llama", "tiny")
    for name, shards in (("base", 3), ("chat", 1), ("cp", 2)):
        write_model(tmp_path / name, config, dtype="BF16", shards=shards)
    program = lower(tmp_path, 'base = load("base")\nchat = load("chat")\ncp = load("cp")\n'
                              'export cp + 0.8*(chat - base) to "out"\n')
    (node,) = combine_nodes(program)
    assert node.type.signature.dtype == "BF16" and node.type.signature.params == 205_120


def test_a_bad_recipe_never_raises_anything_but_diagnostics(tmp_path):
    with pytest.raises(RecipeError) as err:
        lower(tmp_path, "m = (((a\nx = 1 +\ny = f(,)\n")
    assert {d.code for d in err.value.diagnostics} == {"E001", "E002"}


def test_check_works_from_any_directory(tmp_path, monkeypatch):
    from recipec.cli import main

    quickstart = Path(__file__).parents[1] / "examples" / "quickstart.rcp"
    monkeypatch.chdir(tmp_path)
    assert main(["check", str(quickstart)]) == 0
    assert os.listdir(tmp_path) == []  # check writes nothing


@pytest.mark.parametrize("text, code, message", [
    ("recipec1\nx = 1\n", "E003", "missing header"),
    ("recipec 1\ntrue = 1\n", "E001", "`true` is a reserved word"),
    ("recipec 1\nx = \u0661\u0662\n", "E001", "unexpected character"),
    ("recipec 1\nx = " + "-" * 300 + "1\n", "E001", "nested too deeply"),
    ("recipec 1\nexport " + " + ".join(["1"] * 400) + ' to "out"\n', "E001", "nested too deeply"),
    ("recipec 1\nx = 1e400\n", "E001", "out of range"),
])
def test_edge_inputs_get_located_errors(text, code, message):
    with pytest.raises(RecipeError) as err:
        parse(text)
    assert err.value.diagnostics[0].code == code and message in err.value.diagnostics[0].message


def test_a_byte_order_mark_is_ignored(tmp_path):
    path = write(tmp_path / "bom.rcp", "\ufeffrecipec 1\nx = 1\n")
    from recipec.syntax import parse_file

    assert parse_file(path).version == 1
