"""recipec's own model classes: per-layer heads and widths, low-rank linears, the config convention, registration
with transformers' Auto classes on `import recipec`, and loading a release without recipec (remote code only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import recipec  # noqa: F401  (registers the classes)
from recipec import arch
from recipec.modeling import auto_map, loadable_config, modeling_source

SRC = Path(__file__).resolve().parents[1] / "src"
AUTO = {"llama": transformers.AutoModelForCausalLM, "gpt2": transformers.AutoModelForCausalLM,
        "bert": transformers.AutoModelForMaskedLM}
LOW_RANK = {"llama": "model.layers.0.mlp.up_proj", "gpt2": "transformer.h.1.mlp.c_fc",
            "bert": "bert.encoder.layer.0.intermediate.dense"}


def _save(root: Path, config: dict, auto) -> torch.nn.Module:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = auto.from_config(transformers.AutoConfig.from_pretrained(root)).eval()
    model.save_pretrained(root)
    return model


def _expected_shapes(fam: str, facts, low_rank: dict[str, int]) -> dict[str, tuple[int, ...]]:
    shapes = arch.tensor_shapes_from_facts(fam, facts)
    for path, rank in low_rank.items():
        out_features, in_features = shapes.pop(path + ".weight")
        if fam == "gpt2":  # Conv1D stores (in, out)
            in_features, out_features = out_features, in_features
        shapes[path + ".a.weight"] = (rank, in_features)
        shapes[path + ".b.weight"] = (out_features, rank)
        if shapes.pop(path + ".bias", None):
            shapes[path + ".b.bias"] = (out_features,)
    return shapes


@pytest.mark.parametrize("fam", ["llama", "gpt2", "bert"])
def test_per_layer_shapes_and_low_rank_save_reload_and_run(tmp_path, fam):
    config = arch.preset_config(fam, "tiny")
    facts = arch.facts_from_config(config).with_heads((2, 4)).with_intermediate((96, 128))
    low_rank = {LOW_RANK[fam]: 8}
    out = loadable_config(config, facts, low_rank=low_rank)
    assert out["model_type"] == f"recipec_{fam}" and out["recipec_heads"] == [2, 4]
    assert out["recipec_low_rank"] == low_rank
    model = _save(tmp_path, out, AUTO[fam])
    from safetensors import safe_open
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert saved == _expected_shapes(fam, facts, low_rank)
    again = AUTO[fam].from_pretrained(tmp_path).eval()
    assert type(again).__name__.startswith("Recipec")
    ids = torch.randint(0, 1000, (2, 9))
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_headless_bert_keeps_unprefixed_names_and_buffers(tmp_path):
    config = arch.preset_config("bert", "tiny") | {"architectures": ["BertModel"]}
    facts = arch.facts_from_config(arch.preset_config("bert", "tiny")).with_heads((1, 3))
    out = loadable_config(config, facts)
    assert out["architectures"] == ["RecipecBertModel"]
    model = _save(tmp_path, out, transformers.AutoModel)
    again = transformers.AutoModel.from_pretrained(tmp_path).eval()
    names = set(again.state_dict())
    assert "encoder.layer.0.attention.self.query.weight" in names and not any(n.startswith("bert.") for n in names)
    assert again.embeddings.position_ids.dtype == torch.long
    assert tuple(again.encoder.layer[0].attention.self.query.weight.shape) == (16, 64)
    ids = torch.randint(0, 1000, (2, 7))
    assert torch.equal(model(ids).last_hidden_state, again(ids).last_hidden_state)


def test_stock_config_where_stock_transformers_can_express_the_shape():
    llama = arch.preset_config("llama", "tiny")
    out = loadable_config(llama, arch.facts_from_config(llama).with_heads((2, 2)))
    assert out["model_type"] == "llama" and out["num_attention_heads"] == 2 and out["num_key_value_heads"] == 1
    assert out["head_dim"] == 16 and not any(k.startswith("recipec_") for k in out)
    gpt2 = arch.preset_config("gpt2", "tiny")
    out = loadable_config(gpt2, arch.facts_from_config(gpt2).with_intermediate((64, 64)))
    assert out["model_type"] == "gpt2" and out["n_inner"] == 64
    # gpt2's head size is hidden / heads: fewer heads of the same size needs recipec's classes.
    out = loadable_config(gpt2, arch.facts_from_config(gpt2).with_heads((2, 2)))
    assert out["model_type"] == "recipec_gpt2" and out["n_head"] == 4


def test_recipec_facts_read_back(tmp_path):
    llama = arch.preset_config("llama", "tiny")
    facts = arch.facts_from_config(llama).with_heads((2, 4)).with_intermediate((96, 128))
    assert arch.facts_from_config(loadable_config(llama, facts)) == facts


def test_import_recipec_imports_no_torch():
    code = "import sys, recipec; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(SRC)}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_without_recipec_refused_plainly_or_loaded_as_remote_code(tmp_path):
    config = arch.preset_config("llama", "tiny")
    out = loadable_config(config, arch.facts_from_config(config).with_heads((2, 4)))
    model = _save(tmp_path, out, transformers.AutoModelForCausalLM)
    ids = torch.randint(0, 1000, (1, 6))
    expected = model(ids).logits
    code = ("import sys, torch, transformers\n"
            "try:\n    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "except ValueError as e:\n    print('refused', 'recipec_llama' in str(e))\n")
    plain = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                           cwd=tmp_path, check=False)
    assert "refused True" in plain.stdout, plain.stderr[-2000:]
    # A release adds recipec's own modeling file and auto_map: loadable with trust_remote_code, without recipec.
    released = json.loads((tmp_path / "config.json").read_text()) | {"auto_map": auto_map(out)}
    (tmp_path / "config.json").write_text(json.dumps(released))
    (tmp_path / "modeling_recipec.py").write_bytes(modeling_source())
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch, transformers\n"
            "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
            "torch.save(m(torch.load(sys.argv[1] + '/ids.pt')).logits, sys.argv[1] + '/out.pt')\n"
            "print('recipec' in sys.modules)\n")
    remote = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                                               "PATH": "/usr/bin:/bin"}, check=False)
    assert remote.stdout.strip() == "False", remote.stderr[-2000:]
    assert (torch.load(tmp_path / "out.pt") - expected).abs().max() < 1e-5
    # With recipec imported the registered classes load it, with no remote code.
    local = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(local).__module__ == "recipec.modeling.modeling_recipec"
