"""Radix selection (in memory and streamed) against ``torch.sort``, the obvious truth."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_pcb.kernel.radix import StreamingSelector
from mergekit_pcb.kernel.torch_ops import order_statistics

DTYPES = (torch.float32, torch.float64)

# Values chosen to stress the bit-pattern order: signed zeros, subnormals, ties,
# both signs, huge and tiny magnitudes.
SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 1e-310, -1e-310, 1.0, -1.0, 3.0e38, -3.0e38, 0.5, -0.5]


@st.composite
def rows(draw):
    dtype = draw(st.sampled_from(DTYPES))
    pool = st.one_of(
        st.sampled_from(SPECIAL),
        st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32),
        st.integers(-3, 3).map(float),  # many ties
    )
    values = draw(st.lists(pool, min_size=1, max_size=200))
    x = torch.tensor(values, dtype=torch.float64).to(dtype)
    ranks = draw(st.lists(st.integers(0, len(values) - 1), min_size=1, max_size=4))
    ranks += [0, len(values) - 1]  # both ends, always
    return x, ranks


def expected(x: torch.Tensor, ranks) -> list:
    ordered = torch.sort(x).values
    return [ordered[k].item() for k in ranks]


def streaming_select(chunks: list[torch.Tensor], ranks, dtype) -> list:
    """The selector driven as the whole-model scope drives it: every chunk, every pass."""
    selector = StreamingSelector(dtype, ranks)
    while not selector.done:
        for chunk in chunks:
            selector.feed(chunk)
        selector.advance()
    return selector.values()


@settings(max_examples=25, deadline=None)
@given(rows())
def test_one_chunk_equals_sort(case):
    x, ranks = case
    assert streaming_select([x], ranks, x.dtype) == expected(x, ranks)
    assert streaming_select([x.abs()], ranks, x.dtype) == expected(x.abs(), ranks)


@settings(max_examples=25, deadline=None)
@given(rows(), st.integers(8, 64), st.randoms(use_true_random=False))
def test_streaming_equals_sort_for_any_chunking(case, chunk, rnd):
    x, ranks = case
    chunks = list(torch.split(x, chunk))
    rnd.shuffle(chunks)  # the virtual row is a multiset: chunk order must not matter
    assert streaming_select(chunks, ranks, x.dtype) == expected(x, ranks)


def test_streaming_rank_from_length_and_passes():
    x = torch.randn(1000, dtype=torch.float64)
    selector = StreamingSelector(torch.float64, lambda d: [int(d * 0.9)])
    assert selector.passes == 4
    while not selector.done:
        for chunk in torch.split(x, 333):
            selector.feed(chunk)
        selector.advance()
    assert selector.values() == expected(x, [900])
    assert selector.total == 1000


def test_streaming_rejects_out_of_range_and_mixed_dtypes():
    selector = StreamingSelector(torch.float32, [5])
    selector.feed(torch.zeros(3))
    with pytest.raises(IndexError, match="out of range"):
        selector.advance()
    with pytest.raises(TypeError, match="dtype"):
        StreamingSelector(torch.float32, [0]).feed(torch.zeros(3, dtype=torch.float64))


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 6), st.integers(1, 300), st.sampled_from(DTYPES), st.integers(0, 2**31))
def test_kernel_order_statistics_rows(n, d, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=dtype)
    x *= torch.randint(0, 3, (n, d), generator=generator).to(dtype)  # zeros and ties
    ranks = [0, d - 1, d // 2, int(d * 0.9)]
    got = order_statistics(x, ranks)
    want = torch.sort(x, dim=1).values[:, ranks]
    assert got.dtype == dtype
    assert torch.equal(got, want)
