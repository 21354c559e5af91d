"""``lambda: auto``: the scale Lambda of one tensor chosen from its task vectors alone.

The rule (issue 22; the candidates and their scores: docs/lambda-auto.md): Lambda is
the least-squares scale at which Lambda m comes closest to Task Arithmetic's sum
s = sum_i lambda_i tau_i, i.e. Lambda = <m, s> / |m|^2, floored at 0 (a merged vector
pointing against the sum is not turned around). PCB's m is a weighted *average* of
the kept entries, so where the experts agree Lambda grows toward their count, and
where they cancel it stays near 1. Where m is zero there is nothing to scale (1).

Both dot products add per column chunk in float64 and the chunks in order, so every
path that cuts the tensor into the same chunks (:func:`.runtime.column_chunks`)
gets the same Lambda to the bit, whatever the threads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_pcb.kernel import runtime

AUTO = "auto"


def is_auto(scale: float | str) -> bool:
    return isinstance(scale, str) and scale == AUTO


def task_sum(rows: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """s = sum_i lambda_i tau_i over some columns, added in float64 in row order and
    rounded once to the rows' dtype (float32, or float64 for float64 tensors)."""
    total = torch.zeros(rows[0].shape, dtype=torch.float64, device=rows[0].device)
    for row, coefficient in zip(rows, coefficients, strict=True):
        total.add_(row.double(), alpha=float(coefficient))
    return total.to(rows[0].dtype)


def partial(merged: torch.Tensor, total: torch.Tensor) -> tuple[float, float]:
    """(<m, s>, |m|^2) over one chunk, in float64."""
    m = merged.double()
    return float(torch.dot(m, total.double())), float(torch.dot(m, m))


def scale_of(partials: dict[int, tuple[float, float]]) -> float:
    """Lambda from the chunks' partial sums (keyed by the chunk's first column)."""
    along = across = 0.0
    for start in sorted(partials):
        ms, mm = partials[start]
        along += ms
        across += mm
    return max(0.0, along / across) if across > 0 else 1.0


def stored_total(tau: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """s of a stored n x d tau (taken before the steps consume it), chunk by chunk."""
    total = torch.empty(tau.shape[1], dtype=tau.dtype, device=tau.device)
    coefficients = weights.tolist()

    def chunk(cols: slice) -> None:
        total[cols] = task_sum(list(tau[:, cols]), coefficients)

    runtime.map_chunks(chunk, _chunks(*tau.shape, tau.device), tau.device)
    return total


def choose(merged: torch.Tensor, total: torch.Tensor, n: int) -> float:
    """Lambda from a stored m and s, over the chunks every path of n rows uses."""
    chunks = _chunks(n, merged.numel(), merged.device)
    return scale_of({c.start: partial(merged[c], total[c]) for c in chunks})


def _chunks(n: int, d: int, device) -> list[slice]:
    return runtime.column_chunks(n, d, device=device)
