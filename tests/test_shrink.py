"""drop_layers and lowrank on tiny llama, gpt2 and bert models (a headless BertModel included): the outputs
reload and compute what the math says, the plan's signature is the built one, bad sizes are refused.

One recipe builds every case once for the module (tiny `init` models, one thread). Check-time errors are the
golden case tests/golden/diagnostics/shrink.rcp.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from recipec.arch import facts_from_config
from recipec.backends.shrink import calibration_rows, factorize, shallower_config
from recipec.cli import main
from recipec.ops.shrink import (
    Linear,
    SelectionError,
    energy_rank,
    factorized_signature,
    fixed_rank,
    kept_layers,
    renamed_layers,
    shallower_signature,
)
from recipec.ops.sources import signature_of_dir

EXAMPLES = Path(__file__).parents[1] / "examples"

RECIPE = """recipec 1
llama = init("llama", size="tiny", seed=1, tokenizer="tokenizers/llama-chat")
gpt2 = init("gpt2", size="tiny", seed=2)
bert = init("bert", size="tiny", seed=3, tokenizer="tokenizers/llama-chat")
docs = text("data/tiny_corpus.jsonl")
headless = load("headless")
export llama to "out/llama"
export gpt2 to "out/gpt2"
export bert to "out/bert"
export drop_layers(llama, keep=1) to "out/llama_first"
export drop_layers(llama, layers=[1]) to "out/llama_second"
export drop_layers(gpt2, keep=0.5) to "out/gpt2_half"
export drop_layers(bert, layers=[1]) to "out/bert_second"
export drop_layers(headless, layers=[0, 2]) to "out/headless_two"
export lowrank(llama, ratio=0.5) to "out/llama_lowrank"
export lowrank(gpt2, rank=8, targets=["*.mlp.*"]) to "out/gpt2_lowrank"
export lowrank(bert, rank=8) to "out/bert_lowrank"
export lowrank(headless, rank=4, targets=["*.attention.*"]) to "out/headless_lowrank"
export drop_layers(lowrank(llama, rank=4), layers=[1]) to "out/llama_lowrank_second"
export lowrank(llama, ratio=0.5, data=docs) to "out/llama_whitened"
export lowrank(bert, rank=8, data=docs, scaling="rms") to "out/bert_rms"
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def headless_bert(root: Path) -> Path:
    """A BertModel as encoders are often published: no task head, unprefixed names, an integer buffer saved."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(4)
    model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=32))
    model.save_pretrained(root)
    tensors = load_file(str(root / "model.safetensors"))
    tensors["embeddings.position_ids"] = torch.arange(32, dtype=torch.int64)[None]
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The recipe run once, with its own cache: the folder its exports went to."""
    root = tmp_path_factory.mktemp("shrink")
    headless_bert(root / "headless")
    for extra in ("tokenizers", "data"):
        shutil.copytree(EXAMPLES / extra, root / extra)
    (root / "shrink.rcp").write_text(RECIPE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECIPEC_CACHE", str(root / "cache"))
        assert main(["run", str(root / "shrink.rcp"), "--threads", "1"]) == 0
    return root / "out"


# --- drop_layers: pure parts -------------------------------------------------------------------------------

@pytest.mark.parametrize("count, keep, expected", [
    (12, 0.5, (0, 2, 4, 6, 8, 10)),  # every other layer, from the first
    (12, 6, (0, 2, 4, 6, 8, 10)),
    (12, 4, (0, 3, 6, 9)),
    (4, 1, (0,)),
    (4, 4, (0, 1, 2, 3)),
    (5, 0.6, (0, 1, 3)),
])
def test_keep_spreads_the_kept_layers_evenly_from_the_first(count, keep, expected):
    assert kept_layers(count, keep, None) == expected


@pytest.mark.parametrize("count, keep, layers, message", [
    (2, 0.1, None, "leaves no layer"),
    (2, 3, None, "more layers than the model's 2"),
    (4, 1.5, None, "a count of layers"),
    (4, None, [0, 4], "layer 4 is not a layer"),
    (4, None, [2, 1], "increasing order"),
    (4, None, [1, 1], "increasing order"),
    (4, None, [], "at least one layer"),
    (4, 1, [0], "exactly one of"),
    (4, None, None, "exactly one of"),
])
def test_a_selection_that_cannot_be_kept_is_refused(count, keep, layers, message):
    with pytest.raises(SelectionError, match=message):
        kept_layers(count, keep, layers)


def test_renaming_renumbers_kept_layers_and_leaves_the_rest():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
             "model.layers.2.mlp.up_proj.weight", "model.layers.10.mlp.up_proj.weight", "model.norm.weight"]
    assert renamed_layers("llama", names, (1, 10)) == {
        "model.embed_tokens.weight": "model.embed_tokens.weight",
        "model.layers.1.mlp.up_proj.weight": "model.layers.0.mlp.up_proj.weight",
        "model.layers.10.mlp.up_proj.weight": "model.layers.1.mlp.up_proj.weight",
        "model.norm.weight": "model.norm.weight"}
    # Headless models name their layers without the family's prefix.
    assert renamed_layers("bert", ["encoder.layer.2.output.dense.bias", "embeddings.position_ids"], (2,)) == {
        "encoder.layer.2.output.dense.bias": "encoder.layer.0.output.dense.bias",
        "embeddings.position_ids": "embeddings.position_ids"}


def test_the_config_follows_the_layers_kept():
    config = {"model_type": "llama", "num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"],
              "num_attention_heads": [4, 2, 4, 2], "architectures": ["LlamaForCausalLM"],
              "recipec_low_rank": {"model.layers.1.mlp.up_proj": 8, "model.layers.2.mlp.up_proj": 4}}
    out = shallower_config(config, "llama", 4, (1, 3))
    assert out["num_hidden_layers"] == 2
    assert out["layer_types"] == ["b", "d"] and out["num_attention_heads"] == [2, 2]
    assert out["architectures"] == ["LlamaForCausalLM"]
    assert out["recipec_low_rank"] == {"model.layers.0.mlp.up_proj": 8}
    assert shallower_config({"model_type": "gpt2", "n_layer": 4}, "gpt2", 4, (0,))["n_layer"] == 1


# --- drop_layers: end to end -----------------------------------------------------------------------------

def _sliced(model, kept: tuple[int, ...]):
    """The reference: the same model with only the layers `kept`, sliced in torch."""
    family = model.config.model_type
    owner = model.model if family == "llama" else model.transformer if family == "gpt2" else \
        getattr(model, "bert", model).encoder
    attribute = {"llama": "layers", "gpt2": "h", "bert": "layer"}[family]
    setattr(owner, attribute, torch.nn.ModuleList([getattr(owner, attribute)[i] for i in kept]))
    return model


def _outputs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("source, release, kept", [
    ("llama", "llama_first", (0,)), ("llama", "llama_second", (1,)), ("gpt2", "gpt2_half", (0,)),
    ("bert", "bert_second", (1,)), ("headless", "headless_two", (0, 2)),
])
def test_a_shallower_model_reloads_and_computes_what_its_kept_layers_compute(built, source, release, kept):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    loader = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM, "bert": AutoModelForMaskedLM,
              "headless": AutoModel}[source]
    source_dir = built / source if source != "headless" else built.parent / "headless"
    reference = _sliced(loader.from_pretrained(source_dir).eval(), kept)
    student = loader.from_pretrained(built / release).eval()
    ids = torch.tensor([[3, 17, 5, 9, 30, 2]])
    assert torch.allclose(_outputs(student, ids), _outputs(reference, ids), atol=1e-6)
    config = json.loads((built / release / "config.json").read_text())
    assert config.get("num_hidden_layers", config.get("n_layer")) == len(kept)
    # The plan's signature is the one built, and its facts are the config's.
    planned = shallower_signature(signature_of_dir(source_dir), kept)
    assert signature_of_dir(built / release).tensors == planned.tensors
    if planned.facts is not None:
        assert facts_from_config(config) == planned.facts


def test_kept_tensors_and_integer_buffers_are_carried_byte_for_byte(built):
    source = built.parent / "headless" / "model.safetensors"
    with safe_open(str(source), "pt") as before, safe_open(str(built / "headless_two" / "model.safetensors"), "pt") as after:
        names = set(after.keys())
        assert "embeddings.position_ids" in names and not any(n.startswith("bert.") for n in names)
        assert after.get_tensor("embeddings.position_ids").dtype == torch.int64
        assert torch.equal(after.get_tensor("embeddings.position_ids"), before.get_tensor("embeddings.position_ids"))
        assert torch.equal(after.get_tensor("encoder.layer.1.output.dense.weight"),
                           before.get_tensor("encoder.layer.2.output.dense.weight"))
        assert not any(n.startswith("encoder.layer.2.") for n in names)
    assert (built / "headless_two" / "config.json").is_file()


# --- lowrank: the math -------------------------------------------------------------------------------------

def _weight(out_features=24, in_features=40, seed=0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def test_full_rank_reproduces_the_weight_and_a_lower_rank_errs_by_the_discarded_singular_values():
    w = _weight()
    a, b, sigma = factorize(w, 24)
    assert a.shape == (24, 40) and b.shape == (24, 24)
    assert torch.allclose(b @ a, w.double(), atol=1e-10)
    for rank in (1, 5, 12):
        a, b, sigma = factorize(w, rank)
        assert (a.shape, b.shape) == ((rank, 40), (24, rank))
        error = torch.linalg.matrix_norm(w.double() - b @ a)
        assert float(error) == pytest.approx(float(sigma[rank:].square().sum().sqrt()), rel=1e-9)
        # √Σ split: both factors carry the same singular values.
        assert torch.allclose(torch.linalg.svdvals(a), sigma[:rank].sqrt(), rtol=1e-9)
        assert torch.allclose(torch.linalg.svdvals(b), sigma[:rank].sqrt(), rtol=1e-9)


def test_activation_aware_factors_spend_the_rank_where_the_inputs_are():
    from recipec.backends.shrink import rms_scale, whitening

    w = _weight()
    # Inputs whose features differ in scale by three orders of magnitude and are correlated, as LLM activations.
    mix = torch.randn(40, 40, generator=torch.Generator().manual_seed(2)).double() * 0.05 + torch.eye(40)
    x = torch.randn(512, 40, generator=torch.Generator().manual_seed(1)).double() * torch.logspace(-2, 1, 40) @ mix
    moment = x.T @ x / len(x)
    errors = {}
    for name, scale in (("plain", None), ("rms", rms_scale(moment.diagonal())), ("whiten", whitening(moment))):
        a, b, _ = factorize(w, 8, scale)
        errors[name] = float(torch.linalg.matrix_norm(x @ (w.double() - b @ a).T))
        a, b, _ = factorize(w, 24, scale)  # at full rank the scaling is undone exactly
        assert torch.allclose(b @ a, w.double(), atol=1e-8)
    assert errors["rms"] < 0.7 * errors["plain"]
    # Whitening is the best any rank-8 pair can do on these inputs: the discarded singular values of W·L.
    best = float(torch.linalg.svdvals(w.double() @ whitening(moment))[8:].square().sum().sqrt()) * len(x) ** 0.5
    assert errors["whiten"] == pytest.approx(best, rel=1e-4) and errors["whiten"] < errors["rms"]  # damping: 1e-6


def test_sizes_follow_rank_ratio_and_energy():
    square = Linear("m", 64, 64)  # break-even at rank 32
    assert fixed_rank(square, None, 0.5) == 16 and fixed_rank(square, 31, None) == 31
    with pytest.raises(SelectionError, match="saves nothing"):
        fixed_rank(square, 32, None)
    with pytest.raises(SelectionError, match="above the rank"):
        fixed_rank(Linear("m", 8, 400), 9, None)
    with pytest.raises(SelectionError, match="no rank at all"):
        fixed_rank(square, None, 0.01)
    assert energy_rank([9.0, 4.0, 1.0, 1.0, 0.0], 0.6) == 1
    assert energy_rank([9.0, 4.0, 1.0, 1.0, 0.0], 0.61) == 2
    assert energy_rank([9.0, 4.0, 1.0, 1.0, 0.0], 1.0) == 4


def test_calibration_reads_the_first_tokens_document_by_document():
    documents = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]]
    assert calibration_rows(documents, 4, 100) == [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]]
    assert calibration_rows(documents, 4, 7) == [[1, 2, 3], [4, 5], [6, 7]]  # each document alone
    assert calibration_rows(documents, 4, 6) == [[1, 2, 3], [4, 5]]  # a piece of one token holds no context


# --- lowrank: end to end -----------------------------------------------------------------------------------

LOWRANK_CASES = [("llama", "llama_lowrank"), ("gpt2", "gpt2_lowrank"), ("bert", "bert_lowrank"),
                 ("headless", "headless_lowrank")]


def _loader(source: str):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    return {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM, "bert": AutoModelForMaskedLM,
            "headless": AutoModel}[source]


def _source_dir(built: Path, source: str) -> Path:
    return built / source if source != "headless" else built.parent / "headless"


@pytest.mark.parametrize("source, release", LOWRANK_CASES)
def test_a_low_rank_model_reloads_through_recipec_and_errs_as_its_singular_values_say(built, source, release):
    import recipec  # noqa: F401  (registers recipec's classes: the folder needs nothing else)

    model = _loader(source).from_pretrained(built / release).eval()
    assert type(model).__name__.startswith("Recipec")
    ids = torch.tensor([[3, 17, 5, 9, 30, 2]])
    original = _loader(source).from_pretrained(_source_dir(built, source)).eval()
    assert _outputs(model, ids).shape == _outputs(original, ids).shape
    config = json.loads((built / release / "config.json").read_text())
    ranks = config["recipec_low_rank"]
    assert ranks and config["model_type"].startswith("recipec_")
    before = load_file(str(_source_dir(built, source) / "model.safetensors"))
    after = load_file(str(built / release / "model.safetensors"))
    for path, rank in ranks.items():
        w = before[f"{path}.weight"].double()
        w = w.T if source == "gpt2" else w
        product = after[f"{path}.b.weight"].double() @ after[f"{path}.a.weight"].double()
        discarded = torch.linalg.svdvals(w)[rank:].square().sum().sqrt()
        assert float(torch.linalg.matrix_norm(w - product)) == pytest.approx(float(discarded), rel=1e-4)
        assert f"{path}.weight" not in after
        if f"{path}.bias" in before:
            assert torch.equal(after[f"{path}.b.bias"], before[f"{path}.bias"])
    untouched = [n for n in before if n.rsplit(".", 1)[0] not in ranks]
    assert all(torch.equal(after[n], before[n]) for n in untouched)  # position_ids and every other tensor
    # The plan's signature is the one built.
    planned = factorized_signature(signature_of_dir(_source_dir(built, source)), ranks)
    assert signature_of_dir(built / release).tensors == planned.tensors
    assert signature_of_dir(built / release).model_type == planned.model_type


def test_dropping_layers_of_a_low_rank_model_keeps_its_factors(built):
    from transformers import AutoModelForCausalLM

    import recipec  # noqa: F401

    config = json.loads((built / "llama_lowrank_second" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    assert set(config["recipec_low_rank"]) == {f"model.layers.0.{m}" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    model = AutoModelForCausalLM.from_pretrained(built / "llama_lowrank_second")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 1024)


def test_at_full_rank_the_model_computes_what_the_original_does(tmp_path, monkeypatch):
    """Full rank saves nothing, so the op refuses it; with that rule lifted, the factors reproduce the outputs."""
    from transformers import AutoModelForCausalLM

    import recipec  # noqa: F401

    monkeypatch.setattr(Linear, "saves", lambda self, rank: True)
    (tmp_path / "full.rcp").write_text('recipec 1\nbase = init("llama", size="tiny", seed=1)\n'
                                       'export base to "out/base"\n'
                                       'export lowrank(base, rank=64, targets=["*.mlp.*"]) to "out/full"\n')
    monkeypatch.setenv("RECIPEC_CACHE", str(tmp_path / "cache"))
    assert main(["run", str(tmp_path / "full.rcp"), "--threads", "1"]) == 0
    ids = torch.tensor([[3, 17, 5, 9, 30, 2, 44, 1000]])
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "full").eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "base").eval()
    assert type(full).__name__ == "RecipecLlamaForCausalLM"
    assert torch.allclose(_outputs(full, ids), _outputs(base, ids), atol=1e-5)


@pytest.mark.parametrize("source, calibrated, plain", [("llama", "llama_whitened", "llama_lowrank"),
                                                      ("bert", "bert_rms", "bert_lowrank")])
def test_calibrated_factors_trade_weight_error_for_output_error_and_reload(built, source, calibrated, plain):
    import recipec  # noqa: F401

    config = json.loads((built / calibrated / "config.json").read_text())
    assert config["recipec_low_rank"] == json.loads((built / plain / "config.json").read_text())["recipec_low_rank"]
    before = load_file(str(built / source / "model.safetensors"))
    factors = {name: load_file(str(built / release / "model.safetensors")) for name, release in
               (("calibrated", calibrated), ("plain", plain))}
    for path in config["recipec_low_rank"]:
        w = before[f"{path}.weight"].double()
        error = {name: float(torch.linalg.matrix_norm(w - f[f"{path}.b.weight"].double() @ f[f"{path}.a.weight"].double()))
                 for name, f in factors.items()}
        # Plain SVD is the best in the weights' own norm; calibration pays for fitting the inputs there.
        assert error["calibrated"] >= error["plain"] * (1 - 1e-5)
    assert any(not torch.equal(factors["calibrated"][n], factors["plain"][n]) for n in factors["plain"])
    model = _loader(source).from_pretrained(built / calibrated).eval()
    assert torch.isfinite(_outputs(model, torch.tensor([[3, 17, 5, 9]]))).all()


def test_energy_that_would_save_nothing_keeps_linears_dense_and_says_so(tmp_path, capsys, monkeypatch):
    (tmp_path / "e.rcp").write_text('recipec 1\nbase = init("gpt2", size="tiny", seed=1)\nexport base to "out/base"\n'
                                    'export lowrank(base, energy=1.0, targets=["*.attn.*"]) to "out/dense"\n')
    monkeypatch.setenv("RECIPEC_CACHE", str(tmp_path / "cache"))
    status, _, err = run_cli(["run", tmp_path / "e.rcp", "--threads", "1"], capsys)
    assert status == 0 and "warning[E598]" in err and "kept dense" in err
    assert load_file(str(tmp_path / "out" / "dense" / "model.safetensors")).keys() == \
        load_file(str(tmp_path / "out" / "base" / "model.safetensors")).keys()
    assert json.loads((tmp_path / "out" / "dense" / "config.json").read_text())["model_type"] == "gpt2"
