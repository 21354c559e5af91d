"""``lambda: auto``: the scale Lambda of one tensor chosen from its task vectors alone.

The rule (issue 22; every candidate and its scores: docs/lambda-auto.md), with
s = sum_i lambda_i tau_i (Task Arithmetic's sum) and E = sum_i |lambda_i tau_i|^2:

    Lambda = max(0, <m, s> / |m|^2) * min(1, E / |s|^2)

The first factor is the least-squares scale at which Lambda m comes closest to s
(PCB's m is a weighted *average* of the kept entries, so it is too short). But s
counts what the experts share once per expert: with tau_i = c + u_i and the u_i
orthogonal, |s|^2 = E + n(n-1)|c|^2, and the second factor takes s down to
"the shared part once, every expert's own part in full" (1 for orthogonal experts,
1/n for identical ones, so n identical experts give back that expert). Without it
the first factor alone chose ~4 for experts fine-tuned with replay of a shared data
mix and broke the merge. Where m is zero there is nothing to scale (1).

The dot products add per column chunk in float64 and the chunks in order, so every
path that cuts the tensor into the same chunks (:func:`.runtime.column_chunks`)
gets the same Lambda to the bit, whatever the threads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from mergekit_pcb.kernel import runtime

AUTO = "auto"
# pcb_ratio: auto's levels: per tensor, the one whose m has the largest cosine with s.
RATIO_LEVELS = (0.1, 0.2, 0.4, 0.7)

Partial = tuple[float, float, float, float]  # <m, s>, |m|^2, |s|^2, E over some columns


def is_auto(scale: float | str) -> bool:
    return isinstance(scale, str) and scale == AUTO


def ratios(pcb_ratio: float | str) -> tuple[float, ...]:
    """The cuts a merge takes: every level for ``pcb_ratio: auto``, else the one."""
    return RATIO_LEVELS if is_auto(pcb_ratio) else (float(pcb_ratio),)


def choose(
    found: dict[int, list[Partial]],
    levels: Sequence[float],
    scale: float | str,
    on_scale: Callable[[float], None] | None,
    on_ratio: Callable[[float], None] | None,
) -> tuple[int, float]:
    """(the cut, the scale) from each chunk's partial sums at every cut (``found``, by
    the chunk's first column; empty where neither is auto), each told where it was
    chosen: the level by :func:`best_level`, then Lambda of that level's m."""
    level = 0
    if len(levels) > 1:
        level = best_level([cosine_of(by_level(found, k)) for k in range(len(levels))])
        if on_ratio is not None:
            on_ratio(levels[level])
    if is_auto(scale):
        scale = scale_of(by_level(found, level))
        if on_scale is not None:
            on_scale(scale)
    return level, scale


def task_sum(rows: torch.Tensor, coefficients: Sequence[float]) -> tuple[torch.Tensor, float]:
    """(s, E) of an n x w chunk of tau: s added in float64 in row order and rounded once
    to tau's dtype; E in float64. Compiled on CPU float32 (the loops add column by column),
    torch elsewhere (CUDA, float64), so paths agree where their devices and dtypes do."""
    if _compiled(rows):
        total = torch.empty(rows.shape[1], dtype=torch.float32)
        return total, bindings().auto_task_sum(rows, coefficients, total)
    total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    energy = 0.0
    for row, coefficient in zip(rows, coefficients, strict=True):
        scaled = row.double() * float(coefficient)
        total.add_(scaled)
        energy += float(torch.dot(scaled, scaled))
    return total.to(rows.dtype), energy


def partial(merged: torch.Tensor, total: torch.Tensor, energy: float) -> Partial:
    """One chunk's share of the rule's sums, in float64."""
    if _compiled(merged):
        return (*bindings().auto_dots(merged.contiguous(), total.contiguous()), energy)
    m, s = merged.double(), total.double()
    return float(torch.dot(m, s)), float(torch.dot(m, m)), float(torch.dot(s, s)), energy


def _compiled(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32


def bindings():
    from mergekit_pcb.kernel import bindings as compiled  # numba: imported on first use

    return compiled


def scale_of(partials: dict[int, Partial]) -> float:
    """Lambda from the chunks' partial sums (keyed by the chunk's first column)."""
    ms = mm = ss = ee = 0.0
    for start in sorted(partials):
        a, b, c, d = partials[start]
        ms, mm, ss, ee = ms + a, mm + b, ss + c, ee + d
    if mm <= 0:
        return 1.0
    return max(0.0, ms / mm) * (min(1.0, ee / ss) if ss > 0 else 1.0)


def cosine_of(partials: dict[int, Partial]) -> float:
    """cos(m, s) from the chunks' partial sums, added as :func:`scale_of` adds them
    (-inf where m or s is zero)."""
    ms = mm = ss = 0.0
    for start in sorted(partials):
        a, b, c, _ = partials[start]
        ms, mm, ss = ms + a, mm + b, ss + c
    return ms / math.sqrt(mm * ss) if mm > 0 and ss > 0 else -math.inf


def best_level(cosines: Sequence[float]) -> int:
    """``pcb_ratio: auto``'s pick among :data:`RATIO_LEVELS`: the largest cosine, the
    first on a tie (also when every m is zero)."""
    best = 0
    for k, cosine in enumerate(cosines):
        if cosine > cosines[best]:
            best = k
    return best


def by_level(found: dict[int, list[Partial]], k: int) -> dict[int, Partial]:
    """Level ``k``'s partial sums out of each chunk's list of every level's."""
    return {start: levels[k] for start, levels in found.items()}


class Stored:
    """s and E of a stored n x d tau, taken before the steps consume it; then Lambda
    from m over the same chunks the other paths use."""

    def __init__(self, tau: torch.Tensor, weights: torch.Tensor):
        n, d = tau.shape
        self.chunks = runtime.column_chunks(n, d, device=tau.device)
        self.total = torch.empty(d, dtype=tau.dtype, device=tau.device)
        self.energy: dict[int, float] = {}
        coefficients = weights.tolist()

        def chunk(cols: slice) -> None:
            self.total[cols], self.energy[cols.start] = task_sum(tau[:, cols], coefficients)

        runtime.map_chunks(chunk, self.chunks, tau.device)

    def partials(self, merged: torch.Tensor) -> dict[int, Partial]:
        return {
            c.start: partial(merged[c], self.total[c], self.energy[c.start]) for c in self.chunks
        }

    def choose(self, merged: torch.Tensor) -> float:
        return scale_of(self.partials(merged))

    def cosine(self, merged: torch.Tensor) -> float:
        return cosine_of(self.partials(merged))
