"""The contract between ops and backends: every buildable op names a rule that imports; a rule reads the
op's validated `Params` back from the node; keys hold the op's own toolchain and its precision; the
README's op and code tables are the generated ones."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from recipec.backends import rule_for, rule_module
from recipec.check import lower_file
from recipec.cli import main
from recipec.codes import codes_markdown
from recipec.ir.graph import Graph
from recipec.ir.types import Kind, Type
from recipec.ops import REGISTRY, ops_markdown
from recipec.ops import base
from recipec.ops.base import Op, Params, Precision, cache_key, register

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.rcp"))


def buildable() -> list[str]:
    return sorted(name for name, op in REGISTRY.items() if op.builds)


@pytest.mark.parametrize("name", buildable())
def test_every_buildable_op_names_a_rule_that_imports(name):
    assert REGISTRY[name].rule, f"`{name}` builds a result but names no rule"
    assert callable(rule_for(name)), f"`{name}`'s rule {REGISTRY[name].rule!r} is not a function"


def test_finding_the_rules_imports_no_torch():
    code = ("import sys\nfrom recipec.backends import rule_module\nfrom recipec.ops import REGISTRY\n"
            "[rule_module(n) for n, op in REGISTRY.items() if op.builds]\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("recipe", EXAMPLES, ids=lambda p: p.name)
def test_a_rule_reads_back_exactly_the_parameters_the_node_records(recipe):
    program = lower_file(recipe)
    built = [n for n in program.graph.reachable() if REGISTRY[n.op].builds]
    assert built
    for node in built:
        op = REGISTRY[node.op]
        params = op.params_of(node)
        assert isinstance(params, op.Params)
        assert params.model_dump(mode="json") == node.params, node.label


def test_files_a_combine_copies_are_typed_and_keyed_by_content(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "chat.jinja").write_text("{{ messages }}")
    (tmp_path / "r.rcp").write_text('recipec 1\na = init("llama", size="tiny", seed=1)\nb = init("llama", size="tiny", seed=2)\n'
                                    'm = combine(0.5*a + 0.5*b, tokenizer="tok", chat_template="chat.jinja")\n'
                                    'export m to "out"\n')
    node = next(n for n in lower_file(tmp_path / "r.rcp").graph.nodes if n.op == "combine")
    params = REGISTRY["combine"].params_of(node)
    assert params.tokenizer.path == str((tmp_path / "tok").resolve()) and set(params.tokenizer.files) == {"tokenizer.json"}
    assert params.chat_template.path == str((tmp_path / "chat.jinja").resolve()) and len(params.chat_template.sha256) == 64
    assert params.coefficients == (0.5, 0.5)
    assert str(tmp_path) not in str(base.key_params(node.params))  # the key holds content, not places


@pytest.mark.parametrize("argument, message", [
    ("density=1.5", "`density`"), ("density=0", "`density`"), ("drop_rate=1", "`drop_rate`"),
    ("t=1.2", "`t`"), ("seed=-1", "`seed`"),
])
def test_a_parameter_out_of_its_range_is_refused_once_at_check_time(tmp_path, capsys, argument, message):
    (tmp_path / "r.rcp").write_text('recipec 1\nb = init("llama", size="tiny", seed=0)\n'
                                    'x = init("llama", size="tiny", seed=1)\ny = init("llama", size="tiny", seed=2)\n'
                                    f'm = merge(x, y, base=b, method="dare", {argument})\nexport m to "out"\n')
    assert main(["check", str(tmp_path / "r.rcp")]) == 65
    err = capsys.readouterr().err
    assert "error[E203]" in err and message in err and "r.rcp:5:" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ toy ops


class _Toy(Op):
    """A toy op for these tests. Example: `toy()`"""

    name = "toy"
    toolchain = ("torch", "accelerate", "onnx")  # packages the lockfile's fixed list does not hold

    class Params(Params):
        precision: Precision = Field("auto", description="the compute precision")

    @classmethod
    def output_type(cls, ctx, inputs, params):
        return Type(Kind.MODEL, None)


def build_toy(job):  # the rule a toy op names by this test module's name
    raise AssertionError("never run")


@pytest.fixture
def toy():
    register(_Toy)
    try:
        yield _Toy
    finally:
        REGISTRY.pop("toy")
        _Toy.rule = None


def _toy_node(**params):
    return Graph().add("toy", (), _Toy.Params(**params).model_dump(mode="json"), Type(Kind.MODEL, None))


def test_a_key_holds_the_versions_of_the_packages_the_op_lists(toy, monkeypatch):
    key = cache_key(_toy_node(), [])  # accelerate and onnx need no entry in any fixed list
    versions = {"accelerate": "1.0", "onnx": "absent"}
    monkeypatch.setattr(base, "package_version", lambda p: versions.get(p, "x"))
    before = cache_key(_toy_node(), [])
    versions["accelerate"] = "2.0"
    assert cache_key(_toy_node(), []) != before
    assert key != before  # the installed versions were used, not a constant


def test_a_key_holds_the_precision_where_an_op_has_one_and_no_global_compute_dtype(toy):
    assert cache_key(_toy_node(precision="bf16"), []) != cache_key(_toy_node(precision="fp32"), [])
    assert "compute_dtype" not in base.cache_key.__code__.co_consts


def test_an_op_can_name_a_rule_outside_recipec(toy):
    _Toy.rule = f"{__name__}:build_toy"
    assert rule_module("toy") == (__name__, "build_toy") and rule_for("toy") is build_toy
    _Toy.rule = "merge:build_merge"
    assert rule_module("toy") == ("recipec.backends.merge", "build_merge")


def test_a_buildable_op_without_a_rule_is_refused_before_anything_runs(toy, tmp_path, capsys):
    (tmp_path / "r.rcp").write_text('recipec 1\nm = toy()\nexport m to "out"\n')
    assert main(["run", str(tmp_path / "r.rcp")]) == 65
    err = capsys.readouterr().err
    assert "error[E305]: no rule for `toy`" in err and "r.rcp:2:5" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- README tables


def readme_table(name: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- generated: {name}\b[^>]*-->\n(.*?)<!-- end -->", text, re.DOTALL)
    assert found, f"README.md has no <!-- generated: {name} --> table"
    return found.group(1)


def test_readme_op_table_is_the_generated_one(capsys):
    assert main(["explain", "ops", "--markdown"]) == 0
    assert capsys.readouterr().out == ops_markdown() == readme_table("ops"), \
        "README.md's op table is stale: replace it with `recipec explain ops --markdown`"


def test_readme_code_table_is_the_generated_one(capsys):
    assert main(["explain", "codes", "--markdown"]) == 0
    assert capsys.readouterr().out == codes_markdown() == readme_table("codes"), \
        "README.md's code table is stale: replace it with `recipec explain codes --markdown`"


def test_the_op_table_names_every_op_with_its_example():
    table = ops_markdown()
    for name, op in REGISTRY.items():
        assert f"| `{name}(" in table
        assert "Example: `" in (op.__doc__ or ""), f"`{name}`'s docstring has no example"
