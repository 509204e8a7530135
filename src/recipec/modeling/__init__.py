"""The model classes recipec ships, and the config convention that selects them (no torch imported here).

Pruned and low-rank models often have shapes stock transformers cannot express (different head counts per
layer, GPT-2/BERT heads whose size is no longer hidden/heads, factored linears). Such a model's config.json
names `model_type` "recipec_llama", "recipec_gpt2" or "recipec_bert" and adds per-layer keys; its classes live
in `modeling_recipec.py` (self-contained: a release carries a copy of it for `trust_remote_code=True` users).

The convention (written by `loadable_config`, read by `modeling_recipec` and by `arch.facts_from_config`):
- stock keys keep a geometry stock transformers accepts and set the head size (llama: explicit `head_dim`;
  gpt2/bert: hidden size / heads);
- `recipec_heads`, `recipec_kv_heads` (llama only), `recipec_intermediate`: per-layer lists that take
  precedence over the stock counts;
- `recipec_low_rank`: {"<module path>": rank}: that linear is stored as `<path>.a.weight` (rank, in),
  `<path>.b.weight` (out, rank) and `<path>.b.bias` where the original had a bias (nn.Linear layout, also for
  GPT-2's Conv1D modules).
A shape stock transformers can express stays a stock config, so most outputs need no recipec to load.

`import recipec` registers the classes with transformers' Auto classes as soon as transformers is imported
(`install_registration`), so `AutoModelForCausalLM.from_pretrained(dir)` loads such a folder with no remote
code, while `recipec plan` still never imports torch. Stock transformers without recipec refuses the folder
(unknown model_type) instead of loading garbage.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.resources
import importlib.util
import sys

FAMILIES: tuple[str, ...] = ("llama", "gpt2", "bert")
PREFIX = "recipec_"
MODELING_FILE = "modeling_recipec.py"
_MODULE = "recipec.modeling.modeling_recipec"

# Per family: stock class name -> recipec class name, and the Auto classes each recipec class registers with.
_CLASSES = {
    "llama": {"LlamaModel": ("RecipecLlamaModel", "AutoModel"),
              "LlamaForCausalLM": ("RecipecLlamaForCausalLM", "AutoModelForCausalLM")},
    "gpt2": {"GPT2Model": ("RecipecGPT2Model", "AutoModel"),
             "GPT2LMHeadModel": ("RecipecGPT2LMHeadModel", "AutoModelForCausalLM")},
    "bert": {"BertModel": ("RecipecBertModel", "AutoModel"),
             "BertForMaskedLM": ("RecipecBertForMaskedLM", "AutoModelForMaskedLM"),
             "BertForSequenceClassification": ("RecipecBertForSequenceClassification",
                                               "AutoModelForSequenceClassification")},
}
_CONFIG_CLASSES = {"llama": "RecipecLlamaConfig", "gpt2": "RecipecGPT2Config", "bert": "RecipecBertConfig"}
_DEFAULT_HEAD = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM"}
RECIPEC_KEYS: tuple[str, ...] = ("recipec_heads", "recipec_kv_heads", "recipec_intermediate", "recipec_low_rank")
# The stock keys holding each family's head count and FFN width.
_HEAD_KEY = {"llama": "num_attention_heads", "gpt2": "n_head", "bert": "num_attention_heads"}
_WIDTH_KEY = {"llama": "intermediate_size", "gpt2": "n_inner", "bert": "intermediate_size"}


def family(model_type: str) -> str | None:
    """The family ("llama", "gpt2", "bert") of a stock or recipec model_type, or None."""
    name = model_type.removeprefix(PREFIX) if isinstance(model_type, str) else None
    return name if name in FAMILIES else None


def stock_config(config: dict) -> dict:
    """A recipec_* config as its family's stock config (recipec keys and auto_map dropped, stock class names):
    the geometry the per-layer keys modify. A stock config comes back as a copy."""
    fam = family(config.get("model_type"))
    out = {k: v for k, v in config.items() if k not in RECIPEC_KEYS and k != "auto_map"}
    if fam is None or not config["model_type"].startswith(PREFIX):
        return out
    out["model_type"] = fam
    if "architectures" in config:
        stock_names = {recipec: stock for stock, (recipec, _) in _CLASSES[fam].items()}
        out["architectures"] = [stock_names.get(name, name) for name in config["architectures"] or ()]
    return out


def loadable_config(config: dict, facts, low_rank: dict[str, int] | None = None) -> dict:
    """The config.json for a model of `config`'s family with shape `facts` (an `arch.ArchFacts`) and the
    `low_rank` linears: a stock config where stock transformers can express the shape, else a recipec_* one."""
    fam = family(config.get("model_type"))
    if fam is None:
        raise ValueError(f"no recipec model classes for model_type {config.get('model_type')!r}; "
                         f"supported families: {', '.join(FAMILIES)}")
    out = stock_config(config)
    hidden = facts.hidden
    if fam == "llama":
        out["head_dim"] = facts.head_dim  # explicit: it no longer follows from hidden / heads
    if not needs_recipec(fam, facts, bool(low_rank)):
        out[_HEAD_KEY[fam]] = facts.heads[0]
        if fam == "llama":
            out["num_key_value_heads"] = facts.kv_heads[0]
        out[_WIDTH_KEY[fam]] = facts.intermediate[0]
        return out
    out["model_type"] = PREFIX + fam
    heads = out.get(_HEAD_KEY[fam], out.get("num_attention_heads"))
    if fam != "llama":
        # gpt2/bert derive the head size from the stock head count: keep it the one that gives facts.head_dim.
        out[_HEAD_KEY[fam]] = hidden // facts.head_dim
    elif not heads or hidden % heads:
        out["num_attention_heads"] = hidden // facts.head_dim
    names = _CLASSES[fam]
    out["architectures"] = [names.get(name, (name,))[0] for name in out.get("architectures") or [_DEFAULT_HEAD[fam]]]
    out["recipec_heads"] = list(facts.heads)
    if fam == "llama":
        out["recipec_kv_heads"] = list(facts.kv_heads)
    out["recipec_intermediate"] = list(facts.intermediate)
    if low_rank:
        out["recipec_low_rank"] = dict(sorted(low_rank.items()))
    return out


def needs_recipec(model_type: str, facts, low_rank: bool = False) -> bool:
    """Whether a model of this family with shape `facts` (and low-rank linears) needs recipec's classes."""
    if low_rank or not facts.uniform:
        return True
    if family(model_type) == "llama":
        return facts.hidden % facts.heads[0] != 0  # transformers 5 refuses other counts even with head_dim set
    return facts.heads[0] * facts.head_dim != facts.hidden  # gpt2/bert: the head size is hidden / heads


def output_model_type(model_type: str, facts, low_rank: bool = False) -> str:
    """The model_type `loadable_config` writes for a model of `model_type`'s family with shape `facts`."""
    fam = family(model_type)
    return PREFIX + fam if needs_recipec(fam, facts, low_rank) else fam


def auto_map(config: dict) -> dict[str, str]:
    """The `auto_map` a released recipec_* config carries: Auto class -> class in the shipped modeling file."""
    fam = family(config.get("model_type"))
    module = MODELING_FILE.removesuffix(".py")
    entries = {"AutoConfig": f"{module}.{_CONFIG_CLASSES[fam]}"}
    for recipec_name, auto_name in _CLASSES[fam].values():
        entries[auto_name] = f"{module}.{recipec_name}"
    return entries


def is_recipec_config(config: dict) -> bool:
    """Whether a config.json needs recipec's model classes."""
    return isinstance(config.get("model_type"), str) and config["model_type"].startswith(PREFIX) \
        and family(config["model_type"]) is not None


def modeling_source() -> bytes:
    """The bytes of recipec's own modeling file, read from the installed package (never from an input)."""
    return importlib.resources.files(__package__).joinpath(MODELING_FILE).read_bytes()


def register() -> None:
    """Register recipec's model classes with transformers' Auto classes (imports torch; idempotent)."""
    import transformers

    classes = importlib.import_module(_MODULE)
    for fam in FAMILIES:
        config_class = getattr(classes, _CONFIG_CLASSES[fam])
        transformers.AutoConfig.register(PREFIX + fam, config_class, exist_ok=True)
        for recipec_name, auto_name in _CLASSES[fam].values():
            getattr(transformers, auto_name).register(config_class, getattr(classes, recipec_name), exist_ok=True)


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Runs `register` right after `transformers` is imported, so `import recipec` costs no torch import."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register()

    def __getattr__(self, name):
        # Everything else (resource readers, get_source, ...) is the real loader's.
        return getattr(self._loader, name)


def install_registration() -> None:
    """Register now if transformers is already imported, else as soon as it is."""
    if "transformers" in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterWhenImported) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenImported())
