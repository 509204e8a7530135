"""The `prune` rule: magnitude pruning with an exact, order-stable threshold, and physical removal of heads and
FFN neurons.

Magnitude pruning never sorts the model. The k-th smallest magnitude over all targeted weights is found by a
two-pass radix selection on the bits of |w| as fp32 (for non-negative floats the bit pattern orders like the
value): a histogram of the high 16 bits, then of the low 16 bits inside the bin that holds the k-th. Counts are
integers, so the threshold is the same at any thread count; weights equal to it are zeroed in tensor-name and
position order until exactly k are. Memory: one chunk of one tensor plus two 65536-bin histograms.

Structured pruning ranks units (a key/value head with its query group; an FFN neuron) by the L1 norm of their
weights or by a gradient score on a corpus, keeps the rest in their order, and writes every tensor sliced to
them; the config follows (`recipec.modeling.loadable_config`).

Both work from a `Pass` (what to zero or remove this time): `prune` makes one from its parameters, iterative
pruning (`steps=`, prune_iterative.py) one per round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import modeling
from ..arch import ArchFacts, facts_from_config
from ..artifacts.corpus import iter_texts
from ..dtypes import TensorSpec
from ..ops.prune import LAYOUTS, PATTERNS, Prune, ffn_removed, groups, heads_removed, input_dim, layer_prefix, targeted
from ..ops.sources import signature_of_files
from ..store.tensors import ModelReader, ModelWriter, write_json
from .job import Job, RunFailure
from .model_files import copy_model_files

SHARD_SIZE = 5 * 10**9
CHUNK = 1 << 20  # elements per step of a histogram or mask pass: about a cache-sized slice
BINS = 1 << 16
TOKENIZER_VOCABULARIES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model")


@dataclass(frozen=True)
class Pass:
    """One pruning pass over a model: what it zeroes (`sparsity`, or `keep` = N of every M weights) or removes
    (`heads`, `ffn`: units per layer, or a number of them ranked across layers). `prune` makes one; iterative
    pruning (prune_iterative.py) one per round, each towards the round's cumulative target."""

    sparsity: float | None = None
    keep: tuple[int, int] | None = None
    heads: list[int] | int | None = None
    ffn: list[int] | int | None = None


def one_pass(params: Prune.Params, facts: ArchFacts | None, fraction: float = 1.0) -> Pass:
    """The pass that takes a model of shape `facts` to `fraction` of the pruning `params` ask for, all at once."""
    if params.sparsity is not None:
        nm = PATTERNS[params.pattern]
        keep = None if nm is None else (nm[1] - round((nm[1] - nm[0]) * fraction), nm[1])
        return Pass(sparsity=params.sparsity * fraction, keep=keep)
    heads = ffn = None
    if params.heads is not None:
        target = params.heads * fraction
        heads = (_fits(heads_removed(facts, target)) if params.uniform
                 else round(target * sum(facts.kv_heads[i] for i in range(facts.layers))))
    if params.ffn is not None:
        target = params.ffn * fraction
        ffn = _fits(ffn_removed(facts, target)) if params.uniform else round(target * sum(facts.intermediate))
    return Pass(heads=heads, ffn=ffn)


def _fits(removed: list[int] | str) -> list[int]:
    """Counts per layer, or the failure of a fraction that the model, known only now, cannot take."""
    if isinstance(removed, str):
        raise RunFailure("E617", removed, "choose a fraction the model's layers can take (see E452, E453)")
    return removed


def build_prune(job: Job) -> str:
    params: Prune.Params = Prune.params_of(job.node)
    if params.steps is not None:
        from .prune_iterative import build_iterative  # training is loaded only for iterative pruning

        return build_iterative(job, params)
    facts = None if params.sparsity is not None else facts_from_config(job.inputs[0].files.config)
    return prune_once(job, params, one_pass(params, facts))


def prune_once(job: Job, params: Prune.Params, step: Pass) -> str:
    """Prune `job.inputs[0]` by `step` into `job.out` (scores of `params.score`, on `job.inputs[1]` if
    gradient); the weights' digest."""
    files = job.inputs[0].files
    sig = signature_of_files(files)
    reader = ModelReader(files)
    try:
        if step.sparsity is not None:
            transform = _magnitude(reader, sig, params, step)
            config = dict(files.config)
        else:
            transform, facts = _structured(reader, sig, params, job, step)
            config = modeling.loadable_config(files.config, facts)
        return _write(job, reader, files, transform, config)
    finally:
        reader.close()


def _write(job: Job, reader: ModelReader, files, transform, config: dict) -> str:
    """Every tensor through `transform(name, tensor) -> tensor`, then the model's other files and `config`."""
    layout = [TensorSpec(name, entry.dtype, transform.shape(name, tuple(entry.shape)))
              for name, entry in sorted(files.tensors.items())]
    writer = ModelWriter(job.out, layout, SHARD_SIZE)
    try:
        job.progress.update(0, sum(e.nbytes for e in files.tensors.values()), "bytes")
        for spec in layout:
            writer.write(spec.name, transform(spec.name, reader.tensor(spec.name)))
            job.progress(files.tensors[spec.name].nbytes)
        digest = writer.finish()
    finally:
        writer.close()
    copy_model_files(job, layout, (1.0,))
    write_json(job.out / "config.json", config)
    return digest


# Magnitude pruning


def _magnitude_bits(tensor: torch.Tensor) -> torch.Tensor:
    """|w| as fp32 bit patterns (int32, non-negative): ordered exactly as the magnitudes are."""
    return tensor.detach().reshape(-1).to(torch.float32).abs().view(torch.int32)


def _chunks(tensor: torch.Tensor):
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield start, _magnitude_bits(flat[start:start + CHUNK])


@torch.no_grad()
def kth_magnitude(tensors, k: int) -> tuple[int, int]:
    """(threshold bits T, how many weights equal to T are zeroed) so that exactly `k` of the weights yielded by
    `tensors()` (called twice, same order) are at most T: those below T, then the first ties in order."""
    high = torch.zeros(BINS, dtype=torch.int64)
    for tensor in tensors():
        for _, bits in _chunks(tensor):
            high += torch.bincount(bits >> 16, minlength=BINS)
    upto = torch.cumsum(high, 0)
    hi = int(torch.searchsorted(upto, torch.tensor(k), right=False))
    below = int(upto[hi - 1]) if hi else 0
    low = torch.zeros(BINS, dtype=torch.int64)
    for tensor in tensors():
        for _, bits in _chunks(tensor):
            low += torch.bincount((bits[(bits >> 16) == hi]) & 0xFFFF, minlength=BINS)
    upto_low = torch.cumsum(low, 0)
    lo = int(torch.searchsorted(upto_low, torch.tensor(k - below), right=False))
    less = below + (int(upto_low[lo - 1]) if lo else 0)
    return (hi << 16) | lo, k - less


class _Mask:
    """Zeroes magnitudes below the threshold and the first `ties` equal to it, tensor by tensor in name order."""

    def __init__(self, threshold: int, ties: int):
        self.threshold, self.ties = threshold, ties

    @torch.no_grad()
    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone().reshape(-1)
        for start, bits in _chunks(tensor):
            drop = bits < self.threshold
            if self.ties:
                equal = torch.nonzero(bits == self.threshold).reshape(-1)[:self.ties]
                drop[equal] = True
                self.ties -= equal.numel()
            out[start:start + bits.numel()][drop] = 0
        return out.reshape(tensor.shape)


@torch.no_grad()
def keep_n_of_m(tensor: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """`tensor` with all but the n largest magnitudes of every m consecutive weights along `dim` zeroed
    (ties: the earlier weight stays)."""
    moved = tensor.movedim(dim, -1)
    groups_ = moved.reshape(-1, m)
    out = torch.empty_like(groups_)
    earlier_first = torch.arange(m - 1, -1, -1)  # among equal magnitudes, the earlier weight ranks higher
    step = max(1, CHUNK // m)
    for start in range(0, groups_.shape[0], step):
        chunk = groups_[start:start + step]
        # Keys unique within a group (magnitude bits, then position), so the n-th largest is one exact value.
        keys = _magnitude_bits(chunk).view(chunk.shape).long() * m + earlier_first
        nth = keys.topk(n, dim=1).values[:, -1:]
        out[start:start + step] = torch.where(keys >= nth, chunk, torch.zeros((), dtype=tensor.dtype))
    return out.reshape(moved.shape).movedim(-1, dim).contiguous()


class _Transform:
    """A per-tensor rewrite and the shape it gives; identity for the tensors it does not name."""

    def __init__(self, rewrite: dict, shapes: dict | None = None):
        self.rewrite, self.shapes = rewrite, shapes or {}

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        rule = self.rewrite.get(name)
        return tensor if rule is None else rule(tensor)

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.shapes.get(name, shape)


def _magnitude(reader: ModelReader, sig, params, step: Pass) -> _Transform:
    names = sorted(targeted(sig, params.targets))
    if step.keep is not None:
        n, m = step.keep
        return _Transform({name: (lambda t, name=name: keep_n_of_m(
            t, n, m, input_dim(sig.model_type, name, t.dim()))) for name in names})
    numel = {t.name: t.numel for t in sig.tensors}
    if params.scope == "layer":
        rewrite = {}
        for name in names:
            k = round(step.sparsity * numel[name])
            if k:
                threshold, ties = kth_magnitude(lambda name=name: [reader.tensor(name)], k)
                rewrite[name] = _Mask(threshold, ties)
        return _Transform(rewrite)
    k = round(step.sparsity * sum(numel[n] for n in names))
    if not k:
        return _Transform({})
    threshold, ties = kth_magnitude(lambda: (reader.tensor(n) for n in names), k)
    mask = _Mask(threshold, ties)  # one mask across tensors: ties are spent in name order, as written
    return _Transform({name: mask for name in names})


# Structured pruning


def _structured(reader: ModelReader, sig, params, job: Job, step: Pass) -> tuple[_Transform, ArchFacts]:
    family = modeling.family(sig.model_type)
    layout = LAYOUTS[family]
    prefix = layer_prefix(family, sig.by_name)
    facts = facts_from_config(job.inputs[0].files.config)
    need_gradient = params.score == "gradient"
    gradient = _gradient_scores(job, params, family, prefix, facts) if need_gradient else None
    kept_units = [list(range(facts.kv_heads[i])) for i in range(facts.layers)]
    kept_neurons = [list(range(facts.intermediate[i])) for i in range(facts.layers)]
    if step.heads:
        scores = gradient[0] if gradient else [_l1_head_scores(reader, layout, prefix, facts, i)
                                                for i in range(facts.layers)]
        kept_units = _select(scores, step.heads)
    if step.ffn:
        scores = gradient[1] if gradient else [_l1_ffn_scores(reader, layout, prefix, i)
                                                for i in range(facts.layers)]
        kept_neurons = _select(scores, step.ffn)
    rewrite, shapes = {}, {}
    d = facts.head_dim
    for i in range(facts.layers):
        _, per_unit = groups(facts, i)
        queries = [u * per_unit + j for u in kept_units[i] for j in range(per_unit)]
        q = _rows(queries, d)
        kv = _rows(kept_units[i], d)
        span = facts.heads[i] * d
        index = {"q": q, "kv": kv, "qkv": torch.cat([q, kv + span, kv + 2 * span]),
                 "ffn": torch.tensor(kept_neurons[i], dtype=torch.long)}
        for s in (*layout.heads, *layout.ffn):
            name = prefix.format(i) + s.suffix
            if name not in sig.by_name:
                continue
            picked = index[s.part]
            rewrite[name] = lambda t, dim=s.dim, picked=picked: t.index_select(dim, picked).contiguous()
            shape = list(sig.by_name[name].shape)
            shape[s.dim] = picked.numel()
            shapes[name] = tuple(shape)
    out = facts.with_heads(tuple(len(k) * groups(facts, i)[1] for i, k in enumerate(kept_units)),
                           tuple(len(k) for k in kept_units))
    out = out.with_intermediate(tuple(len(k) for k in kept_neurons))
    return _Transform(rewrite, shapes), out


def _rows(units: list[int], size: int) -> torch.Tensor:
    """Indices of the `size`-long blocks `units` along a dimension."""
    return (torch.tensor(units, dtype=torch.long)[:, None] * size + torch.arange(size)).reshape(-1)


def _along(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of |w| per index along `dim`, in float64."""
    other = [d for d in range(tensor.dim()) if d != dim]
    values = tensor.to(torch.float64).abs()
    return values.sum(dim=other) if other else values


@torch.no_grad()
def _l1_head_scores(reader, layout, prefix: str, facts: ArchFacts, layer: int) -> list[float]:
    """L1 norm of each unit's query, key and value rows (the output projection not counted)."""
    units, _ = groups(facts, layer)
    span = facts.heads[layer] * facts.head_dim
    score = torch.zeros(units, dtype=torch.float64)
    for s in layout.heads:
        if not s.suffix.endswith(".weight") or s.suffix.startswith(layout.output_projection):
            continue
        per_index = _along(reader.tensor(prefix.format(layer) + s.suffix), s.dim)
        if s.part == "qkv":
            q, k, v = per_index[:span], per_index[span:2 * span], per_index[2 * span:]
            score += q.reshape(units, -1).sum(1) + k.reshape(units, -1).sum(1) + v.reshape(units, -1).sum(1)
        else:
            score += per_index.reshape(units, -1).sum(1)  # a unit's rows are contiguous in both parts
    return score.tolist()


@torch.no_grad()
def _l1_ffn_scores(reader, layout, prefix: str, layer: int) -> list[float]:
    """L1 norm of each neuron's input rows and output column."""
    total = None
    for s in layout.ffn:
        if s.suffix.endswith(".weight"):
            per_index = _along(reader.tensor(prefix.format(layer) + s.suffix), s.dim)
            total = per_index if total is None else total + per_index
    return total.tolist()


def _normalized(scores: list[list[float]]) -> list[list[float]]:
    """Each layer's scores divided by their L2 norm, so that layers compare (Michel et al.)."""
    out = []
    for layer in scores:
        norm = math.sqrt(sum(s * s for s in layer))
        out.append([s / norm if norm else 0.0 for s in layer])
    return out


def _select(scores: list[list[float]], removed: list[int] | int) -> list[list[int]]:
    """The units kept per layer: the lowest-scoring `removed[i]` of each layer i, or, given one number, the
    lowest `removed` across layers (scores layer-normalized), never a layer's last unit. Ties go by layer
    then index, so the choice is the same on every run."""
    if isinstance(removed, list):
        counts = removed
        kept = []
        for layer, count in zip(scores, counts):
            dropped = set(sorted(range(len(layer)), key=lambda u: (layer[u], u))[:count])
            kept.append([u for u in range(len(layer)) if u not in dropped])
        return kept
    normalized = _normalized(scores)
    ranked = sorted(((s, i, u) for i, layer in enumerate(normalized) for u, s in enumerate(layer)))
    left = [len(layer) for layer in scores]
    budget = removed
    dropped = set()
    for _, i, u in ranked:
        if budget == 0:
            break
        if left[i] > 1:
            dropped.add((i, u))
            left[i] -= 1
            budget -= 1
    return [[u for u in range(len(layer)) if (i, u) not in dropped] for i, layer in enumerate(scores)]


# Gradient scores: |<dL/dctx, ctx>| per head (ctx: the head's slice of the attention output projection's input)
# and per FFN neuron (its activation, the FFN output projection's input), summed over sequences of `data`.


def _sequences(job: Job, params, tokenizer) -> list[list[int]]:
    from ..textprep.encode import encode_document

    stream: list[int] = []
    out: list[list[int]] = []
    for text in iter_texts(job.inputs[1]):
        stream.extend(encode_document(tokenizer, text).ids)
        while len(stream) >= params.seq_len and len(out) < params.max_sequences:
            out.append(stream[:params.seq_len])
            del stream[:params.seq_len]
        if len(out) == params.max_sequences:
            break
    if not out and len(stream) > 1:
        out.append(stream)
    if not out:
        raise RunFailure("E590", "the corpus given to `data=` holds no tokens to score heads on",
                         "give prune a corpus with text")
    return out


def _gradient_scores(job: Job, params, family: str, prefix: str, facts: ArchFacts):
    import transformers

    from ..textprep.encode import load_tokenizer
    from ..textprep.errors import TextPrepError

    transformers.logging.disable_progress_bar()  # the job's own progress is in sequences, drawn by the driver
    model_dir = job.inputs[0].path
    hint = "prune a model that carries its tokenizer, e.g. init(..., tokenizer=\"tokenizers/x\")"
    if not any((model_dir / name).is_file() for name in TOKENIZER_VOCABULARIES):
        # transformers 5 would build an empty tokenizer from config.json alone: every text would become <unk>.
        raise RunFailure("E590", "gradient scores need the model's tokenizer, and this model has none", hint)
    try:
        tokenizer = load_tokenizer(model_dir)
    except TextPrepError as err:
        raise RunFailure("E590", f"gradient scores need the model's tokenizer: {err}", err.hint or hint) from None
    sequences = _sequences(job, params, tokenizer)
    auto = transformers.AutoModelForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    layout = LAYOUTS[family]
    contexts: dict[tuple[str, int], torch.Tensor] = {}

    def keep_input(key):
        def hook(module, args):
            args[0].retain_grad()
            contexts[key] = args[0]
        return hook

    handles = []
    for i in range(facts.layers):
        for key, path in (("heads", layout.output_projection), ("ffn", layout.ffn_output)):
            module = model.get_submodule(prefix.format(i) + path)
            handles.append(module.register_forward_pre_hook(keep_input((key, i))))
    heads = [torch.zeros(facts.kv_heads[i], dtype=torch.float64) for i in range(facts.layers)]
    ffn = [torch.zeros(facts.intermediate[i], dtype=torch.float64) for i in range(facts.layers)]
    mask_id = getattr(tokenizer, "mask_token_id", None)
    try:
        for start in range(0, len(sequences), params.batch):
            batch = sequences[start:start + params.batch]
            width = min(len(s) for s in batch)
            ids = torch.tensor([s[:width] for s in batch], dtype=torch.long)
            model.zero_grad(set_to_none=True)
            _loss(model, ids, family, mask_id).backward()
            for i in range(facts.layers):
                ctx = contexts[("heads", i)]
                per_head = (ctx.grad * ctx).reshape(*ctx.shape[:2], facts.heads[i], facts.head_dim)
                per_head = per_head.sum(dim=(1, 3)).abs().to(torch.float64).sum(0)  # |<g, ctx>| per sequence
                heads[i] += per_head.reshape(facts.kv_heads[i], -1).sum(1)
                act = contexts[("ffn", i)]
                ffn[i] += (act.grad * act).sum(dim=1).abs().to(torch.float64).sum(0)
            contexts.clear()
            job.progress.update(min(start + params.batch, len(sequences)), len(sequences), "sequences")
    finally:
        for handle in handles:
            handle.remove()
    return _normalized([h.tolist() for h in heads]), _normalized([f.tolist() for f in ffn])


def _loss(model, ids: torch.Tensor, family: str, mask_id: int | None) -> torch.Tensor:
    if family != "bert":
        return model(input_ids=ids, labels=ids).loss
    # Masked-LM loss on every seventh token (a fixed pattern: the same scores on every run).
    chosen = torch.zeros_like(ids, dtype=torch.bool)
    chosen[:, 3::7] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    inputs = torch.where(chosen, torch.full_like(ids, mask_id), ids) if mask_id is not None else ids
    return model(input_ids=inputs, labels=labels).loss

