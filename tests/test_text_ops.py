"""The text ops as a user runs them: `tokenizer`, `init(..., tokenizer=)`, `extend_vocab`, `ppl_filter`.

Recipes in, files and messages out. Tiny corpora written here; tokenizers of ~300 tokens and a tiny Llama.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipec.cli import main

WORDS = ("the", "cat", "sat", "on", "a", "mat", "while", "another", "dog", "ran", "over", "hills", "under",
         "bright", "morning", "light", "and", "quiet", "rivers", "carried", "small", "boats", "past")
HANZI = "台灣的山很高我們一起去看海天氣晴朗大家都喜歡吃飯喝茶讀書寫字學習語言文化歷史"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def english(n: int = 200) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(6 + i % 5)) + "." for i in range(n)]


def chinese(n: int = 150) -> list[str]:
    return ["".join(HANZI[(i * 5 + k * 2) % len(HANZI)] for k in range(8 + i % 7)) + "。" for i in range(n)]


def run(root: Path, body: str, capsys, *args: str) -> tuple[int, str]:
    recipe = root / "r.rcp"
    recipe.write_text("recipec 1\n" + body)
    old = Path.cwd()
    os.chdir(root)
    try:
        status = main(["run", *args, str(recipe)])
    finally:
        os.chdir(old)
    return status, capsys.readouterr().err


@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "en.txt").write_text("\n".join(english()) + "\n")
    (tmp_path / "data" / "zh.txt").write_text("\n".join(chinese()) + "\n")
    return tmp_path


BUILD = """en = text("data/en.txt")
zh = text("data/zh.txt")
tok = tokenizer(en, vocab_size=300)
base = init("llama", size="tiny", tokenizer=tok)
ext = extend_vocab(base, corpus=zh, add=40)
export tok to "out/tok"
export base to "out/base"
export ext to "out/ext"
"""


@pytest.fixture
def built(project, capsys) -> Path:
    status, err = run(project, BUILD, capsys)
    assert status == 0, err
    return project / "out"


def test_the_same_corpus_trains_the_same_tokenizer_bytes(built, project, capsys, tmp_path_factory):
    again = tmp_path_factory.mktemp("elsewhere")
    status, err = run(project, BUILD.replace('"out/', '"again/'), capsys, "--cache", str(again))
    assert status == 0, err
    names = sorted(p.name for p in (built / "tok").iterdir())
    assert "tokenizer.json" in names and "chat_template.jinja" in names
    for name in names:
        assert (project / "again" / "tok" / name).read_bytes() == (built / "tok" / name).read_bytes(), name


def test_init_is_sized_to_the_trained_tokenizer_and_ships_it(built):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(built / "base"))
    weights = load_file(built / "base" / "model.safetensors")
    config = json.loads((built / "base" / "config.json").read_text())
    assert len(tokenizer) == 300 == config["vocab_size"] == weights[EMBED].shape[0] == weights[HEAD].shape[0]
    assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert tokenizer.chat_template


def test_extend_vocab_appends_mean_rows_and_keeps_everything_else(built):
    from transformers import AutoTokenizer

    old, new = load_file(built / "base" / "model.safetensors"), load_file(built / "ext" / "model.safetensors")
    assert set(old) == set(new)
    for name in old:
        if name in (EMBED, HEAD):
            assert new[name].shape[0] == old[name].shape[0] + 40
            assert torch.equal(new[name][:300], old[name])  # existing rows byte for byte
            assert torch.equal(new[name][300:], old[name].mean(dim=0, keepdim=True).expand(40, -1))
        else:
            assert torch.equal(new[name], old[name]), name
    before, after = AutoTokenizer.from_pretrained(str(built / "base")), AutoTokenizer.from_pretrained(str(built / "ext"))
    assert len(after) == 340 == json.loads((built / "ext" / "config.json").read_text())["vocab_size"]
    vocab = after.get_vocab()
    assert all(vocab[token] == i for token, i in before.get_vocab().items())  # no id moved
    assert len(after.encode(chinese()[0])) < len(before.encode(chinese()[0]))  # the new tokens are used


def test_the_plan_knows_the_sizes_before_anything_runs(project, capsys):
    (project / "r.rcp").write_text("recipec 1\n" + BUILD)
    assert main(["plan", str(project / "r.rcp")]) == 0
    out = capsys.readouterr().out
    # tiny Llama, hidden 64: 300 rows in its embedding and output projection, then 40 more in each
    base_line, ext_line = (line for line in out.splitlines() if "params" in line)
    assert "112.4 K params" in base_line and "117.6 K params" in ext_line


def test_extend_vocab_from_another_tokenizer(project, capsys):
    body = BUILD.replace("corpus=zh, add=40", "tokenizer=tokenizer(zh, vocab_size=320), add=20")
    status, err = run(project, body, capsys)
    assert status == 0, err
    weights = load_file(project / "out" / "ext" / "model.safetensors")
    assert weights[EMBED].shape[0] == 320


def test_a_corpus_too_small_for_the_vocabulary_is_a_clear_error(project, capsys):
    (project / "data" / "one.txt").write_text("ab\n")
    status, err = run(project, 'tok = tokenizer(text("data/one.txt"), vocab_size=400)\nexport tok to "out/t"\n',
                      capsys)
    assert status == 1 and "E581" in err and "Traceback" not in err


# --- ppl_filter ------------------------------------------------------------------------------------------

REPEATED = "~"  # absent from the training corpus: `~~~` stays one token per character


@pytest.fixture
def scorer(project) -> Path:
    """A Llama that predicts `~` after anything: every embedding row the same vector, so every position's
    hidden state is the same h, and only the output row of `~` points along h."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from recipec import arch
    from recipec.textprep.bpe import train_bpe

    model_dir = train_bpe(english(), project / "scorer", vocab_size=300)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    config = LlamaConfig(**{**arch.preset_config("llama", "tiny"), "vocab_size": len(tokenizer),
                            "tie_word_embeddings": False})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = torch.randn(config.hidden_size)
        h = model.model(input_ids=torch.tensor([[1, 2]])).last_hidden_state[0, 0]
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(REPEATED)] = 50 * h / h.dot(h)
    model.save_pretrained(str(model_dir))
    return model_dir


def test_ppl_filter_keeps_the_documents_within_bounds(project, scorer, capsys):
    plausible = [REPEATED * (60 + i) for i in range(3)]
    docs = [english()[0], plausible[0], english()[1], plausible[1], plausible[2]]
    (project / "data" / "mixed.txt").write_text("\n".join(docs) + "\n")
    body = ('kept = ppl_filter(text("data/mixed.txt"), load("scorer"), max=100, batch=2)\n'
            'tok = tokenizer(kept, vocab_size=262)\nexport tok to "out/t"\n')
    status, err = run(project, body, capsys)
    assert status == 0, err
    assert "warning[E580]: kept 3 of 5 documents" in err
    from recipec.store.cache import Cache

    cache = Cache(Path(os.environ["RECIPEC_CACHE"]))
    (filtered,) = [d for d in cache.object_dirs() if (d / "ppl_filter.json").is_file()]
    records = [json.loads(line)["text"] for line in (filtered / "records.jsonl").read_text().splitlines()]
    assert records == plausible
    summary = json.loads((filtered / "ppl_filter.json").read_text())
    assert (summary["kept"], summary["dropped"]) == (3, 2)
    assert sum(b["count"] for b in summary["histogram"]) == 5 and summary["histogram"][-1]["count"] == 2

    status, err = run(project, body.replace("max=100", "min=100"), capsys)
    assert status == 0 and "kept 2 of 5 documents" in err


def test_ppl_filter_that_keeps_nothing_is_an_error_at_the_op(project, scorer, capsys):
    (project / "data" / "en_few.txt").write_text("\n".join(english(3)) + "\n")
    body = ('kept = ppl_filter(text("data/en_few.txt"), load("scorer"), max=10)\n'
            'tok = tokenizer(kept, vocab_size=262)\nexport tok to "out/t"\n')
    status, err = run(project, body, capsys)
    assert status == 1 and "error[E584]: ppl_filter keeps none of the 3 documents" in err
    assert "kept = ppl_filter(" in err and "Traceback" not in err


def test_extend_vocab_offers_the_row_initializations_textprep_has():
    from typing import get_args

    from recipec.ops.text import ExtendVocab
    from recipec.textprep.vocab import INIT_MODES

    assert get_args(ExtendVocab.Params.model_fields["init"].annotation) == INIT_MODES


def test_the_extended_vocabulary_example_feeds_a_chat_vector(tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer

    root = Path(__file__).resolve().parents[1] / "examples"
    shutil.copy(root / "chat_vector_extended.rcp", tmp_path)
    shutil.copytree(root / "data" / "chat_vector_extended", tmp_path / "data" / "chat_vector_extended")
    assert main(["run", str(tmp_path / "chat_vector_extended.rcp")]) == 0, capsys.readouterr().err
    out = tmp_path / "out" / "zh_chat_extended"
    weights = load_file(out / "model.safetensors")
    assert len(AutoTokenizer.from_pretrained(str(out))) == 320 + 48 == weights[EMBED].shape[0]


def test_ppl_filter_scores_conversations_through_the_chat_template(project, scorer, tmp_path):
    from recipec.artifacts import Artifact
    from recipec.backends.job import Job
    from recipec.backends.text import build_ppl_filter
    from recipec.ir.graph import Node
    from recipec.ir.types import Kind, Type

    talks = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": REPEATED * 40}],
             [{"role": "user", "content": english()[2]}, {"role": "assistant", "content": english()[3]}]]
    data = tmp_path / "conversations"
    data.mkdir()
    lines = [json.dumps({"messages": m}, ensure_ascii=False, sort_keys=True) + "\n" for m in talks]
    (data / "records.jsonl").write_text("".join(lines))
    node = Node(1, "ppl_filter", (), {"max": 1e30, "min": None, "seq_len": 16, "batch": 3}, Type(Kind.DATASET))
    out = tmp_path / "out"
    out.mkdir()
    job = Job(node, [Artifact(Kind.DATASET, data, "d"), Artifact(Kind.MODEL, scorer, "m")], out, tmp_path / "w", 1)
    build_ppl_filter(job)
    assert (out / "records.jsonl").read_text() == "".join(lines)  # kept as they were, in order
    summary = json.loads((out / "ppl_filter.json").read_text())
    assert summary["unit"] == "conversations" and summary["kept"] == 2
    assert summary["min"] < summary["max"]  # the `~` answer is the likelier one
    assert [w.code for w in job.warnings] == ["E580"]
