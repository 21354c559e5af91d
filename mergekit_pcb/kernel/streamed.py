"""Steps 1-11 of one tensor read straight from its inputs: tau and T~ are never stored.

Why: with the steps compiled (:mod:`.loops`) the merge is bound by memory traffic,
and most of it was tau: written as an n x d float32 matrix, read back for the
scores, written again as T~ and read for the weighted sum. Deriving tau from the
inputs in each of three passes instead (bf16 inputs are half its bytes per model)
moves far fewer bytes. The clip bounds, B, the cut and the merged vector are the
same floats as :func:`.torch_ops.pcb_task_vector` makes from a stored tau (same
blocks, same order of additions), so the paths that store tau (the search, the
whole-model scope) agree with this one bit for bit. Where it applies:
:func:`mergekit_pcb.kernel.paths.streams`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from mergekit_pcb.kernel import auto_scale, bindings, recomputed, runtime, selection
from mergekit_pcb.kernel.runtime import BLOCK, Role, column_chunks
from mergekit_pcb.kernel.torch_ops import (
    ClipBounds,
    add_scaled,
    clip_bounds_from,
    cut_index,
    quantile_indices,
    safe_span,
)

# |tau|'s bit patterns at or above this are infinite or NaN.
_INFINITY_BITS = 0x7F800000

# B is stored (one pass makes it, two read it) while its n x d float32 bytes stay
# within this; a larger tensor's B is made again in each pass that reads it
# (:mod:`.recomputed`: the same floats, no n x d buffer). The limit is the one buffer
# the runtime keeps that large (runtime.MAX_STORED_SCORES_BYTES): a B above it would
# be a fresh allocation per tensor, whose page faults cost about what making B again
# does, and a bounded one costs a fixed 512 MiB at most, whatever the model's size.
STORED_SCORES_BYTES = runtime.MAX_STORED_SCORES_BYTES


class Source(NamedTuple):
    """A tensor's inputs, flat, as both torch (for gathers) and the loops see them."""

    base: torch.Tensor
    experts: list[torch.Tensor]
    loops: bindings.Inputs

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.experts), self.base.numel()


class Statistics(NamedTuple):
    finite: bool  # no NaN/Inf anywhere in tau
    changed: bool  # some entry of tau is nonzero
    bounds: ClipBounds | None  # only when finite and changed


def source(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> Source:
    """The inputs in this path's form, where :func:`mergekit_pcb.kernel.paths.streams`."""
    flat = [e.reshape(-1) for e in experts]
    return Source(base.reshape(-1), flat, bindings.inputs(base, experts))


def _magnitudes(inputs: Source, row: int, columns: torch.Tensor) -> torch.Tensor:
    """|tau| of one row at the given columns, as the loops compute it."""
    base = inputs.base.index_select(0, columns).float()
    return (inputs.experts[row].index_select(0, columns).float() - base).abs()


def statistics(inputs: Source, clamp_ratio: float) -> Statistics:
    """One read of the inputs: finiteness, whether anything changed, the clip bounds."""
    n, d = inputs.shape
    blocks = -(-d // BLOCK)
    minima, maxima = torch.empty(n, blocks), torch.empty(n, blocks)

    def chunk(cols: slice) -> int:
        return max(
            bindings.statistics_row(inputs.loops, i, cols, minima[i], maxima[i]) for i in range(n)
        )

    largest = max(runtime.map_chunks(chunk, column_chunks(n, d), "cpu"))
    finite, changed = largest < _INFINITY_BITS, largest > 0
    if not (finite and changed):
        return Statistics(finite, changed, None)
    pick = selection.RowSelection(n, d, torch.float32, quantile_indices(d, clamp_ratio))
    pick.feed_blocks(slice(0, d), minima, maxima)
    both = pick.finish([], lambda cols: None, lambda i, c: _magnitudes(inputs, i, c), "cpu")
    return Statistics(True, True, clip_bounds_from(both))


def merge(
    inputs: Source,
    bounds: ClipBounds,
    coefficients: torch.Tensor,
    pcb_ratio: float | str,
    scale: float | str,
    on_scale: Callable[[float], None] | None = None,
    on_ratio: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """The merged tensor base + scale * m (steps 1-11, flat, in the base's dtype): one
    pass makes B (its row maxima and the cut's sample on the way), the cut reads B
    once more, one pass makes the output; m is never stored. Above
    :data:`STORED_SCORES_BYTES` of B: :func:`.recomputed.merge`, B never stored.

    ``pcb_ratio`` "auto" takes the cut at each of :data:`.auto_scale.RATIO_LEVELS`, and
    ``scale`` "auto" needs all of m before step 11: then one more pass makes m of
    every chunk at every cut (:func:`.bindings.level_partials`) and keeps only
    :mod:`.auto_scale`'s sums of it; the level (told to ``on_ratio``) and the scale
    (``on_scale``) come from those, and the last pass merges that cut at that scale
    (with one cut, m is kept over B's first row and scaled instead)."""
    n, d = inputs.shape
    ratios = auto_scale.ratios(pcb_ratio)
    if n * d * 4 > STORED_SCORES_BYTES:
        return recomputed.merge(
            inputs.base, inputs.experts, inputs.loops, bounds, coefficients, ratios, scale,
            on_scale, on_ratio,
        )  # fmt: skip
    columns = column_chunks(n, d)
    score = runtime.buffer(Role.STORED_SCORES, n * d, torch.float32, "cpu").view(n, d)
    cut = selection.RowSelection(n, d, torch.float32, [cut_index(d, r) for r in ratios])
    clip = (bounds.low.contiguous(), bounds.high.contiguous())
    rows = (*clip, safe_span(*clip))
    tops: dict[int, torch.Tensor] = {}

    sample = cut.sample_rows("cpu")  # the loops write it; else each chunk is fed

    def scores(cols: slice) -> None:
        total = runtime.buffer(Role.STREAMED_TOTAL, cols.stop - cols.start, torch.float32, "cpu")
        tops[cols.start] = bindings.scores_streamed(inputs.loops, cols, score, rows, total, sample)
        if sample is None:
            cut.feed(cols, score[:, cols])

    runtime.map_chunks(scores, columns, "cpu")
    thresholds = cut.finish_stored(score)
    top = selection.row_maxima(tops)
    spans = torch.stack([safe_span(t, top) for t in thresholds.unbind(1)], dim=1)
    coefficients = coefficients.to(dtype=torch.float32).contiguous()

    # lambda: auto at one cut: m of each chunk is written over B's first row there (read
    # just before), and step 11 follows from it, instead of merging the cut once more.
    keep_m = len(ratios) == 1 and auto_scale.is_auto(scale)

    def level_sums(cols: slice) -> None:
        w = cols.stop - cols.start
        scratch = [runtime.buffer(r, w, torch.float32, "cpu") for r in runtime.CHUNK_SUMS]
        if keep_m:
            scratch[2] = score[0, cols]
        found[cols.start] = bindings.level_partials(
            inputs.loops, cols, score, clip, thresholds, spans, coefficients, tuple(scratch)
        )

    found: dict[int, list[auto_scale.Partial]] = {}
    if len(ratios) > 1 or auto_scale.is_auto(scale):
        runtime.map_chunks(level_sums, columns, "cpu")
    level, scale = auto_scale.choose(found, ratios, scale, on_scale, on_ratio)
    if keep_m:
        return add_scaled(inputs.base, score[0], scale, inputs.base.dtype)
    threshold, span = thresholds[:, level].contiguous(), spans[:, level].contiguous()
    merged = torch.empty(d, dtype=inputs.base.dtype)
    output = (inputs.base, scale, merged)

    def combine(cols: slice) -> None:
        w = cols.stop - cols.start
        sums = tuple(runtime.buffer(r, w, torch.float32, "cpu") for r in runtime.CHUNK_SUMS[:2])
        bindings.combine_streamed(
            inputs.loops, cols, score, clip, threshold, span, coefficients, output, sums
        )

    runtime.map_chunks(combine, columns, "cpu")
    return merged
