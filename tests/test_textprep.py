"""Text preparation for training: tokenizer training, InsCP wrapping, SFT masks, vocabulary extension, token cache.

Tiny corpora written here, tokenizers of ~300 tokens trained in seconds; the committed example tokenizers
(examples/tokenizers) give hand-checkable ids.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from recipec.store.atomic import remove_stale_temporaries
from recipec.textprep import TextPrepError
from recipec.textprep.bpe import train_bpe
from recipec.textprep.encode import chat_format, encode_conversation, encode_document, load_tokenizer, wrap_inscp
from recipec.textprep.templates import DEFAULT_CHAT_TEMPLATE, missing_markers, read_chat_template
from recipec.textprep.tokcache import cached_tokenization, tokenization_key
from recipec.textprep.vocab import extend_rows, extend_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ROOT / "examples" / "tokenizers" / "llama"
LLAMA_CHAT = ROOT / "examples" / "tokenizers" / "llama-chat"
LLAMA_ZH = ROOT / "examples" / "tokenizers" / "llama-zh"

WORDS = ("the", "cat", "sat", "on", "a", "mat", "while", "another", "dog", "ran", "over", "hills", "under",
         "bright", "morning", "light", "and", "quiet", "rivers", "carried", "small", "boats", "past",
         "old", "stone", "bridges", "toward", "distant", "harbours")
HANZI = "台灣的山很高我們一起去看海天氣晴朗大家都喜歡吃飯喝茶讀書寫字學習語言文化歷史"


def english(n: int = 400) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(6 + i % 5)) + "." for i in range(n)]


def chinese(n: int = 300) -> list[str]:
    return ["".join(HANZI[(i * 5 + k * 2) % len(HANZI)] for k in range(8 + i % 7)) + "。" for i in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train_bpe(english() + chinese(), tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=300)


@pytest.fixture(scope="module")
def tok(trained):
    return load_tokenizer(trained)


def piece(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# --- training ---------------------------------------------------------------------------------------------

def test_same_corpus_gives_the_same_bytes_even_in_another_process(tmp_path, trained):
    again = train_bpe(english() + chinese(), tmp_path / "again", vocab_size=300)
    # Another process has other hash seeds; it imports only the trainer (no torch), to stay fast.
    (tmp_path / "corpus.json").write_text(json.dumps(english() + chinese()))
    script = ("import json, sys; from pathlib import Path; sys.path.insert(0, 'src');"
              "from recipec.textprep.bpe import train_bpe;"
              f"train_bpe(json.loads(Path({str(tmp_path / 'corpus.json')!r}).read_text()),"
              f" Path({str(tmp_path / 'other')!r}), vocab_size=300)")
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True)
    names = sorted(p.name for p in trained.iterdir())
    assert names == ["chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    for other in (again, tmp_path / "other"):
        assert sorted(p.name for p in other.iterdir()) == names
        for name in names:
            assert (other / name).read_bytes() == (trained / name).read_bytes(), name


def test_a_trained_tokenizer_loads_with_its_special_tokens_and_template(tok):
    assert len(tok) == 300
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert len(piece(tok, "<|im_start|>")) == 1  # the template's marker is a token of its own
    text = "Unseen words, 數字 123 and emoji 🙂 round-trip."
    assert tok.decode(piece(tok, text)) == text  # byte-level: nothing is unknown


def test_a_custom_template_brings_its_markers_as_special_tokens(tmp_path):
    template = "{% for m in messages %}<|turn|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    tok = load_tokenizer(train_bpe(english(), tmp_path / "t", vocab_size=290, chat_template=template,
                                   special_tokens=["<|tool|>"]))
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<s>", "</s>", "<pad>", "<|tool|>", "<|turn|>"]


def test_an_empty_corpus_or_a_tiny_vocabulary_is_refused(tmp_path):
    with pytest.raises(TextPrepError, match="no text"):
        train_bpe(["", "  \n"], tmp_path / "empty", vocab_size=300)
    with pytest.raises(TextPrepError, match="too small") as caught:
        train_bpe(english(), tmp_path / "small", vocab_size=100)
    assert "vocab_size >= 261" in caught.value.hint


# --- InsCP wrapping ---------------------------------------------------------------------------------------

def test_an_inscp_document_is_the_assistant_answer_to_an_empty_user_turn(tok):
    bos, eos, start = tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<|im_start|>")
    document = "the cat sat on a mat. 台灣的山很高"
    expected = ([bos, start] + piece(tok, "user\n") + [eos]
                + [start] + piece(tok, "assistant\n") + piece(tok, document) + [eos])
    wrapped = wrap_inscp(chat_format(tok), document)
    assert wrapped.ids == expected
    assert wrapped.ids.count(bos) == 1  # the template's BOS only: the tokenizer did not add a second
    assert wrapped.loss_mask == [1] * len(expected)


def test_inscp_with_the_llama_chat_example_tokenizer():
    tok = load_tokenizer(LLAMA_CHAT)
    # <s>[user] </s><s>[assistant] w5 w6 w7</s>: "[", role and "]" are unknown words (0) in that vocabulary.
    wrapped = wrap_inscp(chat_format(tok), "w5 w6 w7")
    assert wrapped.ids == [1, 0, 0, 0, 2, 1, 0, 0, 0, 5, 6, 7, 2]
    masked = wrap_inscp(chat_format(tok), "w5 w6 w7", loss="assistant")
    assert masked.loss_mask == [0] * 9 + [1, 1, 1, 1]


def test_inscp_assistant_loss_covers_the_document_and_its_end_only(tok):
    wrapped = wrap_inscp(chat_format(tok), "quiet rivers", system="be brief", loss="assistant")
    kept = [i for i, m in zip(wrapped.ids, wrapped.loss_mask) if m]
    assert kept == piece(tok, "quiet rivers") + [tok.eos_token_id]
    assert "be brief" in tok.decode(wrapped.ids)


def test_a_tokenizer_without_a_chat_template_is_a_clear_error():
    with pytest.raises(TextPrepError, match="no chat template") as caught:
        chat_format(load_tokenizer(LLAMA))
    assert "template=" in caught.value.hint


def test_a_template_whose_special_tokens_the_tokenizer_lacks_is_a_clear_error():
    with pytest.raises(TextPrepError, match="<\\|im_start\\|>"):
        chat_format(load_tokenizer(LLAMA_CHAT), DEFAULT_CHAT_TEMPLATE)


def test_check_time_helpers_read_templates_and_test_markers_without_transformers(trained):
    assert read_chat_template(trained) == DEFAULT_CHAT_TEMPLATE
    assert read_chat_template(LLAMA_CHAT).startswith("{% for m in messages %}<s>")
    assert read_chat_template(LLAMA) is None
    fast = Tokenizer.from_file(str(LLAMA_CHAT / "tokenizer.json"))

    def encode(text: str) -> list[int]:
        return fast.encode(text, add_special_tokens=False).ids

    assert missing_markers(read_chat_template(LLAMA_CHAT), encode) == []
    assert missing_markers(DEFAULT_CHAT_TEMPLATE, encode) == ["<|im_start|>"]


# --- SFT masks --------------------------------------------------------------------------------------------

TWO_TURNS = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "the cat?"},
             {"role": "assistant", "content": "sat on a mat."}, {"role": "user", "content": "and the dog"},
             {"role": "assistant", "content": "ran over hills 台灣"}]


def test_sft_loss_is_on_assistant_turns_only_and_matches_generation_markers(tok):
    encoded = encode_conversation(chat_format(tok), TWO_TURNS)
    eos = tok.eos_token_id
    kept = [i for i, m in zip(encoded.ids, encoded.loss_mask) if m]
    assert kept == piece(tok, "sat on a mat.") + [eos] + piece(tok, "ran over hills 台灣") + [eos]
    # The default template marks assistant text with {% generation %}: transformers' own mask agrees.
    reference = tok.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert reference["input_ids"] == encoded.ids
    assert reference["assistant_masks"] == encoded.loss_mask


def test_sft_mask_with_a_template_without_generation_markers():
    tok = load_tokenizer(LLAMA_CHAT)
    conversation = [{"role": "user", "content": "w3"}, {"role": "assistant", "content": "w4 w5"},
                    {"role": "user", "content": "w6"}, {"role": "assistant", "content": "w7"}]
    encoded = encode_conversation(chat_format(tok), conversation)
    # <s>[user] w3</s> <s>[assistant] w4 w5</s> <s>[user] w6</s> <s>[assistant] w7</s>
    assert encoded.ids == [1, 0, 0, 0, 3, 2, 1, 0, 0, 0, 4, 5, 2, 1, 0, 0, 0, 6, 2, 1, 0, 0, 0, 7, 2]
    assert encoded.loss_mask == [0] * 10 + [1, 1, 1] + [0] * 10 + [1, 1]


def test_whitespace_a_template_writes_between_turns_is_not_the_assistants(tok):
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    encoded = encode_conversation(chat_format(tok, chatml), TWO_TURNS)
    kept = [i for i, m in zip(encoded.ids, encoded.loss_mask) if m]
    assert kept == piece(tok, "sat on a mat.") + [tok.eos_token_id] + piece(tok, "ran over hills 台灣") + [tok.eos_token_id]
    assert encoded.ids[-1] == piece(tok, "\n")[0] and encoded.loss_mask[-1] == 0


def test_a_template_that_rewrites_earlier_turns_cannot_be_masked(tok):
    counting = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    with pytest.raises(TextPrepError, match="sum of its turns"):
        encode_conversation(chat_format(tok, counting), TWO_TURNS)
    assert sum(encode_conversation(chat_format(tok, counting), TWO_TURNS, loss="all").loss_mask) > 0


@pytest.mark.parametrize("messages", [[], "hello", [{"role": "user"}], [{"role": "user", "content": 3}]])
def test_malformed_conversations_are_refused(tok, messages):
    with pytest.raises(TextPrepError, match="non-empty list"):
        encode_conversation(chat_format(tok), messages)


def test_an_unknown_loss_mode_is_refused(tok):
    with pytest.raises(TextPrepError, match="loss must be one of"):
        wrap_inscp(chat_format(tok), "x", loss="user")


# --- plain documents --------------------------------------------------------------------------------------

def test_a_plain_document_has_one_bos_its_tokens_and_eos(tok):
    encoded = encode_document(tok, "the cat sat.")
    assert encoded.ids == [tok.bos_token_id] + piece(tok, "the cat sat.") + [tok.eos_token_id]
    assert encoded.loss_mask == [1] * len(encoded.ids)


def test_a_plain_document_follows_a_tokenizer_that_adds_no_bos():
    assert encode_document(load_tokenizer(LLAMA), "w3 w4").ids == [3, 4, 2]


# --- vocabulary extension ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def english_only(tmp_path_factory) -> Path:
    return train_bpe(english(), tmp_path_factory.mktemp("en") / "tokenizer", vocab_size=300)


def test_extending_from_a_corpus_appends_tokens_and_moves_no_id(tmp_path, english_only):
    out = tmp_path / "extended"
    extension = extend_tokenizer(english_only, out, add=60, corpus=chinese())
    old, new = load_tokenizer(english_only), load_tokenizer(out)
    assert (extension.old_size, extension.new_size, len(extension.added)) == (300, 360, 60)
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    assert all(new_vocab[token] == i for token, i in old_vocab.items())
    assert sorted(new_vocab[t] for t in extension.added) == list(range(300, 360))
    text = chinese(20)[7]
    before, after = piece(old, text), piece(new, text)
    assert len(after) < len(before)
    assert any(i >= 300 for i in after) and new.decode(after) == text
    assert new.chat_template == old.chat_template  # the other files come along
    assert (out / "generation_config.json").read_bytes() == (english_only / "generation_config.json").read_bytes()


def test_extending_from_another_tokenizer_takes_its_new_tokens_in_order(tmp_path):
    out = tmp_path / "llama-extended"
    extension = extend_tokenizer(LLAMA, out, add=500, other_dir=LLAMA_ZH)
    assert (extension.old_size, extension.new_size) == (1024, 1200)  # all it had: 176 characters
    assert load_tokenizer(out).get_vocab() == load_tokenizer(LLAMA_ZH).get_vocab()


def test_extending_needs_one_compatible_source(tmp_path, english_only):
    with pytest.raises(TextPrepError, match="exactly one"):
        extend_tokenizer(LLAMA, tmp_path / "x", add=5)
    with pytest.raises(TextPrepError, match="WordLevel"):
        extend_tokenizer(LLAMA, tmp_path / "x", add=5, other_dir=english_only)
    with pytest.raises(TextPrepError, match="no new tokens"):
        extend_tokenizer(LLAMA_ZH, tmp_path / "x", add=5, other_dir=LLAMA)


def test_a_missing_or_broken_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TextPrepError, match="no tokenizer directory"):
        load_tokenizer(tmp_path / "absent")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TextPrepError, match="is not a tokenizer.json"):
        extend_tokenizer(tmp_path, tmp_path / "out", add=5, corpus=["x"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_embedding_rows_are_the_mean_of_the_old_or_zero(dtype):
    weight = torch.arange(12, dtype=dtype).reshape(4, 3)
    grown = extend_rows(weight, 2)
    assert grown.shape == (6, 3) and grown.dtype == dtype
    assert torch.equal(grown[:4], weight)
    assert torch.equal(grown[4], torch.tensor([4.5, 5.5, 6.5], dtype=dtype))
    assert torch.equal(grown[5], grown[4])
    assert torch.equal(extend_rows(weight, 1, init="zero")[4], torch.zeros(3, dtype=dtype))
    with pytest.raises(TextPrepError, match="init must be"):
        extend_rows(weight, 1, init="random")


# --- tokenization cache -----------------------------------------------------------------------------------

def test_a_second_tokenization_with_the_same_inputs_comes_from_the_cache(tmp_path, trained, tok):
    documents = ["the cat sat.", "台灣的山很高", ""]
    calls = []

    def tokenize():
        calls.append(1)
        return (encode_document(tok, d) for d in documents)

    key = tokenization_key(trained, "sha256:data", "cp", {})
    (tmp_path / f".recipec-tmp-{key}-999999").mkdir()  # left by a killed run
    first = cached_tokenization(tmp_path, key, tokenize)
    second = cached_tokenization(tmp_path, key, tokenize)
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [key]
    assert len(second) == 3 and second.tokens == first.tokens
    for i, text in enumerate(documents):
        ids, mask = second.document(i)
        assert ids.tolist() == encode_document(tok, text).ids and mask.tolist() == [1] * len(ids)


def test_a_temporary_that_a_live_process_is_writing_is_left_to_it(tmp_path, trained, tok):
    """Two ranks of a launched job tokenize the same data at once: neither removes the other's temporary,
    which that one would then rename into place with files missing. Once its process is gone, it goes."""
    key = tokenization_key(trained, "sha256:data", "cp", {})
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = tmp_path / f".recipec-tmp-{key}-{writer.pid}"
    try:
        live.mkdir()
        (live / "ids.npy").write_bytes(b"being written")
        docs = cached_tokenization(tmp_path, key, lambda: (encode_document(tok, d) for d in ["the cat"]))
        assert len(docs) == 1 and (live / "ids.npy").read_bytes() == b"being written"
    finally:
        writer.kill()
        writer.wait()
    assert remove_stale_temporaries(tmp_path, key) == 1 and sorted(p.name for p in tmp_path.iterdir()) == [key]


def test_the_cache_key_follows_tokenizer_bytes_data_and_wrapping(tmp_path, trained):
    key = tokenization_key(trained, "sha256:a", "inscp", {"system": None, "loss": "all"})
    assert key == tokenization_key(trained, "sha256:a", "inscp", {"loss": "all", "system": None})
    assert key != tokenization_key(trained, "sha256:b", "inscp", {"system": None, "loss": "all"})
    assert key != tokenization_key(trained, "sha256:a", "cp", {"system": None, "loss": "all"})
    assert key != tokenization_key(trained, "sha256:a", "inscp", {"system": "hi", "loss": "all"})
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in trained.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert tokenization_key(copy, "sha256:a", "inscp", {"system": None, "loss": "all"}) == key
    (copy / "generation_config.json").write_text("{}")  # cannot change tokenization
    assert tokenization_key(copy, "sha256:a", "inscp", {"system": None, "loss": "all"}) == key
    (copy / "chat_template.jinja").write_text("{{ messages }}")
    assert tokenization_key(copy, "sha256:a", "inscp", {"system": None, "loss": "all"}) != key


def test_a_folder_without_a_tokenizer_is_refused_not_loaded_empty(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TextPrepError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)


# --- estimate: a corpus's tokens and documents at check time, from a sample ---------------------------


def test_the_estimate_counts_wide_characters_as_tokens_and_prose_by_four_characters(tmp_path):
    from recipec.textprep.estimate import TOKENS_PER_WIDE_CHAR, estimate_files

    english, chinese = tmp_path / "en.txt", tmp_path / "zh.txt"
    english.write_text("abcd efgh\n\n" * 10)  # 10 documents of 9 characters; blank lines are not documents
    chinese.write_text("臺灣最高的山是玉山\n" * 10)  # 10 documents of 9 characters (27 bytes each)
    assert estimate_files([english], lambda p: False) == (round(10 * 9 / 4) + 10, 10)
    assert estimate_files([chinese], lambda p: False) == (round(10 * 9 * TOKENS_PER_WIDE_CHAR) + 10, 10)


def test_the_estimate_of_json_lines_counts_their_strings_not_their_keys(tmp_path):
    from recipec.textprep.estimate import TOKENS_PER_WIDE_CHAR, estimate_files

    records = tmp_path / "d.jsonl"
    records.write_text('{"text": "你好", "id": 7}\n' * 4 + '{"messages": [{"role": "user", "content": "你好"}]}\n')
    tokens, documents = estimate_files([records], lambda p: True)
    # "user" is a token; one end-of-text per document
    assert documents == 5 and tokens == round(5 * 2 * TOKENS_PER_WIDE_CHAR + 1 + 5)


def test_the_estimate_of_a_large_corpus_scales_its_sample_to_the_file_sizes(tmp_path, monkeypatch):
    from recipec.textprep import estimate

    monkeypatch.setattr(estimate, "SAMPLE_BYTES", 4096)
    monkeypatch.setattr(estimate, "SAMPLED_FILES", 3)
    files = []
    for i in range(7):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text("四個漢字 and some prose\n" * (500 + 100 * i))
    tokens, documents = estimate.estimate_files(files, lambda p: False)
    lines = sum(500 + 100 * i for i in range(7))
    assert abs(documents - lines) <= 0.02 * lines
    per_line = 4 * estimate.TOKENS_PER_WIDE_CHAR + len(" and some prose") / 4 + 1
    assert abs(tokens - lines * per_line) <= 0.02 * tokens
