"""Write the tiny tokenizers the offline examples ship with (run once; the outputs are committed).

`llama/`: a 1,024-token word-level tokenizer with Llama's special tokens. `llama-chat/`: the same
tokenizer plus a chat template and its own end-of-turn token, as a chat fine-tune has. `llama-zh/`: the
same 1,024 tokens followed by 176 new CJK tokens (1,200 in all), as a continually pre-trained model with
an extended vocabulary has: the vocabulary-extended chat-vector example combines it with the other two.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

SPECIALS = ["<unk>", "<s>", "</s>"]
BASE = SPECIALS + [f"w{i}" for i in range(3, 1024)]
ZH = BASE + [chr(0x4E00 + i) for i in range(176)]
TEMPLATE = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>[assistant] {% endif %}")


def write(directory: str, vocab: list[str], chat: bool) -> None:
    root = Path(__file__).parent / directory
    root.mkdir(exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.save(str(root / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 128}
    if chat:
        config["chat_template"] = TEMPLATE
    (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": [2] if chat else 2}
    (root / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    write("llama", BASE, chat=False)
    write("llama-chat", BASE, chat=True)
    write("llama-zh", ZH, chat=False)
