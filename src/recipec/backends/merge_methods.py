"""Per-tensor merge kernels: linear, task arithmetic, TIES, DARE and SLERP.

Each kernel takes one tensor name's fp32 tensors (one per non-base model, plus the base where the method
needs one) and returns a new fp32 tensor of the same shape. Kernels never modify their inputs, hold no
state, and read nothing but their arguments, so a backend may run them in any order or in parallel.

Reproducibility is the point of this module. On CPU, torch reductions (`sum`, `dot`, `mean`) give
bitwise-different results for different thread counts, because each thread sums its own slice and the
partial sums are combined in a different order. Elementwise ops do not have that problem. So every
quantity that *decides* something is computed without a thread-dependent floating-point reduction:

- TIES' trim threshold is a selection (`torch.kthvalue`), not a sum, and ties at the threshold are broken
  by flat index; counts are integer sums, which are exact in any order.
- TIES' elected sign and all weighted sums are elementwise accumulations across models, in model order.
- DARE's drop masks come from `torch.rand` with a generator seeded from sha256(seed, tensor name, model
  index): torch's CPU uniform sampler is serial, so the mask depends neither on thread count nor on the
  order in which tensors are merged.
- SLERP's dot products are exact fp32×fp32 products in float64, summed per fixed-size chunk by numpy
  (whose reductions are single-threaded pairwise sums) and across chunks by `math.fsum` (correctly
  rounded, so order-free).

These results are reproducible for a given torch and numpy version; a change in torch's random number
generator or in numpy's summation would change them, so backends should record both versions.

Use `merge_tensor` to dispatch by method name; `METHODS` maps each name to its kernel and
`METHOD_OPTIONS` lists the keyword options each kernel reads.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

__all__ = ["METHODS", "METHOD_OPTIONS", "merge_tensor", "linear", "task_arithmetic", "ties", "dare", "slerp"]

# Above this |cos θ|, sin θ is too small to divide by safely and SLERP becomes linear interpolation.
# The same threshold mergekit uses, so results agree with it on nearly colinear tensors.
SLERP_COLINEAR = 0.9995

# Elements per chunk when summing SLERP's dot products: small enough that each chunk's float64 copies
# stay near cache size, large enough that the Python loop over chunks costs little.
_DOT_CHUNK = 1 << 16

# Relative slack when turning a density into a count, so that a decimal density such as 0.57 keeps the
# 57 of 100 entries it says even though 0.57 * 100 is 56.99999999999999 in binary floating point.
_COUNT_SLACK = 1e-12


# ---------------------------------------------------------------------------------------------- dispatch


def merge_tensor(
    method: str,
    name: str,
    models: list[torch.Tensor],
    base: torch.Tensor | None,
    weights: list[float],
    *,
    density: float = 1.0,
    drop_rate: float = 0.0,
    t: float = 0.5,
    seed: int = 0,
    normalize: bool = False,
) -> torch.Tensor:
    """Merge one tensor `name` of `models` (the non-base models, fp32, all one shape) by `method`.

    Options a method does not use (see `METHOD_OPTIONS`) are ignored, so a backend can pass one set of
    options to every method. The options' ranges are the op's schema (`ops.merge.Merge.Params`), checked
    once when the recipe is checked: kernels take them as valid and check only the tensors they are given.
    """
    kernel = METHODS.get(method)
    if kernel is None:
        raise ValueError(f"unknown merge method {method!r}; known methods: {', '.join(sorted(METHODS))}")
    given = {"density": density, "drop_rate": drop_rate, "t": t, "seed": seed, "normalize": normalize}
    return kernel(name, models, base, weights, **{k: given[k] for k in METHOD_OPTIONS[method]})


# ----------------------------------------------------------------------------------------------- kernels


def linear(
    name: str,
    models: list[torch.Tensor],
    base: torch.Tensor | None,
    weights: list[float],
    *,
    normalize: bool = False,
) -> torch.Tensor:
    """Weighted average: Σ_i w_i·m_i, divided by Σ_i w_i when `normalize`.

    Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves accuracy
    without increasing inference time" (ICML). Takes no base: a base model here is refused rather than
    silently ignored, since a recipe that names one almost certainly meant task arithmetic.
    """
    _check(name, models, weights, base, base_rule="forbidden", method="linear")
    merged = _weighted_sum(models, weights)
    if normalize:
        merged.div_(_weight_total(weights, name, "linear"))
    return merged


def task_arithmetic(
    name: str,
    models: list[torch.Tensor],
    base: torch.Tensor | None,
    weights: list[float],
    *,
    normalize: bool = False,
) -> torch.Tensor:
    """base + Σ_i w_i·(m_i − base); with `normalize`, the sum is divided by Σ_i w_i.

    Ilharco et al. 2023, "Editing Models with Task Arithmetic" (ICLR). This is mergekit's definition (the
    weights scale the task vectors, λ is folded into them). A chat vector is the one-model case.
    """
    _check(name, models, weights, base, base_rule="required", method="task_arithmetic")
    return _add_to_base(_weighted_sum((m - base for m in models), weights), base, weights, normalize, name,
                        "task_arithmetic")


def ties(
    name: str,
    models: list[torch.Tensor],
    base: torch.Tensor | None,
    weights: list[float],
    *,
    density: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """TIES-Merging: trim, elect sign, disjoint merge. Yadav et al. 2023, "TIES-Merging: Resolving
    Interference When Merging Models" (NeurIPS).

    1. Trim: τ_i = m_i − base; keep the k = ⌊density·n⌋ entries of largest |τ_i| in this tensor (n entries),
       zero the rest. Entries tied with the k-th largest magnitude are kept in ascending flat-index order
       until exactly k are kept, so the result never depends on a sort's tie order.
    2. Elect: s = sign(Σ_i w_i·τ̂_i) elementwise; a zero sum elects + (as mergekit does).
    3. Disjoint merge: A_i = entries where w_i·τ̂_i is nonzero and has sign s. Then
       δ = Σ_i [A_i]·w_i·τ̂_i, and with `normalize`, δ = δ / Σ_i [A_i]·w_i (left as is where no model agrees).
    Result: base + δ (λ = 1; scale the weights for another λ).

    The weights are used exactly as in mergekit's `ties`: they scale the task vectors before the election
    and the agreement test. mergekit's `ties` defaults to normalize=true; the paper's method is weights
    all 1 with `normalize`, which makes δ the mean of the agreeing τ̂_i. Without `normalize`, δ is their
    weighted sum.
    """
    _check(name, models, weights, base, base_rule="required", method="ties")
    keep = _keep_count(density, base.numel())

    # w_i·τ̂_i for each model; the election and the merge both work on these weighted, trimmed vectors.
    scaled = [_trim_to_top_k(m - base, keep).mul_(w) for m, w in zip(models, weights)]
    positive = _sum(scaled) >= 0

    merged = torch.zeros_like(base)
    agreeing_weight = torch.zeros_like(base) if normalize else None
    for v, w in zip(scaled, weights):
        agrees = torch.where(positive, v > 0, v < 0)
        merged.add_(torch.where(agrees, v, 0.0))
        if agreeing_weight is not None:
            agreeing_weight.add_(torch.where(agrees, w, 0.0))
    if agreeing_weight is not None:
        merged.div_(torch.where(agreeing_weight == 0, 1.0, agreeing_weight))
    return merged.add_(base)


def dare(
    name: str,
    models: list[torch.Tensor],
    base: torch.Tensor | None,
    weights: list[float],
    *,
    drop_rate: float = 0.0,
    seed: int = 0,
    normalize: bool = False,
) -> torch.Tensor:
    """DARE (Drop And REscale) on task arithmetic: base + Σ_i w_i·τ'_i, τ'_i = (M_i ⊙ τ_i) / (1 − p),
    τ_i = m_i − base, where each entry of the mask M_i is 0 with probability p = `drop_rate`, else 1.
    With `normalize`, the sum is divided by Σ_i w_i.

    Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
    Lunch" (ICML). mergekit calls this `dare_linear`/`dare_task_arithmetic` and parametrizes it by
    density = 1 − p.

    M_i is drawn by `torch.rand` (an entry is kept where u ≥ p, u uniform in [0, 1) on the fp32 grid)
    from a generator seeded by sha256 of (seed, name, i), i the model's position in `models`. So the
    mask of one tensor of one model is fixed by the recipe alone: it does not depend on thread count, on
    which other tensors were merged first, or on the model's dtype on disk. torch's CPU generator
    (mt19937) takes only 32 bits of seed, so two (name, i) pairs share a mask with probability 2⁻³².
    """
    _check(name, models, weights, base, base_rule="required", method="dare")

    deltas = (_dropped_task_vector(m - base, seed, name, i, drop_rate) for i, m in enumerate(models))
    return _add_to_base(_weighted_sum(deltas, weights), base, weights, normalize, name, "dare")


def slerp(
    name: str,
    models: list[torch.Tensor],
    base: torch.Tensor | None,
    weights: list[float],
    *,
    t: float = 0.5,
) -> torch.Tensor:
    """Spherical linear interpolation between exactly two tensors a, b (each taken as one flat vector):

        θ = arccos(⟨a, b⟩ / (‖a‖·‖b‖)),   slerp(a, b; t) = sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b

    falling back to (1−t)·a + t·b when |cos θ| > 0.9995 (nearly colinear, sin θ ≈ 0) or when either
    tensor is all zeros (θ undefined). t = 0 gives a and t = 1 gives b exactly. `weights` are ignored.

    Shoemake 1985, "Animating Rotation with Quaternion Curves" (SIGGRAPH); applied to model weights by
    mergekit (Goddard et al. 2024, "Arcee's MergeKit: A Toolkit for Merging Large Language Models").
    cos θ is computed in float64 from exactly rounded dot products, reproducibly (see the module notes).
    """
    if len(models) != 2:
        raise ValueError(f"tensor {name!r}: slerp interpolates exactly 2 models, got {len(models)}")
    _check(name, models, None, base, base_rule="forbidden", method="slerp")

    a, b = models
    aa, bb, ab = _dot_products(a, b)
    cos = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else 1.0
    if abs(cos) > SLERP_COLINEAR:
        coef_a, coef_b = 1.0 - t, float(t)
    else:
        theta = math.acos(max(-1.0, min(1.0, cos)))
        coef_a = math.sin((1.0 - t) * theta) / math.sin(theta)
        coef_b = math.sin(t * theta) / math.sin(theta)
    # Two scalings and one add, each rounded once: no fused multiply-add whose use could vary by code path.
    return (a * coef_a).add_(b * coef_b)


# Kernels by method name, and the keyword options each one reads (taken from its signature).
METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "linear": linear,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "slerp": slerp,
}
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    method: tuple(
        p.name for p in inspect.signature(kernel).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    )
    for method, kernel in METHODS.items()
}


# ------------------------------------------------------------------------------------- shared arithmetic


def _weighted_sum(tensors: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ_i w_i·x_i as a new tensor, accumulated elementwise in order (so thread-count independent).

    `tensors` may be a generator, so that only one temporary task vector is alive at a time. Each product
    is rounded before it is added: `add(alpha=w)` is avoided because whether it fuses the multiply-add is
    an implementation detail of each kernel path.
    """
    total: torch.Tensor | None = None
    for x, w in zip(tensors, weights):
        term = x * w
        total = term if total is None else total.add_(term)
    assert total is not None, "callers check that there is at least one model"
    return total


def _sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_i x_i as a new tensor, accumulated elementwise in list order."""
    total = tensors[0].clone()
    for x in tensors[1:]:
        total.add_(x)
    return total


def _add_to_base(delta: torch.Tensor, base: torch.Tensor, weights: Sequence[float], normalize: bool, name: str,
                 method: str) -> torch.Tensor:
    """base + the summed task vectors, divided by the weights' sum first when normalizing."""
    if normalize:
        delta.div_(_weight_total(weights, name, method))
    return delta.add_(base)


def _weight_total(weights: Sequence[float], name: str, method: str) -> float:
    """Σ w_i for `normalize`, exactly rounded; refuses a zero sum rather than dividing by it."""
    total = math.fsum(weights)
    if total == 0:
        raise ValueError(f"tensor {name!r}: {method} with normalize needs weights with a nonzero sum, got {weights}")
    return total


# ------------------------------------------------------------------------------------------ TIES trimming


def _keep_count(density: float, n: int) -> int:
    """⌊density·n⌋ (as mergekit), forgiving the binary rounding of a decimal density (see _COUNT_SLACK)."""
    exact = density * n
    return min(n, math.floor(exact + exact * _COUNT_SLACK))


def _trim_to_top_k(tau: torch.Tensor, k: int) -> torch.Tensor:
    """`tau` with all but its k largest-magnitude entries zeroed, ties at the threshold kept by flat index.

    Works in place on `tau`, which callers pass as a fresh temporary.
    """
    n = tau.numel()
    if k >= n:
        return tau
    if k == 0:
        return tau.zero_()
    magnitude = tau.abs().reshape(-1)
    # The k-th largest magnitude is the (n−k+1)-th smallest: a selection, so it is the same value however
    # the work is split between threads.
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    kept = magnitude > threshold
    if threshold > 0:
        missing = k - int(kept.sum())  # a count: integer addition is exact in any order
        if missing > 0:
            # nonzero() lists indices in ascending order, so the lowest-index tied entries are the ones kept.
            tied = torch.nonzero(magnitude == threshold).squeeze(1)[:missing]
            kept[tied] = True
    # When the threshold is 0, entries tied with it are zeros: keeping them or not changes nothing.
    return torch.where(kept.view(tau.shape), tau, 0.0)


# ------------------------------------------------------------------------------------------- DARE masks


def _dare_generator(seed: int, name: str, index: int) -> torch.Generator:
    """A CPU generator for one (seed, tensor name, model index): independent of every other draw.

    JSON makes the hashed key unambiguous (a name may contain any character). Only 32 bits are taken
    because torch's CPU mt19937 uses only the low 32 bits of a seed anyway; taking them explicitly keeps
    the masks stable should torch ever start using more.
    """
    key = json.dumps([seed, name, index]).encode()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:4], "little"))


def _dropped_task_vector(tau: torch.Tensor, seed: int, name: str, index: int, drop_rate: float) -> torch.Tensor:
    """τ' = M ⊙ τ / (1 − p) for model `index`, reusing `tau` (a fresh temporary) for the rescale."""
    if drop_rate == 0:
        return tau
    kept = _dare_keep_mask(seed, name, index, tau.shape, drop_rate)
    return torch.where(kept, tau.div_(1.0 - drop_rate), 0.0)


def _dare_keep_mask(seed: int, name: str, index: int, shape: torch.Size, drop_rate: float) -> torch.Tensor:
    """True where an entry survives: P(kept) = 1 − drop_rate (to within the 2⁻²⁴ grid of fp32 uniforms)."""
    # torch.rand on CPU fills serially from the generator, so the mask is the same for any thread count;
    # verified against set_num_threads(1, 2, 3, 7) with torch 2.13.
    u = torch.rand(shape, generator=_dare_generator(seed, name, index), dtype=torch.float32)
    return u >= drop_rate


# -------------------------------------------------------------------------------------- SLERP geometry


def _dot_products(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(⟨a,a⟩, ⟨b,b⟩, ⟨a,b⟩) in float64, bitwise reproducible for any torch thread count.

    fp32×fp32 products are exact in float64. Each fixed-size chunk is summed by numpy, whose reductions
    never use threads; chunk sums are combined by math.fsum, which is correctly rounded and so does not
    depend on order. (torch.dot and torch.sum split the work between threads and differ bitwise.)
    """
    x = a.detach().reshape(-1)
    y = b.detach().reshape(-1)
    aa: list[float] = []
    bb: list[float] = []
    ab: list[float] = []
    for start in range(0, x.numel(), _DOT_CHUNK):
        xs = x[start : start + _DOT_CHUNK].to("cpu", torch.float64).numpy()
        ys = y[start : start + _DOT_CHUNK].to("cpu", torch.float64).numpy()
        aa.append(float(np.add.reduce(xs * xs)))
        bb.append(float(np.add.reduce(ys * ys)))
        ab.append(float(np.add.reduce(xs * ys)))
    return math.fsum(aa), math.fsum(bb), math.fsum(ab)


# ------------------------------------------------------------------------------------------- validation


def _check(
    name: str,
    models: Sequence[torch.Tensor],
    weights: Sequence[float] | None,
    base: torch.Tensor | None,
    *,
    base_rule: str,
    method: str,
) -> None:
    """Refuse inputs the kernels would otherwise mis-merge silently (broadcasting, dtype promotion)."""
    where = f"tensor {name!r}: {method}"
    if len(models) == 0:
        raise ValueError(f"{where} needs at least one model, got none")
    if base_rule == "required" and base is None:
        raise ValueError(f"{where} needs a base model, and none was given")
    if base_rule == "forbidden" and base is not None:
        raise ValueError(f"{where} takes no base model, but one was given")
    if weights is not None and len(weights) != len(models):
        raise ValueError(f"{where} got {len(models)} models but {len(weights)} weights")
    if weights is not None and not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ValueError(f"{where} weights must be finite numbers, got {list(weights)}")
    tensors = [*models, *([base] if base is not None else [])]
    for i, x in enumerate(tensors):
        role = "base" if i == len(models) else f"model {i}"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{where}: {role} is a {type(x).__name__}, not a tensor")
        if x.dtype != torch.float32:
            raise ValueError(f"{where}: {role} is {x.dtype}; merge kernels take float32 (upcast first)")
        if x.shape != models[0].shape:
            raise ValueError(f"{where}: {role} has shape {tuple(x.shape)}, model 0 has {tuple(models[0].shape)}")

