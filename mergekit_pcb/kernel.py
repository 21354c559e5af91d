"""PCB-Merging arithmetic on task-vector rows, free of any mergekit types.

Every function takes ``tau`` as an ``n x d`` matrix (one row per fine-tuned model)
so the same code serves the per-tensor method, the whole-model scope (which feeds
it statistics gathered over all tensors) and the evolutionary search (which caches
the scores and only re-runs the cheap drop-and-rescale step per candidate).
Formulas and index expressions follow ../shared/PCB_SPEC.md literally.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

# Below this many elements from either end, topk of the short side beats kthvalue.
_TOPK_FRACTION = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other storage dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantile_indices(d: int, clamp_ratio: float) -> tuple[int, int]:
    """0-based ranks of the clip bounds, with the reference code's exact truncation."""
    return int(d * clamp_ratio), int(d * (1 - clamp_ratio) - 1)


def cut_index(d: int, pcb_ratio: float) -> int:
    """0-based rank of the drop threshold: entries at or below it are dropped."""
    return int(d * (1 - pcb_ratio))


def order_statistic(x: torch.Tensor, k: int) -> torch.Tensor:
    """Row-wise ``sorted(x)[:, k]`` by selection, never a full sort.

    ``topk`` of the short side is several times faster than ``kthvalue`` when the
    rank sits near either end (the clip quantiles); ``kthvalue`` wins in between.
    """
    d = x.shape[1]
    if not 0 <= k < d:
        raise IndexError(f"order statistic {k} out of range for {d} elements")
    if k == 0:
        return x.amin(dim=1)
    if k == d - 1:
        return x.amax(dim=1)
    if (k + 1) * _TOPK_FRACTION <= d:
        return x.topk(k + 1, dim=1, largest=False, sorted=False).values.amax(dim=1)
    if (d - k) * _TOPK_FRACTION <= d:
        return x.topk(d - k, dim=1, largest=True, sorted=False).values.amin(dim=1)
    return x.kthvalue(k + 1, dim=1).values


class ClipBounds(NamedTuple):
    """Per-row clip bounds of |tau|; after clipping they are also min and max of A."""

    low: torch.Tensor
    high: torch.Tensor


def clip_bounds(abs_tau: torch.Tensor, clamp_ratio: float) -> ClipBounds:
    lo, hi = quantile_indices(abs_tau.shape[1], clamp_ratio)
    high = order_statistic(abs_tau, hi)
    # torch.clamp with min > max returns max everywhere; the row is then constant.
    low = torch.minimum(order_statistic(abs_tau, lo), high)
    return ClipBounds(low, high)


def _safe_span(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """max - min with 1 where the row is constant, so minmax yields 0 there."""
    span = high - low
    return torch.where(span > 0, span, torch.ones_like(span))


def scores(
    tau: torch.Tensor, bounds: Optional[ClipBounds] = None, *, clamp_ratio: float = 0.0,
    total: Optional[torch.Tensor] = None, n_models: Optional[int] = None,
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
    sign = (tau > 0).to(torch.int8) - (tau < 0).to(torch.int8)
    clipped = tau.abs_()  # tau's storage becomes |tau|, then A, then T~
    if bounds is None:
        bounds = clip_bounds(clipped, clamp_ratio)
    low, high = bounds.low[:, None], bounds.high[:, None]
    clipped.clamp_(low, high)  # A
    intra = (clipped - low).div_(_safe_span(low, high))  # minmax(A)
    intra.square_().sub_(1).mul_(n).exp_()  # S / e^n
    score = balance.mul_(intra)  # B = S * C
    del intra
    clipped.mul_(sign)  # T~ = sign(tau) * A
    return clipped, score


def drop_weights(
    score: torch.Tensor, pcb_ratio: float, *,
    threshold: Optional[torch.Tensor] = None, top: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
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
    clipped: torch.Tensor, weights: torch.Tensor, coefficients: torch.Tensor,
    *, consume: bool = False,
) -> torch.Tensor:
    """Step 10: m = sum_i lambda_i W_i T~_i / max(sum_i W_i, 1e-12), per position."""
    denominator = weights.sum(dim=0).clamp_(min=1e-12)
    numerator = clipped.mul_(weights) if consume else clipped * weights
    numerator = (numerator * coefficients[:, None].to(numerator.dtype)).sum(dim=0)
    return numerator.div_(denominator)


def pcb_task_vector(
    tau: torch.Tensor, coefficients: torch.Tensor, *, pcb_ratio: float, clamp_ratio: float,
) -> torch.Tensor:
    """The merged task vector m of one tensor (steps 2-10), consuming ``tau``."""
    clipped, score = scores(tau, clamp_ratio=clamp_ratio)
    weights = drop_weights(score, pcb_ratio, out=score)
    return combine(clipped, weights, coefficients, consume=True)
