"""The three ways the kernel merges one tensor, each one call from the mergekit adapter.

* :func:`merge_streamed` reads the inputs themselves in each pass and never stores
  tau or T~ (CPU, bf16/float32 inputs, clip ranks found from block extremes:
  :func:`streams` says whether it applies). The usual per-tensor merge.
* :func:`merge_stored` stores tau once, then runs steps 2-11 on it: every other
  per-tensor merge (float16/float64 inputs, CUDA, a large ``clamp_ratio``).
* :func:`merge_with_statistics` runs steps 3-11 with statistics taken over the
  whole model (:mod:`.whole_model`).

Every path takes the experts in the canonical order (:mod:`.experts`) and
gives the same floats: they share the chunks, the block functions and the order
of additions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mergekit_pcb.kernel import auto_scale, bindings, runtime, selection, streamed
from mergekit_pcb.kernel.experts import TaskVectors, task_vectors
from mergekit_pcb.kernel.runtime import Role, column_pieces, compute_dtype, owns_threads
from mergekit_pcb.kernel.torch_ops import (
    ClipSelection,
    add_scaled,
    combine,
    cut_index,
    drop_weights,
    order_statistics,
    pcb_task_vector,
    quantile_indices,
    scores,
)
from mergekit_pcb.kernel.whole_model import ModelStatistics, row_statistics


class NonFiniteTaskVector(ValueError):
    """Some task vector holds NaN/Inf: an input does, or a difference overflows ``dtype``."""

    def __init__(self, dtype: torch.dtype):
        super().__init__(f"a task vector is not finite in {dtype}")
        self.dtype = dtype


def streams(base: torch.Tensor, experts: Sequence[torch.Tensor], clamp_ratio: float) -> bool:
    """Whether :func:`merge_streamed` takes this tensor; model order does not matter."""
    d = base.numel()
    return (
        len(experts) <= bindings.MAX_MODELS
        and all(selection.is_extreme(k, d) for k in quantile_indices(d, clamp_ratio))
        and bindings.accepts([base, *experts])
    )


@owns_threads
def merge_streamed(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    *,
    pcb_ratio: float | str,
    clamp_ratio: float,
    scale: float | str,
    on_scale: Callable[[float], None] | None = None,
    on_ratio: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """base + scale * m in the base's dtype and shape (the base itself if no expert
    changed it), read straight from the inputs, where :func:`streams` says so.
    ``scale`` "auto": :mod:`.auto_scale` chooses it, and ``on_scale`` is told;
    ``pcb_ratio`` "auto": the level :func:`merge_ratio_auto` picks, told to ``on_ratio``
    (the same floats, in O(chunk) memory beyond B, or beyond nothing for large tensors)."""
    inputs = streamed.source(base, experts)
    stats = streamed.statistics(inputs, clamp_ratio)
    if not stats.finite:
        raise NonFiniteTaskVector(torch.float32)
    if not stats.changed:
        return base
    weights = torch.tensor(coefficients, dtype=torch.float32)
    merged = streamed.merge(inputs, stats.bounds, weights, pcb_ratio, scale, on_scale, on_ratio)
    return merged.reshape(base.shape)


def _task_vectors(base: torch.Tensor, experts: Sequence[torch.Tensor], observe=None):
    vectors = task_vectors(base, experts, reuse=True, observe=observe)  # done before the next
    if not vectors.finite:
        raise NonFiniteTaskVector(vectors.tau.dtype)
    return vectors


def _output(vectors: TaskVectors, merged: torch.Tensor, scale: float, like: torch.Tensor):
    return add_scaled(vectors.base, merged, scale, like.dtype).reshape(like.shape)


def _weights(coefficients: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(coefficients, dtype=like.dtype, device=like.device)


def _scale(scale, merged, total, tau, on_scale) -> float:
    """The fixed scale, or the one :mod:`.auto_scale` chooses (``total``: its Stored)."""
    if total is None:
        return scale
    chosen = total.choose(merged)
    if on_scale is not None:
        on_scale(chosen)
    return chosen


@owns_threads
def merge_stored(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    *,
    pcb_ratio: float,
    clamp_ratio: float,
    scale: float | str,
    on_scale: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """As :func:`merge_streamed`, from task vectors stored once (any device and dtype)."""
    clip = ClipSelection(len(experts), base.numel(), compute_dtype(base.dtype), clamp_ratio)
    vectors = _task_vectors(base, experts, observe=clip.feed)  # the clip quantiles ride along
    if not vectors.changed:
        return base
    tau = vectors.tau
    weights = _weights(coefficients, tau)
    total = auto_scale.Stored(tau, weights) if auto_scale.is_auto(scale) else None
    merged = pcb_task_vector(
        tau,
        weights,
        pcb_ratio=pcb_ratio,
        clamp_ratio=clamp_ratio,
        bounds=clip.finish(tau),
    )
    return _output(vectors, merged, _scale(scale, merged, total, tau, on_scale), base)


@owns_threads
def merge_with_statistics(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    statistics: Sequence[ModelStatistics],
    *,
    pcb_ratio: float,
    scale: float | str,
    on_scale: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """As :func:`merge_stored`, with the clip bounds, cut and max B of each expert's
    whole model (:mod:`.whole_model`) instead of this tensor's own.

    With every statistic known, each column depends on its own inputs alone, so the
    tensor is merged one piece of columns at a time (:func:`.runtime.column_pieces`:
    whole chunks, the same floats) and holds tau and B of one piece, not n x d of
    each: at a 70B model's embedding that is the difference between 25 GB and 0.5 GB.
    With ``scale`` "auto" the whole tensor at once (:func:`_merge_with_statistics_whole`)."""
    if auto_scale.is_auto(scale):
        return _merge_with_statistics_whole(
            base, experts, coefficients, statistics, pcb_ratio, scale, on_scale
        )
    n, d = len(experts), base.numel()
    flat = base.reshape(-1)
    rows = [e.reshape(-1) for e in experts]
    out = torch.empty(d, dtype=base.dtype, device=base.device)
    statistic_rows = None
    changed = False
    for cols in column_pieces(n, d, base.device):
        # Unchanged pieces of a changed tensor are merged too (base + scale * m turns a
        # base's -0.0 into +0.0); a tensor no piece of which changed is the base.
        vectors = _task_vectors(flat[cols], [r[cols] for r in rows])
        changed |= vectors.changed
        tau = vectors.tau
        if statistic_rows is None:
            statistic_rows = row_statistics(statistics, tau.dtype, tau.device)
        score = runtime.buffer(Role.SCORES, tau.numel(), tau.dtype, tau.device).view(tau.shape)
        clipped, score = scores(tau, statistic_rows.bounds, out=score)
        weights = drop_weights(
            score, pcb_ratio, threshold=statistic_rows.threshold, top=statistic_rows.top, out=score
        )
        merged = combine(clipped, weights, _weights(coefficients, clipped))
        out[cols] = add_scaled(vectors.base, merged, scale, base.dtype)
    if not changed:
        return base
    return out.reshape(base.shape)


def _merge_with_statistics_whole(
    base, experts, coefficients, statistics, pcb_ratio, scale, on_scale
):
    """merge_with_statistics with ``lambda: auto``: its scale needs all of m before step
    11, so tau and B of the whole tensor are held (as before issue 24)."""
    vectors = _task_vectors(base, experts)
    if not vectors.changed:
        return base
    tau = vectors.tau
    coefficients = _weights(coefficients, tau)
    total = auto_scale.Stored(tau, coefficients) if auto_scale.is_auto(scale) else None
    rows = row_statistics(statistics, tau.dtype, tau.device)
    clipped, score = scores(tau, rows.bounds)
    weights = drop_weights(score, pcb_ratio, threshold=rows.threshold, top=rows.top, out=score)
    merged = combine(clipped, weights, coefficients)
    return _output(vectors, merged, _scale(scale, merged, total, clipped, on_scale), base)


@owns_threads
def merge_ratio_auto(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    *,
    clamp_ratio: float,
    scale: float | str,
    on_scale: Callable[[float], None] | None = None,
    on_ratio: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """``pcb_ratio: auto``: as :func:`merge_stored` at the level of
    :data:`.auto_scale.RATIO_LEVELS` whose m has the largest cosine with s (the Task
    Arithmetic sum; the first level on a tie), told to ``on_ratio``. tau and B are made
    once; W and m once per level (B's n x d twice over while it runs). Where
    :func:`streams`, :func:`merge_streamed` gives the same floats without tau."""
    n, d = len(experts), base.numel()
    clip = ClipSelection(n, d, compute_dtype(base.dtype), clamp_ratio)
    vectors = _task_vectors(base, experts, observe=clip.feed)
    if not vectors.changed:
        return base
    tau = vectors.tau
    weights = _weights(coefficients, tau)
    total = auto_scale.Stored(tau, weights)
    clipped, score = scores(tau, clip.finish(tau), clamp_ratio=clamp_ratio)
    levels = auto_scale.RATIO_LEVELS
    cuts = order_statistics(score, [cut_index(d, r) for r in levels])
    top = score.amax(dim=1)
    best = None
    for k, ratio in enumerate(levels):
        kept = drop_weights(score, ratio, threshold=cuts[:, k].contiguous(), top=top)
        merged = combine(clipped, kept, weights)
        del kept
        cosine = total.cosine(merged)
        if best is None or cosine > best[0]:  # as auto_scale.best_level
            best = (cosine, ratio, merged)
    _, ratio, merged = best
    if on_ratio is not None:
        on_ratio(ratio)
    auto = total if auto_scale.is_auto(scale) else None
    return _output(vectors, merged, _scale(scale, merged, auto, tau, on_scale), base)
