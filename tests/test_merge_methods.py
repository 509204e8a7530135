"""Merge kernels against reference formulas written out independently here (numpy float64, plain loops),
hand-worked TIES examples, DARE's statistics, SLERP's geometry, and bitwise reproducibility across torch
thread counts in fresh processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recipec.backends import merge_methods
from recipec.backends.merge_methods import METHOD_OPTIONS, METHODS, merge_tensor


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def rand(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def f64(x: torch.Tensor) -> np.ndarray:
    return x.numpy().astype(np.float64)


def close(actual: torch.Tensor, expected: np.ndarray, tol: float = 1e-5) -> None:
    assert actual.dtype == torch.float32
    np.testing.assert_allclose(actual.numpy(), expected, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------ registry


def test_registry_and_options():
    assert set(METHODS) == {"linear", "task_arithmetic", "ties", "dare", "slerp"}
    assert METHOD_OPTIONS == {
        "linear": ("normalize",),
        "task_arithmetic": ("normalize",),
        "ties": ("density", "normalize"),
        "dare": ("drop_rate", "seed", "normalize"),
        "slerp": ("t",),
    }
    for kernel in METHODS.values():
        assert "Σ" in kernel.__doc__ or "slerp" in kernel.__doc__
        assert any(year in kernel.__doc__ for year in ("2022", "2023", "2024", "1985"))


def test_kernels_leave_inputs_alone_and_return_new_fp32():
    base, a, b = rand((5, 7), 1), rand((5, 7), 2), rand((5, 7), 3)
    before = [x.clone() for x in (base, a, b)]
    for method in METHODS:
        takes_base = method in {"task_arithmetic", "ties", "dare"}
        out = merge_tensor(method, "w", [a, b], base if takes_base else None, [0.6, 0.4],
                           density=0.5, drop_rate=0.3)
        assert out.dtype == torch.float32 and out.shape == (5, 7)
        assert all(out.data_ptr() != x.data_ptr() for x in (base, a, b))
    assert all(torch.equal(x, y) for x, y in zip((base, a, b), before))


# ------------------------------------------------------------------------------------- linear, task arith


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_matches_weighted_sum(normalize):
    models = [rand((4, 9), s) for s in range(3)]
    weights = [0.5, -0.25, 2.0]
    expected = sum(w * f64(m) for w, m in zip(weights, models))
    if normalize:
        expected = expected / sum(weights)
    close(merge_tensor("linear", "w", models, None, weights, normalize=normalize), expected)


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_matches_formula(normalize):
    base = rand((6, 5), 10)
    models = [rand((6, 5), s) for s in range(2)]
    weights = [0.7, 1.3]
    delta = sum(w * (f64(m) - f64(base)) for w, m in zip(weights, models))
    if normalize:
        delta = delta / sum(weights)
    close(merge_tensor("task_arithmetic", "w", models, base, weights, normalize=normalize), f64(base) + delta)


def test_task_arithmetic_equals_linear_when_weights_sum_to_one():
    # base + Σ w_i (m_i − base) = Σ w_i m_i + (1 − Σ w_i) base.
    base = rand(100, 20)
    models = [rand(100, s) for s in range(3)]
    weights = [0.2, 0.3, 0.5]
    ta = merge_tensor("task_arithmetic", "w", models, base, weights)
    lin = merge_tensor("linear", "w", models, None, weights)
    close(ta, f64(lin))
    # With normalize, any weights: base + Σ w_i τ_i / Σ w_i is the normalized linear merge.
    weights = [1.0, 3.0, 0.5]
    ta = merge_tensor("task_arithmetic", "w", models, base, weights, normalize=True)
    lin = merge_tensor("linear", "w", models, None, weights, normalize=True)
    close(ta, f64(lin))


def test_task_arithmetic_one_model_is_a_scaled_task_vector():
    # The chat-vector case: base + k (m − base).
    base, chat = rand(50, 1), rand(50, 2)
    close(merge_tensor("task_arithmetic", "w", [chat], base, [0.5]), f64(base) + 0.5 * (f64(chat) - f64(base)))


# ------------------------------------------------------------------------------------------------- TIES


def test_ties_hand_worked_example():
    base = f32([1, 2, 3, 4, 5, 6, 7, 8])
    tau1 = f32([3, -1, 0.5, 2, -4, 1.5, 5, 0.25])
    tau2 = f32([-2, -3, 1, 1, 1, 4, 6, 0.5])
    # density 0.5 of 8 entries: keep 4 per model.
    #   τ̂1 = [3, 0, 0, 2, -4, 0, 5, 0]          (0.5, -1, 1.5, 0.25 trimmed)
    #   τ̂2 = [-2, -3, 0, 0, 0, 4, 6, 0]          (1, 1, 1, 0.5 trimmed)
    # weights (1, 0.5): w·τ̂2 = [-1, -1.5, 0, 0, 0, 2, 3, 0]
    #   Σ = [2, -1.5, 0, 2, -4, 2, 8, 0]  → elected signs [+, -, +, +, -, +, +, +]
    #   entry 0: signs disagree, only model 1 counts; entry 6: both agree, 5 + 3.
    #   agreeing sum  = [3, -1.5, 0, 2, -4, 2, 8, 0]
    #   agreeing weight = [1, 0.5, 0, 1, 1, 0.5, 1.5, 0]  (0 → left undivided)
    models = [base + tau1, base + tau2]
    summed = merge_tensor("ties", "w", models, base, [1.0, 0.5], density=0.5)
    assert torch.equal(summed, base + f32([3, -1.5, 0, 2, -4, 2, 8, 0]))
    mean = merge_tensor("ties", "w", models, base, [1.0, 0.5], density=0.5, normalize=True)
    close(mean - base, np.array([3, -3, 0, 2, -4, 4, 16 / 3, 0]))


def test_ties_paper_case_is_mean_of_agreeing():
    # Weights 1 with normalize is the paper's disjoint mean. Three models, nothing trimmed.
    base = f32([0, 0, 0])
    models = [f32([1, -2, 4]), f32([3, 5, -1]), f32([-1, 1, 2])]
    # Σ = [3, 4, 5] → all +; entry 0: mean(1, 3) = 2; entry 1: mean(5, 1) = 3; entry 2: mean(4, 2) = 3.
    out = merge_tensor("ties", "w", models, base, [1, 1, 1], density=1.0, normalize=True)
    assert torch.equal(out, f32([2, 3, 3]))


def test_ties_threshold_ties_keep_lowest_flat_index():
    base = torch.zeros(2, 2)
    tau = f32([[1, -2], [2, -2]])  # three entries share the top magnitude; keep 2 of 4
    out = merge_tensor("ties", "w", [tau], base, [1.0], density=0.5)
    assert torch.equal(out, f32([[0, -2], [2, 0]]))


def test_ties_density_counts():
    n = 100
    tau = torch.arange(1, n + 1, dtype=torch.float32)
    for density, kept in [(0.57, 57), (0.0, 0), (1.0, 100), (1 / 3, 33), (0.999, 99)]:
        out = merge_tensor("ties", "w", [tau], torch.zeros(n), [1.0], density=density)
        assert int((out != 0).sum()) == kept, density
        assert torch.equal(out[n - kept :], tau[n - kept :])  # the largest ones survive


def reference_ties(models, base, weights, density, normalize):
    """TIES in float64 numpy, trimming by stable sort (equal magnitudes: lower index first)."""
    base = f64(base)
    taus = []
    for m in models:
        tau = (f64(m) - base).reshape(-1)
        k = int(math.floor(density * tau.size + 1e-9))
        order = np.argsort(-np.abs(tau), kind="stable")
        trimmed = np.zeros_like(tau)
        trimmed[order[:k]] = tau[order[:k]]
        taus.append(trimmed)
    scaled = [w * tau for w, tau in zip(weights, taus)]
    sign = np.where(np.sum(scaled, axis=0) >= 0, 1.0, -1.0)
    merged = np.zeros_like(base.reshape(-1))
    divisor = np.zeros_like(merged)
    for w, v in zip(weights, scaled):
        agree = np.sign(v) == sign
        merged += np.where(agree, v, 0)
        divisor += np.where(agree, w, 0)
    if normalize:
        merged /= np.where(divisor == 0, 1, divisor)
    return base + merged.reshape(base.shape)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_ties_matches_reference_with_many_ties(density, normalize):
    # Quarter-steps make many magnitudes equal and every sum exact, so fp32 and float64 must agree.
    base = torch.round(rand((30, 40), 7) * 4) / 4
    models = [base + torch.round(rand((30, 40), s) * 4) / 4 for s in range(3)]
    weights = [1.0, 0.5, 0.75]
    out = merge_tensor("ties", "w", models, base, weights, density=density, normalize=normalize)
    close(out, reference_ties(models, base, weights, density, normalize), tol=1e-6)


# ------------------------------------------------------------------------------------------------- DARE


def test_dare_statistics():
    n, p = 1_000_000, 0.3
    base = rand(n, 1)
    tau = rand(n, 2) + 1.0  # mean 1, no zeros in practice
    out = merge_tensor("dare", "layer.w", [base + tau], base, [1.0], drop_rate=p, seed=5)
    delta = f64(out) - f64(base)
    kept = delta != 0
    assert abs((1 - kept.mean()) - p) < 0.003  # σ ≈ 0.0005
    # Survivors are rescaled by 1/(1−p), which keeps the mean of the task vector.
    np.testing.assert_allclose(delta[kept], f64(tau)[kept] / (1 - p), rtol=1e-5, atol=1e-5)
    assert abs(delta.mean() - f64(tau).mean()) < 0.01


def test_dare_weights_and_normalize():
    base = rand(1000, 1)
    models = [rand(1000, 2), rand(1000, 3)]
    weights = [0.25, 1.5]
    # A model's mask is keyed by its index, so a weight of 0 isolates each model's dropped τ'.
    solo = [
        f64(merge_tensor("dare", "w", models, base, [1.0, 0.0], drop_rate=0.5, seed=9)) - f64(base),
        f64(merge_tensor("dare", "w", models, base, [0.0, 1.0], drop_rate=0.5, seed=9)) - f64(base),
    ]
    expected = 0.25 * solo[0] + 1.5 * solo[1]
    close(merge_tensor("dare", "w", models, base, weights, drop_rate=0.5, seed=9), f64(base) + expected)
    normalized = merge_tensor("dare", "w", models, base, weights, drop_rate=0.5, seed=9, normalize=True)
    close(normalized, f64(base) + expected / 1.75)
    # Index 0 of a two-model merge gets the same mask as a one-model merge.
    one = merge_tensor("dare", "w", models[:1], base, [1.0], drop_rate=0.5, seed=9)
    close(one, f64(base) + solo[0])


def test_dare_masks_are_keyed_by_seed_name_and_index():
    base = torch.zeros(10_000)
    m = torch.ones(10_000)

    def mask(name="a.weight", seed=0):
        return merge_tensor("dare", name, [m], base, [1.0], drop_rate=0.5, seed=seed) != 0

    assert torch.equal(mask(), mask())
    assert not torch.equal(mask(), mask(name="b.weight"))
    assert not torch.equal(mask(), mask(seed=1))
    # Same tensor twice: the two copies are dropped independently (index is part of the key).
    two = merge_tensor("dare", "a.weight", [m, m], base, [1.0, 1.0], drop_rate=0.5, seed=0)
    assert set(torch.unique(two).tolist()) == {0.0, 2.0, 4.0}
    # A drop rate of 0 is task arithmetic.
    a, b = rand(100, 1), rand(100, 2)
    assert torch.equal(
        merge_tensor("dare", "w", [a], b, [0.5], drop_rate=0.0),
        merge_tensor("task_arithmetic", "w", [a], b, [0.5]),
    )


def test_dare_mask_does_not_depend_on_merge_order():
    base = torch.zeros(5000)
    m = torch.ones(5000)
    first = merge_tensor("dare", "x", [m], base, [1.0], drop_rate=0.4, seed=3)
    merge_tensor("dare", "y", [m], base, [1.0], drop_rate=0.4, seed=3)
    torch.rand(1000)  # disturb the global generator too
    assert torch.equal(merge_tensor("dare", "x", [m], base, [1.0], drop_rate=0.4, seed=3), first)


# ------------------------------------------------------------------------------------------------ SLERP


def reference_slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    cos = float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_reference(t):
    a, b = rand((8, 16), 1), rand((8, 16), 2)
    close(merge_tensor("slerp", "w", [a, b], None, [], t=t), reference_slerp(f64(a), f64(b), t))


def test_slerp_endpoints_are_exact():
    a, b = rand((33, 3), 1), rand((33, 3), 2)
    assert torch.equal(merge_tensor("slerp", "w", [a, b], None, [], t=0.0), a)
    assert torch.equal(merge_tensor("slerp", "w", [a, b], None, [], t=1.0), b)


def test_slerp_stays_on_the_sphere():
    a, b = f32([1, 0, 0]), f32([0, 0.6, 0.8])
    for t in (0.1, 0.5, 0.7):
        out = merge_tensor("slerp", "w", [a, b], None, [], t=t)
        assert abs(float(out.double().norm()) - 1.0) < 1e-6
    half = merge_tensor("slerp", "w", [f32([1, 0]), f32([0, 1])], None, [], t=0.5)
    close(half, np.array([math.sqrt(0.5), math.sqrt(0.5)]), tol=1e-7)


def test_slerp_colinear_and_degenerate_fall_back_to_lerp():
    a = rand(64, 1)
    for b in (2.0 * a, -0.5 * a, a + 1e-4 * rand(64, 2), torch.zeros(64)):
        out = merge_tensor("slerp", "w", [a, b], None, [], t=0.3)
        close(out, 0.7 * f64(a) + 0.3 * f64(b))
    zero = merge_tensor("slerp", "w", [torch.zeros(4), torch.zeros(4)], None, [], t=0.5)
    assert torch.equal(zero, torch.zeros(4))


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, b: merge_tensor("nope", "w", [m], None, [1.0]), "unknown merge method 'nope'"),
        (lambda m, b: merge_tensor("slerp", "w", [m], None, [1.0]), "exactly 2 models, got 1"),
        (lambda m, b: merge_tensor("slerp", "w", [m, m, m], None, [1.0] * 3), "exactly 2 models, got 3"),
        (lambda m, b: merge_tensor("slerp", "w", [m, m], b, []), "takes no base"),
        (lambda m, b: merge_tensor("linear", "w", [m], b, [1.0]), "takes no base"),
        (lambda m, b: merge_tensor("ties", "w", [m], None, [1.0]), "needs a base model"),
        (lambda m, b: merge_tensor("dare", "w", [m], None, [1.0]), "needs a base model"),
        (lambda m, b: merge_tensor("task_arithmetic", "w", [m], None, [1.0]), "needs a base model"),
        (lambda m, b: merge_tensor("linear", "w", [], None, []), "at least one model"),
        (lambda m, b: merge_tensor("linear", "w", [m, m], None, [1.0]), "2 models but 1 weights"),
        (lambda m, b: merge_tensor("linear", "w", [m, m], None, [1.0, -1.0], normalize=True), "nonzero sum"),
        (lambda m, b: merge_tensor("linear", "w", [m], None, [math.nan]), "finite"),
        (lambda m, b: merge_tensor("linear", "w", [m, m.double()], None, [1, 1]), "float32"),
        (lambda m, b: merge_tensor("task_arithmetic", "w", [m], b[:2], [1.0]), "shape"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as info:
        call(torch.ones(3), torch.zeros(3))
    assert "'w'" in str(info.value) or "nope" in str(info.value)


def test_density_given_to_linear_is_ignored_by_dispatch():
    m = rand(10, 1)
    assert torch.equal(merge_tensor("linear", "w", [m], None, [2.0], density=0.1, t=0.9), m * 2.0)


def test_the_front_end_knows_which_parameters_each_kernel_reads():
    """`merge` warns about a parameter its method ignores (E320) from a table of its own, since checking
    imports no torch; it must name exactly the kernels' options, plus `weights` for all but slerp."""
    from recipec.ops.merge import METHOD_PARAMS

    assert set(METHOD_PARAMS) == set(METHODS)
    for method, options in METHOD_OPTIONS.items():
        uses_weights = method != "slerp"
        assert set(METHOD_PARAMS[method]) == set(options) | ({"weights"} if uses_weights else set()), method


# ---------------------------------------------------------------------------------------- determinism

# Runs each method on ~1M entries (an odd count, so thread chunks end mid-vector; quantized deltas, so
# many magnitudes tie at the TIES threshold) under each thread count in turn, and prints output hashes.
# One child process serves both counts: importing torch dominates the cost, and set_num_threads takes
# effect at once. A plain torch.sum is the control: it must differ between the two settings, or the
# test would pass without having exercised anything.
CHILD = r"""
import hashlib, json, torch
from recipec.backends.merge_methods import merge_tensor
n = 1_000_003
g = torch.Generator().manual_seed(0)
base = torch.randn(n, generator=g)
a = base + torch.round(torch.randn(n, generator=g) * 8) / 8
b = base + torch.round(torch.randn(n, generator=g) * 8) / 8
c = base + torch.randn(n, generator=g) * 1e-3
def digest(x):
    return hashlib.sha256(x.numpy().tobytes()).hexdigest()
report = {}
for threads in (1, 2):
    torch.set_num_threads(threads)
    runs = {
        "ties": merge_tensor("ties", "t", [a, b, c], base, [1.0, 0.7, 0.3], density=0.37),
        "ties_norm": merge_tensor("ties", "t", [a, b, c], base, [1.0, 0.7, 0.3], density=0.37, normalize=True),
        "dare": merge_tensor("dare", "t", [a, b, c], base, [1.0, 0.7, 0.3], drop_rate=0.9, seed=11),
        "slerp": merge_tensor("slerp", "t", [a, b], None, [], t=0.3),
        "task_arithmetic": merge_tensor("task_arithmetic", "t", [a, b], base, [0.6, 0.4], normalize=True),
    }
    control = (a * b).sum()
    report[threads] = {"threads": torch.get_num_threads(), "control": digest(control)}
    report[threads].update({k: digest(v) for k, v in runs.items()})
print(json.dumps(report))
"""


def test_outputs_are_bitwise_identical_across_thread_counts():
    src = str(Path(merge_methods.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    one, two = report["1"], report["2"]
    assert (one.pop("threads"), two.pop("threads")) == (1, 2)
    assert one.pop("control") != two.pop("control"), "torch.sum did not change with the thread count"
    assert one == two
