"""The README's first minutes: the quickstart's release is a complete model that stock transformers loads,
tokenizes for and generates from, exactly as the README shows."""

from __future__ import annotations

import shutil
from pathlib import Path

from recipec.cli import main

ROOT = Path(__file__).parents[1]


def test_quickstart_release_generates_with_stock_transformers(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(ROOT / "examples" / "tokenizers", tmp_path / "tokenizers")
    recipe = shutil.copy(ROOT / "examples" / "quickstart.rcp", tmp_path / "quickstart.rcp")
    assert main(["run", str(recipe)]) == 0, capsys.readouterr().err
    release = tmp_path / "out" / "quickstart"

    tok = AutoTokenizer.from_pretrained(release)
    model = AutoModelForCausalLM.from_pretrained(release)
    prompt = tok("w10 w11 w12", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)

    assert prompt["input_ids"].tolist() == [[10, 11, 12]]  # known words, not <unk>
    assert out.shape == (1, 7)
    assert tok.decode(out[0]).startswith("w10 w11 w12 ")
