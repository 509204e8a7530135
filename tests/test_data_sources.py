"""Data by content: `text` and `chat` resolve to corpus and dataset artifacts whose digest follows every
byte read; malformed data is reported all at once, by file and line, at the data source's span."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from recipec.artifacts import Artifact, ArtifactKind, register as register_kind, KINDS
from recipec.artifacts.corpus import iter_texts
from recipec.artifacts.dataset import iter_conversations
from recipec.ir.types import Kind, Type
from recipec.ops.base import REGISTRY, Cost, Input, Op, Params, register
from helpers import run_cli

TALLY = Kind.register("Tally")


class TallyKind(ArtifactKind):
    """A toy kind of result: one file with a count, released as is."""

    kind = TALLY
    noun = "a tally"
    formats = ("tally",)


class Tally(Op):
    """A toy op that reads a corpus or a dataset and counts its records."""

    name = "tally"
    inputs = (Input("data", Kind.CORPUS),)
    toolchain = ()
    rule = f"{__name__}:build_tally"

    class Params(Params):
        pass

    @classmethod
    def output_type(cls, ctx, inputs, params):
        return Type(TALLY)

    @classmethod
    def cost(cls, inputs, params, out, threads):
        return Cost()


BUILT: list[str] = []


def build_tally(job) -> None:
    texts = list(iter_texts(job.inputs[0]))
    BUILT.append(job.node.label)
    (job.out / "tally.txt").write_text(f"{len(texts)} {sum(map(len, texts))}\n")


@pytest.fixture
def toy(monkeypatch):
    """The toy kind, op and rule, registered for one test and removed after it."""
    register_kind(TallyKind)
    register(Tally)
    BUILT.clear()
    yield
    del REGISTRY["tally"]
    del KINDS[TALLY]


run = run_cli


def write_recipe(root: Path, body: str) -> Path:
    recipe = root / "r.rcp"
    recipe.write_text("recipec 1\n" + body)
    return recipe


def test_a_same_size_edit_rebuilds_exactly_the_nodes_that_read_it(tmp_path, capsys, toy):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a/docs.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    (tmp_path / "b/docs.txt").write_text("one line\nanother\n")
    recipe = write_recipe(tmp_path, 'x = tally(text("a/*.jsonl"))\ny = tally(text("b/*.txt"))\n'
                                    'export x to "out/x"\nexport y to "out/y"\n')
    assert run(["run", str(recipe)], capsys)[0] == 0
    assert sorted(BUILT) == ["x", "y"]
    assert (tmp_path / "out/x/tally.txt").read_text() == "2 10\n"
    assert (tmp_path / "out/y/tally.txt").read_text() == "2 15\n"
    # a kind registered outside recipec is released as its kind says: its files, the marker and the sums
    assert sorted(os.listdir(tmp_path / "out/x")) == [".recipec-release", "SHA256SUMS", "tally.txt"]
    before = tomllib.loads((tmp_path / "r.rcp.lock").read_text())

    BUILT.clear()
    assert run(["run", str(recipe)], capsys)[0] == 0
    assert BUILT == []  # nothing changed: nothing rebuilt, the data not even read again

    docs = tmp_path / "a/docs.jsonl"
    stat = docs.stat()
    docs.write_text('{"text": "hellO"}\n{"text": "world"}\n')  # one byte, same size
    os.utime(docs, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert docs.stat().st_size == stat.st_size
    BUILT.clear()
    assert run(["run", str(recipe)], capsys)[0] == 0
    assert BUILT == ["x"]
    after = tomllib.loads((tmp_path / "r.rcp.lock").read_text())
    assert after["nodes"]["x"]["key"] != before["nodes"]["x"]["key"]
    assert after["nodes"]["y"] == before["nodes"]["y"]


def test_the_plan_knows_data_inputs_by_content(tmp_path, capsys, toy):
    (tmp_path / "docs.jsonl").write_text('{"text": "hello"}\n')
    recipe = write_recipe(tmp_path, 'x = tally(text("docs.jsonl"))\nexport x to "out/x"\n')
    assert run(["run", str(recipe)], capsys)[0] == 0
    status, out, _ = run(["plan", "--json", str(recipe)], capsys)
    steps = {s["label"]: s["status"] for s in json.loads(out)["steps"]}
    assert steps["x"] == "cached"
    # A touch (a checkout, a copy) changes the file's time, not its content: the plan reads it again.
    os.utime(tmp_path / "docs.jsonl", (1e9, 1e9))
    status, out, _ = run(["plan", "--json", str(recipe)], capsys)
    assert {s["label"]: s["status"] for s in json.loads(out)["steps"]}["x"] == "cached"
    (tmp_path / "docs.jsonl").write_text('{"text": "hellO"}\n')
    status, out, _ = run(["plan", "--json", str(recipe)], capsys)
    assert {s["label"]: s["status"] for s in json.loads(out)["steps"]}["x"] != "cached"


def test_lock_records_every_data_file_by_content(tmp_path, capsys, toy):
    (tmp_path / "d").mkdir()
    (tmp_path / "d/1.jsonl").write_text('{"body": "a"}\n')
    (tmp_path / "d/2.jsonl").write_text('{"body": "b"}\n')
    recipe = write_recipe(tmp_path, 'corpus = text("d/*.jsonl", field="body")\nx = tally(corpus)\n'
                                    'export x to "out/x"\n')
    assert run(["lock", str(recipe)], capsys)[0] == 0
    entry = tomllib.loads((tmp_path / "r.rcp.lock").read_text())["inputs"]["corpus"]
    assert entry["op"] == "text" and entry["glob"] == "d/*.jsonl"
    assert [f["name"] for f in entry["files"]] == ["d/1.jsonl", "d/2.jsonl"]
    assert entry["digest"].startswith("blake3:")
    assert run(["run", "--locked", str(recipe)], capsys)[0] == 0
    (tmp_path / "d/2.jsonl").write_text('{"body": "c"}\n')
    status, _, err = run(["run", "--locked", str(recipe)], capsys)
    assert status != 0 and "r.rcp:2:10: error[E506]: input `corpus` file d/2.jsonl" in err, err
    # An unbound input is named by its call, at its place in the recipe, not by its plan id.
    write_recipe(tmp_path, 'x = tally(text("d/*.jsonl", field="body"))\nexport x to "out/x"\n')
    assert run(["lock", str(recipe)], capsys)[0] == 0
    (tmp_path / "d/2.jsonl").write_text('{"body": "d"}\n')
    status, _, err = run(["run", "--locked", str(recipe)], capsys)
    assert status != 0 and 'r.rcp:2:11: error[E506]: input `text("d/*.jsonl", field="body")` file d/2.jsonl' in err, err
    assert "%" not in err


def test_malformed_data_is_reported_all_at_once_by_file_and_line(tmp_path, capsys, toy):
    (tmp_path / "d").mkdir()
    (tmp_path / "d/a.jsonl").write_text('{"text": "fine"}\nnot json\n{"body": "x"}\n{"text": 3}\n')
    (tmp_path / "d/b.txt").write_bytes(b"good\n\xff\xfe bad\n")
    recipe = write_recipe(tmp_path, 'x = tally(text("d/*"))\nexport x to "out/x"\n')
    status, _, err = run(["run", str(recipe)], capsys)
    assert status == 65
    assert "d/a.jsonl:2:1: not JSON: expecting value" in err and "error[E551]" in err
    assert "d/a.jsonl:3: no field `text`" in err and "d/a.jsonl:4: field `text` is int" in err
    assert "d/b.txt:2: invalid UTF-8" in err and "error[E550]" in err
    assert err.count("r.rcp:2:") == 4  # each at the data source's call, not a traceback
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_every_data_source_is_read_before_anything_is_built(tmp_path, capsys, toy):
    # Two sources, each with its own bad lines, each read by its own node: all of it is said at once,
    # before the first node is built (which, in training, would be hours before the second source is read).
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n')
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"text": 1}\n{"messages": []}\n')
    recipe = write_recipe(tmp_path, 'x = tally(text("a.jsonl"))\ny = tally(text("b.jsonl"))\n'
                                    'export x to "out/x"\nexport y to "out/y"\n')
    status, _, err = run(["run", str(recipe)], capsys)
    assert status == 65 and err.count("error[") == 3, err
    assert "a.jsonl:2:10: not JSON: unterminated string starting" in err, err
    assert "b.jsonl:2: field `text` is int" in err and "b.jsonl:3: no field `text`" in err
    assert not (tmp_path / "out").exists() and "Built" not in err


def test_a_glob_of_only_empty_files_is_found_by_check(tmp_path, capsys, toy):
    (tmp_path / "d").mkdir()
    (tmp_path / "d/a.txt").write_text("")
    (tmp_path / "d/b.txt").write_text("")
    recipe = write_recipe(tmp_path, 'x = tally(text("d/*.txt"))\nexport x to "out/x"\n')
    status, _, err = run(["check", str(recipe)], capsys)
    assert status == 66 and "r.rcp:2:16: error[E405]: 'd/*.txt' matches only empty files (2, " in err, err
    (tmp_path / "d/b.txt").write_text("one line\n")
    assert run(["check", str(recipe)], capsys)[0] == 0  # one file with data is enough


def test_files_of_the_wrong_format_are_found_by_check_from_their_first_record(tmp_path, capsys, toy):
    (tmp_path / "zh").mkdir()
    (tmp_path / "zh/a.txt").write_text("第一行\n" * 40)
    (tmp_path / "zh/b.jsonl").write_text('{"text": "x"}\n')
    recipe = write_recipe(tmp_path, 'x = tally(chat("zh/*.txt"))\ny = tally(text("zh/*.jsonl", field="body"))\n'
                                    'export x to "out/x"\nexport y to "out/y"\n')
    status, _, err = run(["check", str(recipe)], capsys)
    assert status == 65 and err.count("error[") == 2, err  # one per file, not one per line
    assert "r.rcp:2:16: error[E551]: zh/a.txt:1:1: not JSON" in err and "plain text is read by text(...)" in err
    assert "r.rcp:3:16: error[E552]: zh/b.jsonl:1: no field `body`" in err


def test_chat_records_are_validated_and_normalized(tmp_path, capsys, toy):
    (tmp_path / "sft.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi", "extra": 1}, {"role": "assistant", "content": "yo"}]}\n'
        '{"messages": []}\n{"messages": [{"role": "robot", "content": "x"}]}\n')
    (tmp_path / "d.txt").write_text("some text\n")
    recipe = write_recipe(tmp_path, 'c = chat("sft.jsonl")\nx = tally(text("d.txt"))\nexport x to "out/x"\n')
    # `c` is bound but unread: a chat source alone builds nothing; read it through the engine directly.
    from recipec.check import lower_file
    from recipec.engine import Engine, RunOptions
    from recipec.diagnostics import RecipeError

    program = lower_file(recipe)
    engine = Engine(program, recipe, RunOptions(cache_dir=tmp_path / "cache"))
    engine.hub_snapshots = {}
    node = next(n for n in program.graph.nodes if n.op == "chat")
    with pytest.raises(RecipeError) as err:
        engine._resolve_input(node)
    messages = [d.message for d in err.value.diagnostics]
    assert messages == ["sft.jsonl:2: an empty `messages` list",
                        "sft.jsonl:3: message 1 has role 'robot', not one of system, user, assistant, tool"]
    assert {d.code for d in err.value.diagnostics} == {"E553"}

    (tmp_path / "sft.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi", "extra": 1}, {"role": "assistant", "content": "yo"}]}\n')
    program = lower_file(recipe)
    node = next(n for n in program.graph.nodes if n.op == "chat")
    artifact = engine._resolve_input(node).artifact
    assert list(iter_conversations(artifact)) == [[{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "yo"}]]


def test_reader_streams_texts_in_file_order(tmp_path):
    from recipec.artifacts.corpus import CorpusKind, read_texts
    from recipec.artifacts.data import resolve_records
    from recipec.store.cache import Cache

    (tmp_path / "a.txt").write_text("first\n\nsecond\n")
    (tmp_path / "b.jsonl").write_text('{"text": "third"}\n')
    files = [tmp_path / "a.txt", tmp_path / "b.jsonl"]
    artifact, _ = resolve_records(CorpusKind, "text", files, {"field": "text"},
                                  lambda p: read_texts(p, p.name, "text"), lambda p: p.name,
                                  Cache(tmp_path / "cache"), 1, False)
    texts = iter_texts(artifact)
    assert next(texts) == "first"  # a generator: records are read as they are asked for
    assert list(texts) == ["second", "third"]
    assert isinstance(artifact, Artifact) and artifact.kind is Kind.CORPUS
