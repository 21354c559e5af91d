"""The whole-model scope's statistics: every order statistic over all tensors of a model.

The authors' code flattens each model into one row; this takes the same
statistics from data that arrives tensor by tensor, in four streamed passes
(float32; eight for float64): two radix-selection passes for the clip bounds of
|tau_i| (step 3), then two for the cut t_i of B_i (step 9), whose max M_i rides
along. The bounds must be final before B can be computed, so the passes cannot
be merged. Memory is one tensor's task vectors plus a 65536-bin histogram per
model and rank.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from mergekit_pcb.kernel.radix import StreamingSelector
from mergekit_pcb.kernel.runtime import owns_threads
from mergekit_pcb.kernel.torch_ops import ClipBounds, cut_index, quantile_indices, scores

# One tensor's rows: the model of each row, and the n x d task vectors in that order.
Rows = tuple[Sequence[Hashable], torch.Tensor]


@dataclass(frozen=True)
class ModelStatistics:
    """One model's statistics over all of its tensors (exact values of the data)."""

    low: float  # clip bounds of |tau| (step 3)
    high: float
    threshold: float  # the cut t (step 9)
    top: float  # max B
    elements: int


class RowStatistics(NamedTuple):
    """The statistics of one tensor's rows, as the kernel's steps take them."""

    bounds: ClipBounds
    threshold: torch.Tensor
    top: torch.Tensor


def row_statistics(
    rows: Sequence[ModelStatistics], dtype: torch.dtype, device: torch.device
) -> RowStatistics:
    """One tensor's statistics from those of the model of each of its rows."""

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(r, name) for r in rows], dtype=dtype, device=device)

    high = column("high")
    bounds = ClipBounds(torch.minimum(column("low"), high), high)
    return RowStatistics(bounds, column("threshold"), column("top"))


@owns_threads
def statistics(
    tensors: Callable[[], Iterable[Rows]], pcb_ratio: float, clamp_ratio: float
) -> dict[Hashable, ModelStatistics]:
    """Each model's statistics; ``tensors()`` yields every tensor's rows, the same rows
    in the same order each time it is called (once per pass)."""

    def select(ranks_of: Callable, rows_of: Callable) -> dict:
        selectors: dict = {}
        while True:
            for models, tau in tensors():
                for model, row in zip(models, rows_of(models, tau), strict=True):
                    if model not in selectors:
                        selectors[model] = StreamingSelector(row.dtype, ranks_of)
                    selectors[model].feed(row)
            for selector in selectors.values():
                selector.advance()
            if all(s.done for s in selectors.values()):
                return {m: (s.values(), s.total) for m, s in selectors.items()}

    def magnitudes(models: Sequence[Hashable], tau: torch.Tensor) -> Iterable[torch.Tensor]:
        return (row.abs() for row in tau)  # one row at a time: no second n x d matrix

    selected = select(lambda d: list(quantile_indices(d, clamp_ratio)), magnitudes)
    if not selected:
        return {}
    bounds = {m: values for m, (values, _) in selected.items()}
    tops: dict = {}

    def balanced(models: Sequence[Hashable], tau: torch.Tensor) -> Iterable[torch.Tensor]:
        low, high = (
            torch.tensor([bounds[m][k] for m in models], dtype=tau.dtype, device=tau.device)
            for k in (0, 1)
        )
        _, score = scores(tau, ClipBounds(torch.minimum(low, high), high))
        for model, top in zip(models, score.amax(dim=1).tolist(), strict=True):
            tops[model] = max(tops.get(model, top), top)
        return score

    cuts = select(lambda d: [cut_index(d, pcb_ratio)], balanced)
    return {
        m: ModelStatistics(
            low=bounds[m][0],
            high=bounds[m][1],
            threshold=cuts[m][0][0],
            top=tops[m],
            elements=cuts[m][1],
        )
        for m in bounds
    }
