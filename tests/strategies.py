"""Hypothesis strategies shared by the order-statistics tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def matrices(draw, max_columns: int = 3000):
    """An n x d matrix (float32 or float64) of normal values, ties, sparse zeros or signed
    zeros, and ranks at both ends and in the middle of a row."""
    n = draw(st.integers(1, 4))
    d = draw(st.integers(1, max_columns))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "ties", "zeros", "signed zeros"]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if kind == "ties":
        x = torch.round(x * 2)
    elif kind == "zeros":
        x *= torch.rand(n, d, generator=g, dtype=torch.float64) < 0.05
    elif kind == "signed zeros":
        x = torch.where(x > 0, torch.zeros_like(x), -torch.zeros_like(x))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    extreme = draw(st.integers(0, 3))
    ranks = [extreme, d - 1 - min(extreme, d - 1), d // 2, int(d * 0.8)]
    return x.to(dtype), [min(max(k, 0), d - 1) for k in ranks]
