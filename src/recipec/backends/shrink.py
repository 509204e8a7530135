"""Shrinking rules: `drop_layers` and `lowrank`, streaming tensor by tensor from the memory-mapped input.

`drop_layers` copies the kept layers' tensors under their new indices and every other tensor byte for byte
(integer buffers such as BERT's `position_ids` included), then updates config.json: the layer count, every
per-layer list (`layer_types`, per-layer head counts and widths) and the paths of `recipec_low_rank`.

`lowrank` factorizes one linear at a time: W (out×in, nn.Linear's orientation; GPT-2's Conv1D weights are
transposed first) in fp64 as U·Σ·Vᵀ, truncated at rank r, and stores B = U_r·√Σ_r (out×r) and A = √Σ_r·V_rᵀ
(r×in), so that B·A is the best rank-r approximation: ‖W − B·A‖_F = √(Σ_{i>r} σ_i²).

With `data`, the factorization is activation-aware: W·S is factorized instead of W and A is multiplied by
S⁻¹ afterwards, where S comes from the linear's inputs X over the calibration tokens, so that directions the
inputs barely use count for little and the rank goes where the outputs need it:
- `scaling="whiten"` (the default; SVD-LLM, Wang et al., 2024): S = L, the Cholesky factor of XᵀX/n. Then
  ‖(W − B·A)·Xᵀ‖_F is the smallest any rank-r pair can make it on the calibration tokens.
- `scaling="rms"` (ASVD-style, Yuan et al., 2023, with the root mean square as the scale): S = diag(s), s_j
  the RMS of input feature j. Holds a vector per linear instead of an in×in matrix.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..arch import facts_from_config
from ..dtypes import TensorSpec
from ..modeling import loadable_config
from ..ops.shrink import (
    TRANSPOSED_FAMILIES,
    DropLayers,
    Linear,
    Lowrank,
    SelectionError,
    energy_rank,
    factorized_shapes,
    family,
    fixed_rank,
    kept_layers,
    layer_count,
    layer_linears,
    renamed_layers,
    targeted,
    unsupported,
)
from ..store.model_dir import TOKENIZER_FILES
from ..store.tensors import TORCH_DTYPES, ModelReader, ModelWriter, write_json
from .job import Job, RunFailure
from .threads import torch_threads

SHARD_SIZE = 5 * 10**9
LAYER_COUNT_KEYS = {"llama": "num_hidden_layers", "gpt2": "n_layer", "bert": "num_hidden_layers"}
# Config lists with one entry per layer (stock `layer_types`; per-layer shapes of recipec's own model classes).
PER_LAYER_KEYS = ("layer_types", "num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim")
LOW_RANK_KEY = "recipec_low_rank"
SCALE_FLOOR = 1e-6  # relative to the largest scale: features never seen still get a finite, tiny weight
# Added to the diagonal of XᵀX/n, relative to its mean, so that its Cholesky factor exists (rank-deficient inputs).
WHITEN_DAMPING = 1e-6


def copy_data_files(source: Path, out: Path) -> None:
    """Tokenizer files, chat template and generation config as the input has them."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)


# --- drop_layers ------------------------------------------------------------------------------------------

def shallower_config(config: dict, model_type: str, count: int, kept: tuple[int, ...]) -> dict:
    """config.json for the layers `kept` of `count`: the layer count, per-layer lists, low-rank paths."""
    config = dict(config)
    keys = [k for k in ("num_hidden_layers", "n_layer") if k in config] or [LAYER_COUNT_KEYS[family(model_type)]]
    for key in keys:
        config[key] = len(kept)
    for key, value in list(config.items()):
        if isinstance(value, list) and len(value) == count and (key in PER_LAYER_KEYS or key.startswith("recipec_")):
            config[key] = [value[i] for i in kept]
    if isinstance(config.get(LOW_RANK_KEY), dict):
        paths = renamed_layers(model_type, config[LOW_RANK_KEY], kept)
        config[LOW_RANK_KEY] = {new: config[LOW_RANK_KEY][old] for old, new in sorted(paths.items())}
    return config


def build_drop_layers(job: Job) -> str:
    params: DropLayers.Params = DropLayers.params_of(job.node)
    files = job.inputs[0].files
    model_type = files.config.get("model_type")
    try:
        if family(model_type) is None:
            raise unsupported(model_type)
        count = layer_count(model_type, files.tensors)
        kept = kept_layers(count, params.keep, params.layers)
    except SelectionError as err:
        raise RunFailure("E595", err.message, err.hint) from None
    names = renamed_layers(model_type, files.tensors, kept)
    layout = [TensorSpec(names[old], e.dtype, tuple(e.shape)) for old, e in sorted(files.tensors.items())
              if old in names]
    reader, writer = ModelReader(files), ModelWriter(job.out, layout, SHARD_SIZE)
    try:
        for old, new in sorted(names.items()):
            writer.write(new, reader.tensor(old))  # the stored bytes, whatever the dtype
            job.progress(files.tensors[old].nbytes)
        digest = writer.finish()
    finally:
        writer.close()
        reader.close()
    write_json(job.out / "config.json", shallower_config(files.config, model_type, count, kept))
    copy_data_files(job.inputs[0].path, job.out)
    return digest


# --- lowrank ----------------------------------------------------------------------------------------------

def scaled(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """W·S in fp64: S = diag(scale) for a vector, the lower-triangular matrix itself for a matrix."""
    w = weight.double()
    if scale is None:
        return w
    return w * scale.double()[None, :] if scale.dim() == 1 else w @ scale.double()


def factorize(weight: torch.Tensor, rank: int, scale: torch.Tensor | None = None):
    """(A, B, σ) with B·A the rank-`rank` approximation of `weight` (out×in) and σ the singular values
    factorized: of W·S when a scale S is given (a vector for a diagonal S, or a lower-triangular matrix), with
    A multiplied by S⁻¹ afterwards. Computed in fp64."""
    u, sigma, vh = torch.linalg.svd(scaled(weight, scale), full_matrices=False)
    root = sigma[:rank].sqrt()
    b = u[:, :rank] * root[None, :]
    a = root[:, None] * vh[:rank]
    if scale is not None and scale.dim() == 1:
        a = a / scale.double()[None, :]
    elif scale is not None:
        a = torch.linalg.solve_triangular(scale.double(), a, upper=False, left=False)  # a·L⁻¹
    return a, b, sigma


def _dense(reader: ModelReader, name: str, model_type: str) -> torch.Tensor:
    """A linear's weight in nn.Linear's (out, in) orientation."""
    weight = reader.tensor(name)
    return weight.t() if family(model_type) in TRANSPOSED_FAMILIES else weight


def _ranks(job: Job, reader: ModelReader, model_type: str, linears: list[Linear], params,
           scales: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each targeted linear's rank; under `energy=`, linears it would not shrink are left out (and warned of)."""
    if params.energy is None:
        return {l.path: fixed_rank(l, params.rank, params.ratio) for l in linears}
    ranks, dense = {}, []
    for linear in linears:
        w = scaled(_dense(reader, f"{linear.path}.weight", model_type), scales.get(linear.path))
        squared = (torch.linalg.svdvals(w) ** 2).tolist()
        rank = energy_rank(squared, params.energy)
        if linear.saves(rank):
            ranks[linear.path] = rank
        else:
            dense.append(linear.path)
    if dense:
        shown = ", ".join(f"`{p}`" for p in dense[:3]) + (f" and {len(dense) - 3} more" if len(dense) > 3 else "")
        job.warn("E598", f"`{job.node.label}`: energy={params.energy:g} needs, for {shown}, a rank that saves "
                         "nothing: kept dense", "lower `energy` to factorize them")
    return ranks


def build_lowrank(job: Job) -> str:
    with torch_threads(1):  # the calibration's sums and the SVDs: the same bits at any thread count
        return _build_lowrank(job)


def _build_lowrank(job: Job) -> str:
    params: Lowrank.Params = Lowrank.params_of(job.node)
    model = job.inputs[0]
    files = model.files
    model_type = files.config.get("model_type")
    shapes = {name: tuple(e.shape) for name, e in files.tensors.items()}
    try:
        if family(model_type) is None:
            raise unsupported(model_type)
        linears = targeted(layer_linears(model_type, shapes), params.targets)
        if params.energy is None:
            for linear in sorted(linears, key=lambda l: (l.break_even, l.path)):
                fixed_rank(linear, params.rank, params.ratio)  # every size checked before any work
        facts_from_config(files.config)  # recipec's classes must be able to describe it
    except SelectionError as err:
        raise RunFailure("E597", err.message, err.hint) from None
    except ValueError as err:
        raise RunFailure("E597", f"lowrank's output loads through recipec's model classes, which cannot describe "
                                 f"this model: {err}") from None
    scales = activation_scales(job, linears, params) if len(job.inputs) > 1 else {}
    reader = ModelReader(files)
    try:
        ranks = _ranks(job, reader, model_type, linears, params, scales)
        out_shapes = factorized_shapes(model_type, shapes, ranks)
        dtypes = {name: files.tensors[_source(name, ranks)].dtype for name in out_shapes}
        layout = [TensorSpec(name, dtypes[name], shape) for name, shape in sorted(out_shapes.items())]
        writer = ModelWriter(job.out, layout, SHARD_SIZE)
        try:
            for name, entry in sorted(files.tensors.items()):
                path, _, kind = name.rpartition(".")
                if path not in ranks:
                    writer.write(name, reader.tensor(name))
                elif kind == "bias":
                    writer.write(f"{path}.b.bias", reader.tensor(name))
                else:
                    a, b, _ = factorize(_dense(reader, name, model_type), ranks[path], scales.get(path))
                    dtype = TORCH_DTYPES[entry.dtype]
                    writer.write(f"{path}.a.weight", a.to(dtype))
                    writer.write(f"{path}.b.weight", b.to(dtype))
                job.progress(entry.nbytes)
            digest = writer.finish()
        finally:
            writer.close()
    finally:
        reader.close()
    write_json(job.out / "config.json", low_rank_config(files.config, ranks))
    copy_data_files(model.path, job.out)
    return digest


def _source(name: str, ranks: dict[str, int]) -> str:
    """The input tensor an output tensor comes from."""
    for suffix, source in ((".a.weight", ".weight"), (".b.weight", ".weight"), (".b.bias", ".bias")):
        if name.endswith(suffix) and name.removesuffix(suffix) in ranks:
            return name.removesuffix(suffix) + source
    return name


def low_rank_config(config: dict, ranks: dict[str, int]) -> dict:
    """config.json of the factorized model: the input's as recipec's classes read it (`recipec_<family>`),
    with every factorized linear's rank by module path (those of an earlier `lowrank` kept)."""
    if not ranks:
        return dict(config)
    merged = {**(config.get(LOW_RANK_KEY) or {}), **ranks}
    return loadable_config(config, facts_from_config(config), merged)


# --- calibration ------------------------------------------------------------------------------------------

def activation_scales(job: Job, linears: list[Linear], params) -> dict[str, torch.Tensor]:
    """path -> that linear's scale S from its inputs over the calibration tokens: the Cholesky factor of their
    second moments (`whiten`) or each feature's RMS (`rms`), floored or damped so that S is invertible."""
    import transformers

    from ..artifacts.corpus import iter_texts
    from ..textprep.encode import encode_document, load_tokenizer

    transformers.logging.disable_progress_bar()
    model_dir, corpus = job.inputs[0].path, job.inputs[1]
    tokenizer = load_tokenizer(model_dir)
    config = job.inputs[0].files.config
    positions = config.get("max_position_embeddings", config.get("n_positions"))
    seq_len = min(params.seq_len, positions) if isinstance(positions, int) else params.seq_len
    rows = calibration_rows((encode_document(tokenizer, text).ids for text in iter_texts(corpus)),
                            seq_len, params.tokens)
    if not rows:
        raise RunFailure("E599", f"the corpus of `{job.node.label}` gives no tokens to calibrate on",
                         "give `data=` a corpus with text the model's tokenizer reads")
    model = _load_model(model_dir, config)
    sums: dict[str, torch.Tensor] = {}  # Σ xᵀx (whiten) or Σ x² per feature (rms)
    counts: dict[str, int] = {}
    modules = dict(model.named_modules())
    whiten = params.scaling == "whiten"

    def hook(path):
        def record(module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[path] = sums.get(path, 0) + (x.T @ x if whiten else (x * x).sum(0))
            counts[path] = counts.get(path, 0) + x.shape[0]
        return record

    handles = [modules[l.path].register_forward_pre_hook(hook(l.path)) for l in linears]
    try:
        with torch.no_grad():
            for done, row in enumerate(rows, 1):
                model(input_ids=torch.tensor([row]))
                job.progress.update(done, len(rows), "sequences")
    finally:
        for handle in handles:
            handle.remove()
    return {path: (whitening if whiten else rms_scale)(total / counts[path]) for path, total in sums.items()}


def rms_scale(mean_square: torch.Tensor) -> torch.Tensor:
    """Each feature's RMS, floored so that a feature never seen still has a finite inverse."""
    rms = mean_square.sqrt()
    return rms.clamp_min(SCALE_FLOOR * float(rms.max()) or SCALE_FLOOR)


def whitening(second_moment: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor L of XᵀX/n (L·Lᵀ), damped until it exists."""
    scale = float(second_moment.diagonal().mean()) or 1.0
    damping = WHITEN_DAMPING
    eye = torch.eye(second_moment.shape[0], dtype=second_moment.dtype)
    while True:
        factor, info = torch.linalg.cholesky_ex(second_moment + damping * scale * eye)
        if int(info) == 0:
            return factor
        damping *= 10


def calibration_rows(documents, seq_len: int, tokens: int) -> list[list[int]]:
    """The corpus's first `tokens` tokens, each document on its own in pieces of at most `seq_len` (a model sees
    one document at a time, as it will when used); pieces of one token, which hold no context, are left out."""
    rows: list[list[int]] = []
    left = tokens
    for ids in documents:
        ids = list(ids[:left])
        left -= len(ids)
        rows += [ids[i:i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) > 1]
        if left <= 0:
            break
    return rows


def _load_model(model_dir: Path, config: dict):
    """The model as its config names it (a task head or none), in fp32, for a forward pass."""
    import transformers

    name = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    model = (cls or transformers.AutoModel).from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()

