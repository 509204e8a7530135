"""Source rules: `init` builds seeded random weights; `load` and `hf` resolve to directories on disk.

`init` builds the model with transformers' own initialization (the same weights a user would get from
`from_config` under `torch.manual_seed(seed)`), then writes exactly the tensors `save_pretrained` would,
through the canonical writer. Random initialization draws from one generator in a fixed order, so the
weights do not depend on the thread count.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .. import arch
from ..dtypes import DTYPE_CODES, TensorSpec
from ..ops.sources import Init
from ..store.model_dir import TOKENIZER_FILES
from ..store.tensors import TORCH_DTYPES, ModelWriter, write_json
from ..textprep.vocab import read_tokenizer_json, vocabulary_size
from .job import Job, RunFailure, checked_bytes

_AUTO_CLASS = {"llama": "AutoModelForCausalLM", "gpt2": "AutoModelForCausalLM", "bert": "AutoModelForMaskedLM"}


def build_init(job: Job) -> str:
    import transformers

    params: Init.Params = Init.params_of(job.node)
    config = params.hf_config()
    tokenizer = job.inputs[0].path if job.inputs else None  # a tokenizer value: the model is sized to it
    if tokenizer is not None:
        config.update(tokenizer_facts(tokenizer))
    hf_config = transformers.AutoConfig.for_model(**config)
    auto = getattr(transformers, _AUTO_CLASS[config["model_type"]])
    torch.manual_seed(params.seed)
    model = auto.from_config(hf_config, dtype=torch.float32)
    state = model.state_dict()
    dtype = DTYPE_CODES[params.dtype]
    shapes = arch.tensor_shapes(config)
    layout = [TensorSpec(n, dtype, s) for n, s in shapes.items()]
    writer = ModelWriter(job.out, layout, shard_size=5 * 10**9)
    try:
        for t in layout:
            writer.write(t.name, state[t.name].to(TORCH_DTYPES[dtype]))
            job.progress(t.nbytes)
        digest = writer.finish()
    finally:
        writer.close()
    write_json(job.out / "config.json", config)
    if tokenizer is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer / name).is_file():
                shutil.copyfile(tokenizer / name, job.out / name)
    if params.tokenizer is not None:
        source = Path(params.tokenizer.path)
        for name, expected in params.tokenizer.files.items():
            (job.out / name).write_bytes(checked_bytes(source / name, expected))
    return digest


def tokenizer_facts(directory: Path) -> dict:
    """What a model's config takes from its tokenizer: the vocabulary size and the special tokens' ids."""
    facts = {"vocab_size": vocabulary_size(read_tokenizer_json(directory))}
    generation = directory / "generation_config.json"
    if generation.is_file():
        ids = json.loads(generation.read_text(encoding="utf-8"))
        facts.update({k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids})
    return facts


def convert_pickle(files: list[Path], config_dir: Path, out: Path) -> str:
    """Write pickled weights as canonical safetensors (read with weights_only=True: no code runs)."""
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # an unpicklable or hostile file: refused, said plainly
            raise RunFailure("E505", f"cannot read {file.name} as weights: {err}",
                             "only plain tensors can be loaded from a pickle") from None
        state.update({k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)})
    codes = {v: k for k, v in TORCH_DTYPES.items()}
    layout = [TensorSpec(n, codes[t.dtype], tuple(t.shape)) for n, t in sorted(state.items())]
    writer = ModelWriter(out, layout, shard_size=5 * 10**9)
    try:
        for t in layout:
            writer.write(t.name, state[t.name])
        digest = writer.finish()
    finally:
        writer.close()
    for name in ("config.json",) + TOKENIZER_FILES:
        if (config_dir / name).is_file():
            (out / name).write_bytes((config_dir / name).read_bytes())
    return digest
