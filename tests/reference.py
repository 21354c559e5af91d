"""An independent, slow, obviously-correct PCB: float64, full sorts, one step per line.

Written from ../shared/PCB_SPEC.md without looking at mergekit_pcb.kernel; the
tests compare the product against it. It follows the reference code literally
(exp(n x^2), sort-and-index statistics), so it also checks our shifted exponent
and our selection shortcuts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def minmax_rows(x: torch.Tensor) -> torch.Tensor:
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    span = hi - lo
    out = (x - lo) / torch.where(span == 0, torch.ones_like(span), span)
    return torch.where(span == 0, torch.zeros_like(out), out)


def reference_task_vector(
    tau: torch.Tensor, weights: Sequence[float], pcb_ratio: float, clamp_ratio: float
) -> torch.Tensor:
    """The merged task vector m for an n x d matrix of task vectors (float64)."""
    tau = tau.to(torch.float64)
    n, d = tau.shape
    lo = int(d * clamp_ratio)
    hi = int(d * (1 - clamp_ratio) - 1)
    cut = int(d * (1 - pcb_ratio))

    magnitude = tau.abs()
    ordered = torch.sort(magnitude, dim=1).values
    clipped_abs = torch.clamp(magnitude, ordered[:, lo : lo + 1], ordered[:, hi : hi + 1])
    clipped = torch.sign(tau) * clipped_abs

    intra = torch.exp(n * minmax_rows(clipped_abs) ** 2)
    inter = torch.tanh(tau * tau.sum(dim=0, keepdim=True))
    score = intra * inter

    threshold = torch.sort(score, dim=1).values[:, cut : cut + 1]
    top = score.max(dim=1, keepdim=True).values
    kept = torch.clamp(score, threshold, top)
    weight = minmax_rows(kept)

    coefficient = torch.tensor(list(weights), dtype=torch.float64)[:, None]
    numerator = (coefficient * weight * clipped).sum(dim=0)
    return numerator / torch.clamp(weight.sum(dim=0), min=1e-12)


def reference_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    weights: Sequence[float] | None = None,
    pcb_ratio: float | str = 0.1,
    clamp_ratio: float = 1e-4,
    lam: float | str = 1.0,
) -> torch.Tensor:
    """theta0 + lambda * m for one tensor, in float64, shaped like ``base``;
    ``lam="auto"``: :func:`reference_auto_scale`."""
    base64 = base.to(torch.float64).reshape(-1)
    tau = torch.stack([e.to(torch.float64).reshape(-1) - base64 for e in experts])
    weights = [1.0] * len(experts) if weights is None else weights
    if pcb_ratio == "auto":
        merged = reference_ratio_auto(tau, weights, clamp_ratio)
    else:
        merged = reference_task_vector(tau, weights, pcb_ratio, clamp_ratio)
    if lam == "auto":
        lam = reference_auto_scale(merged, tau, weights)
    return (base64 + lam * merged).reshape(base.shape)


def reference_auto_scale(merged: torch.Tensor, tau: torch.Tensor, weights) -> float:
    """lambda: auto, element by element: the least-squares Lambda of Lambda m ~ s =
    sum_i w_i tau_i, floored at 0, times min(1, sum_i |w_i tau_i|^2 / |s|^2); 1 where m
    is zero (nothing to scale)."""
    m, rows = merged.tolist(), tau.tolist()
    scaled = [[w * x for x in row] for w, row in zip(weights, rows, strict=True)]
    total = [math.fsum(row[j] for row in scaled) for j in range(len(m))]
    along = math.fsum(a * b for a, b in zip(m, total, strict=True))
    across = math.fsum(a * a for a in m)
    if across == 0:
        return 1.0
    energy = math.fsum(x * x for row in scaled for x in row)
    spread = math.fsum(x * x for x in total)
    return max(0.0, along / across) * (min(1.0, energy / spread) if spread > 0 else 1.0)


def reference_ratio_auto(tau: torch.Tensor, weights, clamp_ratio: float) -> torch.Tensor:
    """pcb_ratio: auto: the m of the level of 0.1, 0.2, 0.4, 0.7 with the largest cosine
    with s = sum_i w_i tau_i (the first on a tie)."""
    s = (torch.tensor(list(weights), dtype=torch.float64)[:, None] * tau.double()).sum(0)
    best = None
    for ratio in (0.1, 0.2, 0.4, 0.7):
        m = reference_task_vector(tau, weights, ratio, clamp_ratio)
        norms = float(m.norm() * s.norm())
        cosine = float(m @ s) / norms if norms > 0 else -math.inf
        if best is None or cosine > best[0]:
            best = (cosine, m)
    return best[1]
