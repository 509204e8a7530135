"""The training examples from end to end: `examples/inscp_tiny.rcp` runs offline as the README says.

It trains a tokenizer, a tiny Llama's `sft`, a `ppl_filter`, an `inscp` and a `cp` plus chat vector: about
a minute on two cores (three training workers each import torch), the one slow test of the training ops.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from recipec.cli import main

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture(scope="module")
def inscp_run(tmp_path_factory):
    """inscp_tiny.rcp run once in a copy of its files, with its own cache: (folder, stderr)."""
    root = tmp_path_factory.mktemp("inscp_tiny")
    shutil.copy(EXAMPLES / "inscp_tiny.rcp", root)
    shutil.copytree(EXAMPLES / "data" / "inscp_tiny", root / "data" / "inscp_tiny")
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(err):
        patch.setenv("RECIPEC_CACHE", str(root / "cache"))
        status = main(["run", str(root / "inscp_tiny.rcp")])
    assert status == 0, err.getvalue()
    return root, err.getvalue()


def test_inscp_tiny_releases_a_chat_model_in_its_own_template(inscp_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = inscp_run
    release = root / "out" / "inscp_tiny"
    tokenizer = AutoTokenizer.from_pretrained(str(release))
    assert len(tokenizer) == 512 and tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(str(release))
    assert model.config.vocab_size == 512
    text = "颱風快要來了，大家準備手電筒。"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    losses = [json.loads(line)["loss"] for line in (release / "training_metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]


def test_inscp_tiny_filters_by_the_chat_models_perplexity(inscp_run):
    _, err = inscp_run
    found = re.search(r"warning\[E580\]: kept (\d+) of 40 documents", err)
    assert found and 0 < int(found.group(1)) < 40, err


def test_inscp_tiny_chat_vector_differs_from_inscp(inscp_run):
    root, _ = inscp_run
    inscp = load_file(root / "out" / "inscp_tiny" / "model.safetensors")
    vector = load_file(root / "out" / "inscp_tiny_chat_vector" / "model.safetensors")
    assert inscp.keys() == vector.keys()
    assert any(not inscp[name].equal(vector[name]) for name in inscp)
