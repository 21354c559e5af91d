"""Exact numerics of ``pcb`` through mergekit's public ``merge_tensors``.

The product (float32 selection kernel inside mergekit's method API) is compared
with ``tests/reference.py`` (float64, full sorts, the spec literally) on the same
input values, and with cases worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close_to_reference
from mergekit.merge_methods import merge_tensors
from reference import reference_merge

import mergekit_pcb  # noqa: F401  (registers pcb in this process)


def pcb(base, experts, *, weights=None, pcb_ratio=0.1, clamp_ratio=1e-4, lam=1.0):
    parameters = {"pcb_ratio": pcb_ratio, "clamp_ratio": clamp_ratio, "lambda": lam}
    if weights is not None:
        parameters["weight"] = list(weights)
    return merge_tensors([base, *experts], "pcb", base_index=0, parameters=parameters)


def reference(base, experts, *, weights=None, pcb_ratio=0.1, clamp_ratio=1e-4, lam=1.0):
    return reference_merge(
        base, experts, weights=weights, pcb_ratio=pcb_ratio, clamp_ratio=clamp_ratio, lam=lam
    )


def family(shape, n, seed, *, dtype=torch.float32, scale=0.05, density=1.0, outliers=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    experts = []
    for _ in range(n):
        tau = scale * torch.randn(shape, generator=generator)
        tau *= torch.rand(shape, generator=generator) < density
        if outliers:
            flat = tau.view(-1)
            where = torch.randint(0, flat.numel(), (outliers,), generator=generator)
            flat[where] = 100 * scale * torch.randn(outliers, generator=generator)
        experts.append((base + tau).to(dtype))
    return base.to(dtype), experts


RANDOM_CASES = [
    # shape, n, pcb_ratio, clamp_ratio, seed
    ((7,), 1, 0.5, 0.0, 0),
    ((10,), 2, 0.3, 0.1, 1),
    ((3, 5), 3, 0.2, 0.05, 2),
    ((16, 16), 4, 0.1, 1e-4, 3),
    ((4, 3, 5), 5, 0.25, 0.01, 4),
    ((1000,), 6, 0.05, 1e-3, 5),
    ((257, 33), 7, 0.1, 1e-4, 6),
    ((64, 48), 8, 0.2, 0.01, 7),
    ((2, 2), 8, 0.7, 0.25, 8),
    ((999,), 3, 0.33, 0.49, 9),
    ((128, 3), 2, 1.0, 0.0, 10),
    ((50,), 4, 1.0, 1e-4, 11),
    ((300,), 3, 0.1, 0.0, 12),
    ((3000,), 1, 0.1, 1e-4, 13),
]


@pytest.mark.parametrize("shape,n,pcb_ratio,clamp_ratio,seed", RANDOM_CASES)
def test_random_tensors_match_reference(shape, n, pcb_ratio, clamp_ratio, seed):
    base, experts = family(shape, n, seed)
    weights = [0.5 + 0.25 * i for i in range(n)]
    kwargs = dict(weights=weights, pcb_ratio=pcb_ratio, clamp_ratio=clamp_ratio, lam=1.3)
    out = pcb(base, experts, **kwargs)
    assert out.dtype == torch.float32 and out.shape == base.shape
    assert_close_to_reference(out, reference(base, experts, **kwargs))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_sparse_task_vectors_and_outliers(n):
    """Mostly-zero task vectors (ties at 0 in every score) plus large outliers to clip."""
    base, experts = family((40, 25), n, seed=100 + n, density=0.3, outliers=7)
    kwargs = dict(pcb_ratio=0.2, clamp_ratio=0.01)
    assert_close_to_reference(pcb(base, experts, **kwargs), reference(base, experts, **kwargs))


@pytest.mark.parametrize("n", [1, 3, 6])
def test_ties_between_values(n):
    """Dyadic values: every subtraction is exact, so ties are ties in float32 and float64."""
    generator = torch.Generator().manual_seed(n)
    base = torch.randint(-64, 64, (30, 20), generator=generator).float() / 64
    experts = [
        base + torch.randint(-3, 4, (30, 20), generator=generator).float() / 32 for _ in range(n)
    ]
    for pcb_ratio, clamp_ratio in [(0.1, 0.0), (0.5, 0.1), (1.0, 0.0), (0.3, 0.3)]:
        kwargs = dict(pcb_ratio=pcb_ratio, clamp_ratio=clamp_ratio)
        out = pcb(base, experts, **kwargs)
        assert_close_to_reference(out, reference(base, experts, **kwargs), f"{kwargs}")


def test_one_element_tensor():
    """d = 1: the single score is both the cut and the maximum, so W = 0 and nothing moves."""
    base = torch.tensor([0.5])
    experts = [torch.tensor([0.75]), torch.tensor([0.25]), torch.tensor([1.5])]
    for ratio in (0.1, 1.0):
        out = pcb(base, experts, pcb_ratio=ratio)
        assert torch.equal(out, base)
        assert_close_to_reference(out, reference(base, experts, pcb_ratio=ratio))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_unchanged_tensor_is_base_exactly(dtype):
    base = torch.randn(17, 9, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = pcb(base, [base.clone() for _ in range(3)])
    assert out.dtype == dtype and torch.equal(out, base)


def test_all_zero_task_vectors_among_others():
    """Models that changed nothing only dilute nothing: their W is 0 everywhere."""
    base, (changed,) = family((200,), 1, seed=3)
    experts = [base.clone(), changed, base.clone()]
    out = pcb(base, experts, pcb_ratio=0.2)
    assert_close_to_reference(out, reference(base, experts, pcb_ratio=0.2))
    # Only one model moved anything, so every entry is the base or passes that model's
    # (clipped) value through; d = 200 and q = 1e-4 clip nothing but the largest |tau|.
    moved = out != base
    assert 0 < moved.sum() <= 0.2 * 200 + 1
    passed = torch.isclose(out, changed, rtol=0, atol=1e-6)
    assert (moved & ~passed).sum() <= 1


DTYPE_TOLERANCE = {torch.bfloat16: 2**-8, torch.float16: 2**-11}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 3])
def test_input_dtypes_come_back_in_their_dtype(dtype, n):
    base, experts = family((33, 17), n, seed=21, dtype=dtype)
    kwargs = dict(pcb_ratio=0.2, clamp_ratio=0.01, lam=0.9)
    out = pcb(base, experts, **kwargs)
    assert out.dtype == dtype
    expected = reference(base, experts, **kwargs)  # float64, from the same input values
    if dtype == torch.float64:
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    elif dtype == torch.float32:
        assert_close_to_reference(out, expected)
    else:
        # The float32 result rounded once to the storage dtype: within one ulp of it.
        ulp = DTYPE_TOLERANCE[dtype]
        torch.testing.assert_close(out.double(), expected, rtol=ulp, atol=ulp * 1e-3)


def test_spec_worked_example():
    """../shared/PCB_SPEC.md: n = 2, d = 4, r = 0.5, q = 0 gives m = [0.35, 0, 0, 0]."""
    base = torch.zeros(4, dtype=torch.float64)
    experts = [
        torch.tensor([0.4, -0.2, 0.1, 0.0], dtype=torch.float64),
        torch.tensor([0.3, 0.2, -0.1, 0.0], dtype=torch.float64),
    ]
    out = pcb(base, experts, pcb_ratio=0.5, clamp_ratio=0.0)
    torch.testing.assert_close(out, torch.tensor([0.35, 0, 0, 0], dtype=torch.float64))


def test_hand_worked_clipping_with_one_model():
    """n = 1, d = 10, q = 0.1, r = 0.5, weight 2, lambda 0.5, one outlier.

    lo = int(10 * 0.1) = 1 and hi = int(10 * 0.9 - 1) = 8, so |tau| is clipped to
    [sorted[1], sorted[8]] = [0.2, 0.9]: the outlier -10 becomes -0.9 and 0.1
    becomes 0.2. With n = 1, C = tanh(tau^2) and S grow with |tau| (the outlier's
    S equals 0.9's, its C is larger), so scores rank like |tau|. cut = int(10 * 0.5)
    = 5 keeps the four entries above the 6th smallest score: 0.7, -0.8, 0.9, -10.
    A kept entry of a lone model passes through: m = weight * W * T~ / W = 2 * T~.
    """
    tau = torch.tensor([0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -10.0])
    base = torch.linspace(-1, 1, 10)
    expected = base + 0.5 * 2 * torch.tensor([0, 0, 0, 0, 0, 0, 0.7, -0.8, 0.9, -0.9])
    out = pcb(base, [base + tau], weights=[2.0], pcb_ratio=0.5, clamp_ratio=0.1, lam=0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=4e-7)


def test_hand_worked_conflict_is_dropped():
    """n = 2, d = 4, r = 0.5, q = 0: the entry where the models disagree scores below the cut.

    tau1 = [1, 0.5, 0, 0], tau2 = [-0.5, 0.5, 0, 0]; sum = [0.5, 1, 0, 0].
    Model 1: minmax|tau1| = [1, .5, 0, 0], S1 = [e^2, e^.5, 1, 1], C1 = tanh([.5, .5, 0, 0]),
    B1 = [e^2 tanh .5, e^.5 tanh .5, 0, 0]; cut = int(4 * 0.5) = 2, t1 = sorted(B1)[2] =
    e^.5 tanh .5, so only entry 0 is above it (W1 = [1, 0, 0, 0]).
    Model 2: minmax|tau2| = [1, 1, 0, 0], S2 = [e^2, e^2, 1, 1], C2 = tanh([-.25, .5, 0, 0]),
    B2 = [e^2 tanh(-.25), e^2 tanh .5, 0, 0]; t2 = sorted(B2)[2] = 0, so only entry 1
    survives (W2 = [0, 1, 0, 0]): the conflicting -0.5 is dropped.
    m = [1 * 1 / 1, 0.5 * 1 / 1, 0, 0] = [1, 0.5, 0, 0].
    """
    base = torch.zeros(4)
    experts = [torch.tensor([1.0, 0.5, 0, 0]), torch.tensor([-0.5, 0.5, 0, 0])]
    out = pcb(base, experts, pcb_ratio=0.5, clamp_ratio=0.0)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.5, 0, 0]), rtol=0, atol=1e-7)
    assert_close_to_reference(out, reference(base, experts, pcb_ratio=0.5, clamp_ratio=0.0))
    # With r = 0.25 the cut is the maximum itself (index 3 of 4): nothing is kept at all.
    out = pcb(base, experts, pcb_ratio=0.25, clamp_ratio=0.0)
    assert torch.equal(out, base)


def test_index_expressions_truncate_like_python():
    """10 * (1 - 0.3) is 7.000000000000001: cut = 7, not a rounded 7.0 -> 7 by luck only."""
    assert int(10 * (1 - 0.3)) == 7 and int(10 * (1 - 0.7)) == 3
    base, experts = family((10,), 2, seed=5)
    for ratio in (0.3, 0.7, 0.9, 0.15):
        kwargs = dict(pcb_ratio=ratio, clamp_ratio=0.15)
        assert_close_to_reference(pcb(base, experts, **kwargs), reference(base, experts, **kwargs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_inputs_are_never_mutated(dtype):
    base, experts = family((64, 8), 3, seed=8, dtype=dtype)
    before = [t.clone() for t in (base, *experts)]
    out = pcb(base, experts, pcb_ratio=0.3, clamp_ratio=0.05)
    out.add_(1)  # the result must not alias an input either
    for original, now in zip(before, (base, *experts), strict=True):
        assert torch.equal(original, now)


def test_merge_state_dicts_matches_reference():
    """The other public in-memory API, with a per-model weight mapping."""
    from mergekit.merge_methods import merge_state_dicts

    tensors = {
        name: family(shape, 2, seed) for name, shape, seed in [("a", (12, 5), 1), ("b", (30,), 2)]
    }
    models = {
        "base": {k: v[0] for k, v in tensors.items()},
        "x": {k: v[1][0] for k, v in tensors.items()},
        "y": {k: v[1][1] for k, v in tensors.items()},
    }
    out = merge_state_dicts(
        models, "pcb", base="base", parameters={"weight": {"x": 0.3, "y": 1.7}, "pcb_ratio": 0.4}
    )
    for name, (base, experts) in tensors.items():
        assert_close_to_reference(
            out[name], reference(base, experts, weights=[0.3, 1.7], pcb_ratio=0.4), name
        )


def test_large_n_cannot_overflow():
    """exp(n * x^2) overflows float32 at n = 89 in the reference form; the kernel must not."""
    base, experts = family((500,), 8, seed=9)
    out = pcb(base, experts, pcb_ratio=0.5)
    assert torch.isfinite(out).all()
    assert math.isfinite(float(out.abs().max()))
