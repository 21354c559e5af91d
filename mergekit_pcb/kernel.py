"""PCB-Merging arithmetic on task-vector rows, free of any mergekit types.

Every function takes ``tau`` as an ``n x d`` matrix (one row per fine-tuned model)
so the same code serves the per-tensor method, the whole-model scope (which feeds
it statistics gathered over all tensors) and the evolutionary search (which caches
the scores and only re-runs the cheap drop-and-rescale step per candidate).
Formulas and index expressions follow ../shared/PCB_SPEC.md literally.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from mergekit_pcb.scope.radix import select_row


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other storage dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantile_indices(d: int, clamp_ratio: float) -> tuple[int, int]:
    """0-based ranks of the clip bounds, with the reference code's exact truncation."""
    return int(d * clamp_ratio), int(d * (1 - clamp_ratio) - 1)


def cut_index(d: int, pcb_ratio: float) -> int:
    """0-based rank of the drop threshold: entries at or below it are dropped."""
    return int(d * (1 - pcb_ratio))


def order_statistics(x: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Row-wise ``sorted(x)[:, k]`` for every k in ``ks`` (n x len(ks)), never a full sort.

    Radix selection over the float bit patterns (:mod:`mergekit_pcb.scope.radix`)
    costs one histogram per row shared by all ranks, about 4x less than
    ``kthvalue`` or ``topk`` on CPU; other dtypes fall back to ``kthvalue``.
    """
    n, d = x.shape
    for k in ks:
        if not 0 <= k < d:
            raise IndexError(f"order statistic {k} out of range for {d} elements")
    if x.dtype not in (torch.float32, torch.float64):
        return torch.stack([x.kthvalue(k + 1, dim=1).values for k in ks], dim=1)
    rows = [select_row(x[i], ks) for i in range(n)]
    return torch.tensor(rows, dtype=x.dtype, device=x.device).reshape(n, len(ks))


def order_statistic(x: torch.Tensor, k: int) -> torch.Tensor:
    """Row-wise ``sorted(x)[:, k]`` by selection, never a full sort."""
    return order_statistics(x, [k])[:, 0]


class ClipBounds(NamedTuple):
    """Per-row clip bounds of |tau|; after clipping they are also min and max of A."""

    low: torch.Tensor
    high: torch.Tensor


def clip_bounds(abs_tau: torch.Tensor, clamp_ratio: float) -> ClipBounds:
    lo, hi = quantile_indices(abs_tau.shape[1], clamp_ratio)
    both = order_statistics(abs_tau, [lo, hi])
    high = both[:, 1].contiguous()
    # torch.clamp with min > max returns max everywhere; the row is then constant.
    low = torch.minimum(both[:, 0], high)
    return ClipBounds(low, high)


def _safe_span(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """max - min with 1 where the row is constant, so minmax yields 0 there."""
    span = high - low
    return torch.where(span > 0, span, torch.ones_like(span))


def scores(
    tau: torch.Tensor,
    bounds: ClipBounds | None = None,
    *,
    clamp_ratio: float = 0.0,
    total: torch.Tensor | None = None,
    n_models: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3-8: the clipped task vectors T~ and the balancing scores B.

    Consumes ``tau`` (it is overwritten to save one n x d buffer). ``bounds``,
    ``total`` (the column sum of the raw tau) and ``n_models`` default to this
    tensor's own; the whole-model scope passes the bounds gathered over all tensors.

    Intra-balancing is computed as exp(n * (x^2 - 1)) = exp(n * x^2) / e^n: a
    per-row constant factor that the later min-max rescale cancels exactly, and
    which keeps the exponent <= 0, so it cannot overflow for any n.
    """
    n = tau.shape[0] if n_models is None else n_models
    if total is None:
        total = tau.sum(dim=0)
    balance = torch.mul(tau, total).tanh_()  # C: inter-balancing, from the raw tau
    magnitude = tau.abs()
    if bounds is None:
        bounds = clip_bounds(magnitude, clamp_ratio)
    low, high = bounds.low[:, None], bounds.high[:, None]
    # T~ = sign(tau) * clamp(|tau|, low, high), built in tau's storage without a sign
    # buffer: clamping tau to [-high, high] caps the magnitude; a positive low
    # bound then lifts nonzero magnitudes below it (sign(0) = 0 stays 0).
    clipped = tau.clamp_(-high, high)
    if bool((bounds.low > 0).any()):
        lift = (magnitude < low).logical_and_(tau != 0)
        clipped = torch.where(lift, torch.copysign(low.expand_as(tau), tau), clipped)
        del lift
    intra = magnitude.clamp_(low, high)  # A, then minmax(A), then S / e^n in place
    intra.sub_(low).div_(_safe_span(low, high))
    intra.square_().sub_(1).mul_(n).exp_()
    score = balance.mul_(intra)  # B = S * C
    del intra, magnitude
    return clipped, score


def drop_weights(
    score: torch.Tensor,
    pcb_ratio: float,
    *,
    threshold: torch.Tensor | None = None,
    top: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step 9: W = minmax(clamp(B, t, M)); zero at or below the cut t.

    ``threshold`` and ``top`` default to this tensor's own cut and maximum.
    Writes into ``out`` when given (``out=score`` consumes the scores).
    """
    if threshold is None:
        threshold = order_statistic(score, cut_index(score.shape[1], pcb_ratio))
    if top is None:
        top = score.amax(dim=1)
    t, m = threshold[:, None], top[:, None]
    weights = torch.clamp(score, min=t, out=out) if out is not None else score.clamp(min=t)
    return weights.sub_(t).div_(_safe_span(t, m))


def combine(
    clipped: torch.Tensor,
    weights: torch.Tensor,
    coefficients: torch.Tensor,
    *,
    consume: bool = False,
) -> torch.Tensor:
    """Step 10: m = sum_i lambda_i W_i T~_i / max(sum_i W_i, 1e-12), per position."""
    denominator = weights.sum(dim=0).clamp_(min=1e-12)
    numerator = clipped.mul_(weights) if consume else clipped * weights
    # sum_i lambda_i * row_i as one matrix-vector product: no n x d temporary.
    numerator = coefficients.to(device=numerator.device, dtype=numerator.dtype) @ numerator
    return numerator.div_(denominator)


def pcb_task_vector(
    tau: torch.Tensor,
    coefficients: torch.Tensor,
    *,
    pcb_ratio: float,
    clamp_ratio: float,
) -> torch.Tensor:
    """The merged task vector m of one tensor (steps 2-10), consuming ``tau``."""
    clipped, score = scores(tau, clamp_ratio=clamp_ratio)
    weights = drop_weights(score, pcb_ratio, out=score)
    return combine(clipped, weights, coefficients, consume=True)
