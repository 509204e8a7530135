"""ONNX export as a user runs it: tiny Llama, GPT-2 and a headless BERT exported, run in onnxruntime and
compared with PyTorch; rebuilt byte for byte by `verify`; a parity failure that leaves no `.onnx` behind.

Each export traces the model with torch.export, which takes tens of seconds even for a tiny model, so the
module builds one recipe once and every test reads it.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import transformers

from helpers import run_cli
from recipec.arch import preset_config
from recipec.backends import onnx_export
from recipec.backends.onnx_export import ParityCase, parity_cases, worst_mismatch

# Between the tiny Llama's fp32 weights (820 KB) and GPT-2's and BERT's (under 600 KB): the Llama goes
# through the external-data path that large models take, the others stay single-file.
EXTERNAL_DATA_ABOVE = 700_000

RECIPE = """recipec 1
llama = init("llama", size="tiny", seed=1)
gpt = init("gpt2", size="tiny", seed=2)
encoder = load("models/encoder")
export llama to "out/llama"
export gpt to "out/gpt"
export llama to "out/llama.onnx"
export onnx(gpt, opset=20) to "out/gpt.onnx"
export encoder to "out/encoder" as onnx
"""


def headless_bert(root: Path) -> Path:
    """A BertModel (no head) saved by transformers: its graph gives `last_hidden_state`."""
    config = {k: v for k, v in preset_config("bert", "tiny").items() if k not in ("architectures", "dtype")}
    torch.manual_seed(3)
    transformers.BertModel(transformers.BertConfig(**config)).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    headless_bert(root / "models" / "encoder")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export, "EXTERNAL_DATA_ABOVE", EXTERNAL_DATA_ABOVE)
        yield built(root, RECIPE)


class _Captured:
    """run_cli's capsys for a module fixture (pytest's capsys is per test)."""

    def __init__(self) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()

    def readouterr(self) -> tuple[str, str]:
        return self.out.getvalue(), self.err.getvalue()


def built(root: Path, recipe: str) -> Path:
    """`root` with `recipe` run in it, quietly, offline, with its own cache (for a module fixture)."""
    (root / "r.rcp").write_text(recipe)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        captured = _Captured()
        with contextlib.redirect_stdout(captured.out), contextlib.redirect_stderr(captured.err):
            status, _, err = run_cli(["run", "--cache", root / "cache", root / "r.rcp"], captured, root)
    assert status == 0, err
    return root


def onnx_and_torch(graph: Path, model, input_ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    feed = {"input_ids": input_ids, "attention_mask": mask}
    if len(session.get_inputs()) == 3:  # the prefill graph of a pair with a KV cache takes positions too
        feed["position_ids"] = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)
    actual = session.run(None, feed)[0]
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask))
    expected = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return actual, expected.numpy()


@pytest.mark.parametrize("name, hf_dir, output", [("llama", "out/llama", "logits"), ("gpt", "out/gpt", "logits"),
                                                 ("encoder", "models/encoder", "last_hidden_state")])
def test_an_exported_graph_runs_in_onnxruntime_and_matches_pytorch(project, name, hf_dir, output):
    release = project / "out" / (f"{name}.onnx" if name != "encoder" else "encoder")
    auto = transformers.AutoModel if output == "last_hidden_state" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(project / hf_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(7)
    input_ids = rng.integers(0, 1024, (2, 9), dtype=np.int64)  # a shape the graph was not traced with
    mask = np.ones_like(input_ids)
    mask[0, :3] = 0  # left padding
    actual, expected = onnx_and_torch(release / "model.onnx", model, input_ids, mask)
    assert actual.shape == expected.shape
    compared = mask.astype(bool)
    np.testing.assert_allclose(actual[compared], expected[compared], atol=1e-4, rtol=1e-3)
    graph = onnx.load(release / "model.onnx", load_external_data=False)
    assert [o.name for o in graph.graph.output] == [output]
    assert [d.dim_param for d in graph.graph.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert min(o.version for o in graph.opset_import if o.domain == "") >= 18
    parity = json.loads((release / "parity.json").read_text())
    assert parity["output"] == output and len(parity["inputs"]) == 2
    assert all(case["max_abs_difference"] <= 1e-4 for case in parity["inputs"])


def test_large_weights_go_to_external_data_beside_the_graph(project):
    llama, gpt = project / "out" / "llama.onnx", project / "out" / "gpt.onnx"
    assert (llama / "model.onnx.data").is_file() and not (gpt / "model.onnx.data").exists()
    onnx.checker.check_model(str(llama / "model.onnx"))
    assert (llama / "model.onnx").stat().st_size < (llama / "model.onnx.data").stat().st_size
    assert json.loads((gpt / "parity.json").read_text())["opset"] == 20
    assert (llama / "config.json").is_file() and not (llama / "model.safetensors").exists()


def test_graphs_carry_no_paths_of_this_machine(project):
    for graph in (project / "out").glob("*/model.onnx"):
        data = graph.read_bytes()
        assert b"stack_trace" not in data and str(Path(torch.__file__).parent).encode() not in data


def test_the_plan_names_the_onnx_nodes(project, capsys):
    status, out, _ = run_cli(["plan", "--cache", project / "cache", project / "r.rcp"], capsys, project)
    assert status == 0 and "llama.onnx" in out and "0 to build, 5 cached, 5 exports" in out


def test_run_locked_and_verify_rebuild_the_same_bytes(project, capsys, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_ABOVE", EXTERNAL_DATA_ABOVE)
    lock = (project / "r.rcp.lock").read_text()
    assert "llama.onnx" in lock
    status, _, err = run_cli(["run", "--locked", "--cache", project / "cache", project / "r.rcp"], capsys, project)
    assert status == 0 and "matches" in err, err
    # verify exports every graph again in a scratch cache and compares every file, byte for byte.
    status, out, err = run_cli(["verify", project / "r.rcp"], capsys, project)
    assert status == 0, err
    assert "5 exports" in out + err and "byte for byte" in out + err


def test_a_parity_failure_names_the_worst_position_and_leaves_no_onnx(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(onnx_export, "ATOL", -1.0)  # nothing can pass: every compared value fails
    monkeypatch.setattr(onnx_export, "RTOL", 0.0)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_ABOVE", 0)  # the data file must not be left behind either
    (tmp_path / "r.rcp").write_text('recipec 1\nm = init("gpt2", size="tiny", seed=5)\nexport m to "out/m.onnx"\n')
    status, _, err = run_cli(["run", "--cache", tmp_path / "cache", tmp_path / "r.rcp"], capsys, tmp_path)
    assert status == 1 and "error[E601]" in err
    assert "`logits` at batch 0, position " in err and "input 1x5, no padding" in err
    assert not (tmp_path / "out" / "m.onnx").exists()
    assert [p for p in tmp_path.rglob("*") if ".onnx" in p.name] == []


def test_the_worst_mismatch_ignores_padding_and_counts_nan():
    expected = np.zeros((2, 3, 4), dtype=np.float32)
    actual = expected.copy()
    mask = np.array([[0, 1, 1], [1, 1, 0]])
    actual[0, 0, 1] = 50.0  # a padded position: never compared
    largest, mismatch = worst_mismatch("c", expected, actual, mask, 1e-4, 1e-3)
    assert mismatch is None and largest == 0.0
    actual[1, 1, 2] = 0.5
    actual[0, 2, 3] = 0.25
    largest, mismatch = worst_mismatch("c", expected, actual, mask, 1e-4, 1e-3)
    assert largest == 0.5 and mismatch.index == (1, 1, 2) and mismatch.allowed == pytest.approx(1e-4)
    actual[0, 1, 0] = np.nan
    _, mismatch = worst_mismatch("c", expected, actual, mask, 1e-4, 1e-3)
    assert mismatch.index == (0, 1, 0) and mismatch.difference == np.inf


def test_parity_inputs_have_both_paddings_and_another_shape():
    cases: list[ParityCase] = parity_cases(1024)
    shapes = [c.input_ids.shape for c in cases]
    assert shapes == [(1, 5), (3, 11)] and onnx_export.EXPORT_SHAPE not in shapes
    mask = cases[1].attention_mask
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1, 0] == 1 and mask[1, -1] == 0 and mask[2].all()


# recipec's own model classes (per-layer heads and FFN widths, low-rank linears): their ONNX graph is how a
# pruned model runs without recipec. `uneven` has different head counts per layer, which prune's ranking
# of a tiny random model does not reliably produce. Two are exported with a KV cache for generation.
COMPRESSED = """recipec 1
l = init("llama", size="tiny", seed=1)
g = init("gpt2", size="tiny", seed=2)
b = init("bert", size="tiny", seed=3)
small = lowrank(prune(l, heads=0.5, ffn=0.5, uniform=false), ratio=0.5)
fewer_heads = prune(g, heads=0.5)
factored = lowrank(prune(b, heads=0.5), ratio=0.5)
export small to "out/small.onnx"
export onnx(fewer_heads, with_cache=true) to "out/fewer_heads.onnx"
export factored to "out/factored.onnx"
export onnx(load("models/uneven"), with_cache=true) to "out/uneven.onnx"
export small to "out/small"
export fewer_heads to "out/fewer_heads"
export factored to "out/factored"
"""


def uneven_llama(root: Path) -> Path:
    """A recipec_llama with 4 then 2 query heads (2 then 1 key/value heads), FFN widths 96 and 40."""
    from recipec.modeling.modeling_recipec import RecipecLlamaConfig, RecipecLlamaForCausalLM

    config = {k: v for k, v in preset_config("llama", "tiny").items() if k not in ("architectures", "dtype", "model_type")}
    config |= {"recipec_heads": [4, 2], "recipec_kv_heads": [2, 1], "recipec_intermediate": [96, 40]}
    torch.manual_seed(4)
    RecipecLlamaForCausalLM(RecipecLlamaConfig(**config)).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_compressed")
    uneven_llama(root / "models" / "uneven")
    return built(root, COMPRESSED)


@pytest.mark.parametrize("name, model_type, per_layer_key", [
    ("small", "recipec_llama", "recipec_low_rank"), ("fewer_heads", "recipec_gpt2", "recipec_heads"),
    ("factored", "recipec_bert", "recipec_low_rank"), ("uneven", "recipec_llama", "recipec_heads")])
def test_pruned_and_low_rank_models_export_and_match_pytorch(compressed, name, model_type, per_layer_key):
    release = compressed / "out" / f"{name}.onnx"
    config = json.loads((release / "config.json").read_text())
    assert config["model_type"] == model_type and config[per_layer_key]
    if name == "small":
        assert len(set(config["recipec_intermediate"])) == 2  # ranked across layers: the widths differ
    hf_dir = compressed / ("models/uneven" if name == "uneven" else f"out/{name}")
    auto = transformers.AutoModelForMaskedLM if "bert" in model_type else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(8)
    input_ids = rng.integers(0, 1024, (2, 7), dtype=np.int64)
    mask = np.ones_like(input_ids)
    mask[1, 5:] = 0  # right padding
    actual, expected = onnx_and_torch(release / "model.onnx", model, input_ids, mask)
    compared = mask.astype(bool)
    np.testing.assert_allclose(actual[compared], expected[compared], atol=1e-4, rtol=1e-3)
    graph = onnx.load(release / "model.onnx", load_external_data=False)
    assert {node.domain for node in graph.graph.node} == {""}  # standard operators only: runs without recipec


@pytest.mark.parametrize("name", ["uneven", "fewer_heads"])
def test_a_graph_pair_with_a_kv_cache_generates_what_transformers_generates(compressed, name):
    release = compressed / "out" / f"{name}.onnx"
    prefill = onnxruntime.InferenceSession(str(release / "model.onnx"), providers=["CPUExecutionProvider"])
    decode = onnxruntime.InferenceSession(str(release / "decode.onnx"), providers=["CPUExecutionProvider"])
    layers = json.loads((release / "config.json").read_text()).get("num_hidden_layers", 2)
    past = [f"past_key_values.{n}.{w}" for n in range(layers) for w in ("key", "value")]
    assert [i.name for i in decode.get_inputs()] == ["input_ids", "attention_mask", "position_ids", *past]
    assert [o.name for o in prefill.get_outputs()] == ["logits", *(p.replace("past_key_values", "present") for p in past)]
    hf_dir = compressed / ("models/uneven" if name == "uneven" else f"out/{name}")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt = np.array([[11, 402, 7, 96, 513, 28, 3]], dtype=np.int64)
    with torch.no_grad():
        expected = model.generate(torch.from_numpy(prompt), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, prompt.shape[1]:].tolist()
    length = prompt.shape[1]
    logits, *cache = prefill.run(None, {"input_ids": prompt, "attention_mask": np.ones_like(prompt),
                                        "position_ids": np.arange(length)[None]})
    generated = []
    for step in range(10):
        generated.append(int(logits[0, -1].argmax()))
        feed = {"input_ids": np.array([[generated[-1]]]), "attention_mask": np.ones((1, length + step + 1), np.int64),
                "position_ids": np.array([[length + step]])}
        logits, *cache = decode.run(None, feed | dict(zip(past, cache)))
    assert generated == expected
    assert cache[0].shape[2] == length + 10  # the cache grew by one position per step
    assert json.loads((release / "parity.json").read_text())["generation"]["tokens_equal"] is True


def test_a_kv_cache_that_generates_otherwise_fails_the_node(tmp_path, capsys, monkeypatch):
    # Every position 0 in onnxruntime's generation (PyTorch gets the same in the logits parity, so that passes):
    # GPT-2's learned positions then give other logits than transformers' generate.
    monkeypatch.setattr(onnx_export, "positions_of", lambda mask: np.zeros_like(mask))
    (tmp_path / "r.rcp").write_text('recipec 1\nm = init("gpt2", size="tiny", seed=5)\n'
                                    'export onnx(m, with_cache=true) to "out/m.onnx"\n')
    status, _, err = run_cli(["run", "--cache", tmp_path / "cache", tmp_path / "r.rcp"], capsys, tmp_path)
    assert status == 1 and "error[E604]" in err and "disagrees with transformers' greedy generation" in err
    assert "the logits of new token 0" in err
    assert [p for p in tmp_path.rglob("*") if ".onnx" in p.name] == []
