"""Invariants of ``pcb`` that must hold for every input, checked with hypothesis."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit.merge_methods import merge_tensors

import mergekit_pcb  # noqa: F401  (registers pcb in this process)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def merges(draw, max_n: int = 6):
    """A base, n experts and parameters; values may be quantized to force ties."""
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, 60))
    seed = draw(st.integers(0, 2**31 - 1))
    quantize = draw(st.booleans())
    density = draw(st.sampled_from([1.0, 0.5, 0.1]))
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=generator)
    tau = torch.randn(n, d, generator=generator) * (torch.rand(n, d, generator=generator) < density)
    if quantize:  # dyadic values: exact in float32, so ties stay ties
        base = torch.round(base * 16) / 16
        tau = torch.round(tau * 4) / 16
    experts = [base + row for row in tau]
    parameters = {
        "pcb_ratio": draw(st.floats(0.01, 1.0)),
        "clamp_ratio": draw(st.sampled_from([0.0, 1e-4, 0.01, 0.1, 0.3, 0.49])),
        "lambda": draw(st.floats(-2.0, 2.0)),
        "weight": draw(st.lists(st.floats(-2.0, 3.0), min_size=n, max_size=n)),
    }
    return base, experts, parameters


def run(base, experts, parameters):
    return merge_tensors([base, *experts], "pcb", base_index=0, parameters=parameters)


@SETTINGS
@given(case=merges(), data=st.data())
def test_model_order_does_not_matter(case, data):
    base, experts, parameters = case
    order = data.draw(st.permutations(range(len(experts))))
    shuffled = {**parameters, "weight": [parameters["weight"][i] for i in order]}
    first = run(base, experts, parameters)
    second = run(base, [experts[i] for i in order], shuffled)
    assert torch.equal(first, second)


@SETTINGS
@given(case=merges())
def test_unchanged_tensor_stays_base(case):
    base, experts, parameters = case
    out = run(base, [base.clone() for _ in experts], parameters)
    assert torch.equal(out, base)


@SETTINGS
@given(case=merges())
def test_outputs_are_finite_and_shaped_like_base(case):
    base, experts, parameters = case
    out = run(base, experts, parameters)
    assert out.shape == base.shape and out.dtype == base.dtype
    assert torch.isfinite(out).all()


@SETTINGS
@given(case=merges(max_n=1))
def test_single_model_kept_entries_pass_through(case):
    """n = 1: each entry is the base, or base + lambda * weight * its clipped task value."""
    base, (expert,), parameters = case
    out = run(base, [expert], parameters)
    tau = expert - base
    magnitude = tau.abs()
    d = tau.numel()
    q = parameters["clamp_ratio"]
    ordered = torch.sort(magnitude).values
    low, high = ordered[int(d * q)], ordered[int(d * (1 - q) - 1)]
    clipped = torch.sign(tau) * magnitude.clamp(torch.minimum(low, high), high)
    passed = base + parameters["lambda"] * parameters["weight"][0] * clipped
    moved = out != base
    scale = 1e-5 * (1 + passed.abs())
    assert ((out - passed).abs() <= scale)[moved].all()
    # Never more entries than the cut leaves above it.
    assert int(moved.sum()) <= d - int(d * (1 - parameters["pcb_ratio"])) - 1 or d == 0


@SETTINGS
@given(case=merges())
def test_untouched_entries_stay_base(case):
    """Where no model changed an entry, it cannot score above the cut of any model."""
    base, experts, parameters = case
    out = run(base, experts, parameters)
    untouched = torch.stack([e == base for e in experts]).all(dim=0)
    assert torch.equal(out[untouched], base[untouched])
