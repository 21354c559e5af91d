"""The compiled loops (torch_ops.loops) and the streamed path (torch_ops.streamed).

The loops replace torch ops on CPU float32, so each is checked three ways: against
an independent float64 evaluation of the same formula on the same float32 values,
against the torch ops they replace (still the CUDA/float64 path), and, for the
streamed path, bit for bit against the stored-tau path that the evolutionary search
and the model scope run. End to end, against tests/reference.py, where the loops'
edge cases live: many models (the exp2 range), entries beyond the tanh cubic, bf16
inputs.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_close_to_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit.merge_methods import merge_tensors
from reference import reference_merge

from mergekit_pcb import kernel
from mergekit_pcb.kernel import (
    bindings,
    paths,
    radix,
    runtime,
    selection,
    streamed,
    torch_ops,
)

ULP = 2.0**-23
TINY = torch.finfo(torch.float32).tiny  # below it float32 is subnormal: ulps are absolute


@pytest.fixture
def loops_off():
    """The torch ops on CPU instead of the loops, for the length of one test."""
    bindings.enabled = False
    try:
        yield
    finally:
        bindings.enabled = True


def _tau(n: int, d: int, scale: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tau = scale * torch.randn(n, d, generator=generator)
    tau[:, ::7] = 0.0  # untouched entries
    tau[:, 3::11] = -0.0
    tau[0, 5::13] = tau[-1, 5::13]  # ties across models
    return tau


def _scores(tau: torch.Tensor, bounds: torch_ops.ClipBounds):
    clipped, score = torch_ops.scores(tau.clone(), bounds)
    return clipped, score


def _float64_scores(tau: torch.Tensor, bounds: torch_ops.ClipBounds) -> torch.Tensor:
    """B with the loops' float32 steps up to tanh's argument and 2's exponent (plain
    IEEE operations, the same on both sides), and exact float64 from there: what is
    left to compare is the loops' exp2 polynomial, tanh and final products."""
    n = len(tau)
    total = tau[0].clone()
    for row in tau[1:]:
        total += row  # float32, in row order, as both paths add them
    low, high = bounds.low[:, None], bounds.high[:, None]
    span = torch.where(high > low, high - low, torch.ones_like(high))
    m = (tau.abs().clamp(min=low, max=high) - low) / span
    scale = torch.tensor(n * 1.4426950408889634, dtype=torch.float32)
    exponent = -scale + scale * (m * m)
    return torch.tanh((tau * total).double()) * torch.exp2(exponent.double())


@pytest.mark.parametrize(
    "n,d,scale",
    [
        (1, 5000, 1e-3),
        (3, 70001, 1e-3),
        (5, 3000, 0.3),
        (8, 4096, 2.0),
        (30, 2000, 0.05),
        (86, 1500, 0.02),
    ],
)
def test_scores_within_a_few_ulp_of_float64(n, d, scale):
    """exp2's polynomial and the tanh branches, over exponents down to -124 (86 models)
    and products up to tanh's saturation."""
    tau = _tau(n, d, scale, seed=n)
    bounds = torch_ops.clip_bounds(tau.clone(), 1e-3)
    clipped, score = _scores(tau, bounds)
    expected = _float64_scores(tau, bounds)
    error = (score.double() - expected).abs() / (expected.abs().clamp(min=TINY) * ULP)
    assert float(error.max()) <= 4, f"max {float(error.max()):.2f} ulp"
    expected_clipped = torch.sign(tau) * tau.abs().clamp(
        min=bounds.low[:, None], max=bounds.high[:, None]
    )
    assert torch.equal(clipped, expected_clipped)


@pytest.mark.parametrize("n,d,scale", [(2, 3000, 1e-2), (6, 20000, 0.5), (40, 1000, 0.05)])
def test_loops_agree_with_the_torch_ops(n, d, scale):
    """The same B (to float32 rounding), the same T~ and the same row maxima as the ops
    the loops replaced (the path CUDA still runs)."""
    tau = _tau(n, d, scale, seed=d)
    bounds = torch_ops.clip_bounds(tau.clone(), 1e-4)
    results = {}
    for enabled in (True, False):
        tops: dict = {}

        def observe(cols: slice, _: torch.Tensor, top: torch.Tensor, tops: dict = tops) -> None:
            tops[cols.start] = top

        bindings.enabled = enabled
        try:
            clipped, score = torch_ops.scores(tau.clone(), bounds, observe=observe)
        finally:
            bindings.enabled = True
        top = torch.stack([tops[k] for k in sorted(tops)], dim=1).amax(dim=1)
        results[enabled] = clipped, score, top
    (c1, s1, t1), (c0, s0, t0) = results[True], results[False]
    assert torch.equal(c1, c0)
    assert torch.equal(t1, s1.amax(dim=1))
    assert torch.equal(t0, s0.amax(dim=1))
    # The torch ops round the exponent y (|y| <= n log2 e) in another order: one ulp of
    # y moves 2^y by n ulp.
    error = (s1 - s0).abs() / (s0.abs().clamp(min=TINY) * ULP)
    assert float(error.max()) <= 8 + n, f"max {float(error.max()):.2f} ulp"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, "mixed"])
@pytest.mark.parametrize("n,d", [(1, 2048), (3, 300_001), (5, 70_001), (8, 4096)])
def test_streamed_path_is_the_stored_path_bit_for_bit(dtype, n, d):
    """Tau re-derived from the inputs in every pass gives the same clip bounds and the
    same merged tensor as the stored-tau kernel and step 11, and as the drop, combine and
    add steps that the evolutionary search runs on its cache."""
    generator = torch.Generator().manual_seed(d + n)
    dtypes = [torch.float32, torch.bfloat16] * n if dtype == "mixed" else [dtype] * (n + 1)
    base = torch.randn(d, generator=generator).to(dtypes[0])
    experts = [
        (base.float() + 0.01 * (i + 1) * torch.randn(d, generator=generator)).to(dtypes[i + 1])
        for i in range(n)
    ]
    coefficients = torch.rand(n, generator=generator) + 0.5
    assert paths.streams(base, experts, 1e-4)
    source = streamed.source(base, experts)
    stats = streamed.statistics(source, 1e-4)
    assert stats.finite and stats.changed
    merged = streamed.merge(source, stats.bounds, coefficients, 0.2, 0.7)

    tau = kernel.task_vectors(base, experts).tau
    bounds = torch_ops.clip_bounds(tau.clone(), 1e-4)
    assert torch.equal(stats.bounds.low, bounds.low)
    assert torch.equal(stats.bounds.high, bounds.high)
    stored = torch_ops.pcb_task_vector(
        tau.clone(), coefficients, pcb_ratio=0.2, clamp_ratio=1e-4, bounds=bounds
    )
    assert torch.equal(merged, torch_ops.add_scaled(base, stored, 0.7, base.dtype))
    clipped, score = torch_ops.scores(tau.clone(), bounds)
    searched = torch_ops.combine(clipped, torch_ops.drop_weights(score, 0.2), coefficients)
    # The search adds in float32 and casts when it writes the model.
    assert torch.equal(merged, torch_ops.add_scaled(base, searched, 0.7).to(base.dtype))


def test_streamed_statistics_flag_unchanged_and_non_finite():
    base = torch.randn(4096).to(torch.bfloat16)
    same = streamed.statistics(streamed.source(base, [base.clone(), base.clone()]), 1e-4)
    assert (same.finite, same.changed, same.bounds) == (True, False, None)
    broken = base.clone()
    broken[1234] = float("nan")
    bad = streamed.statistics(streamed.source(base, [base.clone(), broken]), 1e-4)
    assert not bad.finite
    huge = torch.full((4096,), 3e38)
    overflow = streamed.statistics(streamed.source(-huge, [huge]), 1e-4)
    assert not overflow.finite  # 3e38 - (-3e38) is inf in float32


@pytest.mark.parametrize(
    "why,base,experts,clamp_ratio",
    [
        (
            "float16",
            torch.zeros(4096, dtype=torch.float16),
            [torch.ones(4096, dtype=torch.float16)],
            1e-4,
        ),
        (
            "float64",
            torch.zeros(4096, dtype=torch.float64),
            [torch.ones(4096, dtype=torch.float64)],
            1e-4,
        ),
        ("clip ranks not extreme", torch.zeros(4096), [torch.ones(4096)], 0.01),
        ("too short for block extremes", torch.zeros(1000), [torch.ones(1000)], 1e-4),
        (
            "more models than exp2's range",
            torch.zeros(4096),
            [torch.ones(4096)] * (bindings.MAX_MODELS + 1),
            1e-4,
        ),
        ("not contiguous", torch.zeros(4096, 2)[:, 0], [torch.ones(4096, 2)[:, 0]], 1e-4),
    ],
)
def test_streamed_path_declines(why, base, experts, clamp_ratio):
    assert not paths.streams(base, experts, clamp_ratio), why


@pytest.mark.parametrize("n", [bindings.MAX_MODELS, bindings.MAX_MODELS + 1])
def test_many_models_match_the_reference(n):
    """Both sides of the loops' model limit (exp2's exponent range) through merge_tensors."""
    generator = torch.Generator().manual_seed(n)
    base = torch.randn(1536, generator=generator)
    experts = [base + 0.05 * torch.randn(1536, generator=generator) for _ in range(n)]
    out = merge_tensors([base, *experts], "pcb", base_index=0, parameters={"pcb_ratio": 0.3})
    assert_close_to_reference(out, reference_merge(base, experts, pcb_ratio=0.3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streamed_path_matches_the_reference(dtype):
    """bf16/float32 inputs long enough for the streamed path, products beyond the cubic."""
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(64, 96, generator=generator).to(dtype)
    experts = [
        (base.float() + s * torch.randn(64, 96, generator=generator)).to(dtype)
        for s in (0.02, 0.3, 1.5)
    ]
    assert paths.streams(base, experts, 1e-4)
    parameters = {"pcb_ratio": 0.2, "weight": [0.5, 1.0, 2.0], "lambda": 0.8}
    out = merge_tensors([base, *experts], "pcb", base_index=0, parameters=parameters)
    expected = reference_merge(base, experts, weights=[0.5, 1.0, 2.0], pcb_ratio=0.2, lam=0.8)
    if dtype == torch.float32:
        assert_close_to_reference(out, expected)
    else:  # the float32 result rounded once to bf16: within one bf16 ulp of the reference
        torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=2**-8 * 1e-3)


def test_torch_ops_still_match_the_reference(loops_off):
    """The torch ops (CUDA's path) stay checked on CPU with the loops switched off."""
    generator = torch.Generator().manual_seed(11)
    base = torch.randn(3000, generator=generator)
    experts = [base + 0.05 * torch.randn(3000, generator=generator) for _ in range(4)]
    out = merge_tensors([base, *experts], "pcb", base_index=0, parameters={"pcb_ratio": 0.2})
    assert_close_to_reference(out, reference_merge(base, experts, pcb_ratio=0.2))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-(2**31), 2**31 - 1), min_size=0, max_size=3000),
    st.integers(-(2**31) + 1, 2**31 - 2),
    st.integers(0, 70000),
)
def test_window_counts_equal_a_bincount(values, low, width):
    """Counts below, at each pattern of, and above a window, as the torch path makes them."""
    high = min(low + width, 2**31 - 2)
    bits = torch.tensor(values, dtype=torch.int32)
    got = bindings.window_counts(bits, low, high)
    array = np.array(values, dtype=np.int64)
    expected = np.zeros(high - low + 3, dtype=np.int64)
    expected[0] = (array < low).sum()
    expected[-1] = (array > high).sum()
    inside = array[(array >= low) & (array <= high)]
    np.add.at(expected, inside - low + 1, 1)
    assert np.array_equal(got, expected)
    bindings.enabled = False  # radix's torch ops (CUDA's path) agree
    try:
        assert np.array_equal(got, radix.window_counts(bits.view(torch.float32), (low, high)))
    finally:
        bindings.enabled = True


def test_mergekit_does_not_import_numba():
    """numba costs ~0.2 s to import: only a CPU pcb merge loads it, not mergekit."""
    code = (
        "import sys, mergekit.merge_methods, mergekit.merge\n"
        "from mergekit.merge_methods import registry\n"
        "assert 'numba' not in sys.modules, 'numba imported'\n"
        "import mergekit_pcb.method\n"
        "assert 'numba' not in sys.modules, 'numba imported by the method'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_streamed_scores_store_the_sample_that_feed_would():
    """The loops write the keep cut's sample while B is in cache; a wrong sample would
    only cost the full radix passes, so it is checked here against feed()'s."""
    generator = torch.Generator().manual_seed(5)
    n, d = 3, 200_003
    base = torch.randn(d, generator=generator).to(torch.bfloat16)
    experts = [(base.float() + 0.01 * torch.randn(d, generator=generator)).bfloat16()]
    experts += [(base.float() + 0.02 * torch.randn(d, generator=generator)).bfloat16()] * 2
    assert paths.streams(base, experts, 1e-4)
    source = streamed.source(base, experts)
    bounds = streamed.statistics(source, 1e-4).bounds
    rows = (bounds.low, bounds.high, torch_ops.safe_span(bounds.low, bounds.high))
    score = torch.empty(n, d)
    fed = selection.RowSelection(n, d, torch.float32, [torch_ops.cut_index(d, 0.2)])
    fed_sample, stride = fed.sample_rows("cpu")
    written = torch.full_like(fed_sample, -1)  # its own memory, not the workspace's
    for cols in runtime.column_chunks(n, d):
        total = torch.empty(cols.stop - cols.start)
        bindings.scores_streamed(source.loops, cols, score, rows, total, (written, stride))
        fed.feed(cols, score[:, cols])
    assert torch.equal(written, fed_sample)
