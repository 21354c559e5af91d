"""Steps 1-11 of one large tensor with no n x d buffer at all: B is made again in each
pass that reads it.

Why: :func:`.streamed.merge` stores the scores B as an n x d float32 matrix, which
for bf16 inputs is 1.5x the inputs' own bytes (3 experts): at a 70B model's
embedding (128256 x 8192) that is 12.6 GB on top of 8.4 GB of inputs, more than
everything else the merge holds. B is a function of each column's inputs and a
few numbers per row (the clip bounds), so every pass that needs it can make it
again, chunk by chunk in cache, from the inputs (bf16: a quarter of B's bytes per
model). Three passes read B:

1. the keep cut's sample (:class:`.selection.RowSelection`): B at every
   stride-th column only, gathered (about a millionth of a row's columns per
   slot, so a few MB); where the cut is found from block extremes instead, B of
   every chunk, fed as :func:`.streamed.merge` feeds it;
2. the cut's exact count of the sample's window: B of each chunk, made and
   counted at once (each row's max B rides along);
3. the merge with the cut known: :func:`.bindings.merge_chunk_known`, as the
   search merges its candidates (:mod:`.known_cuts`).

Every B is made by the same loops on the same columns, and B of a column depends
on that column's inputs alone: the cut, max B and the output are the floats
that :func:`.streamed.merge` gives, bit for bit. What it costs is two more
evaluations of the score step; what it saves is B's n x d bytes and the page
faults of a buffer that large. :data:`.streamed.STORED_SCORES_BYTES` says which
tensors take it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from mergekit_pcb.kernel import auto_scale, bindings, radix, runtime, selection
from mergekit_pcb.kernel.runtime import Role, column_chunks
from mergekit_pcb.kernel.torch_ops import ClipBounds, cut_index, safe_span

F32 = torch.float32


def _chunk_inputs(source: bindings.Inputs, cols: slice) -> bindings.Inputs:
    """The inputs from column ``cols.start`` on: the loops then index the chunk from 0."""
    return bindings.Inputs(
        [(bits[cols], shift) for bits, shift in source.experts],
        (source.base[0][cols], source.base[1]),
    )


def _scores_at(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    columns: torch.Tensor,
) -> torch.Tensor:
    """B (n x len(columns)) at the given columns, from the inputs gathered there."""
    k = columns.numel()
    gathered = bindings.inputs(
        base.index_select(0, columns), [e.index_select(0, columns) for e in experts]
    )
    out = torch.empty(len(experts), k, dtype=F32)
    total = torch.empty(k, dtype=F32)
    if k:
        bindings.scores_streamed(gathered, slice(0, k), out, rows, total, None)
    return out


def merge(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    loops: bindings.Inputs,
    bounds: ClipBounds,
    coefficients: torch.Tensor,
    ratios: Sequence[float],
    scale: float | str,
    on_scale: Callable[[float], None] | None = None,
    on_ratio: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """What :func:`.streamed.merge` returns for these flat inputs (``loops``: their
    :func:`.bindings.inputs`; ``ratios``: the cuts to take, several for ``pcb_ratio:
    auto``), in O(chunk) working memory besides the output. With ``pcb_ratio: auto``
    or ``lambda: auto``, a pass between the cut and the merge makes m of each chunk at
    every cut and keeps only :mod:`.auto_scale`'s sums of it (B made once per chunk)."""
    n, d = len(experts), base.numel()
    columns = column_chunks(n, d)
    clip = (bounds.low.contiguous(), bounds.high.contiguous())
    rows = (*clip, safe_span(*clip))
    cut = selection.RowSelection(n, d, F32, [cut_index(d, r) for r in ratios])
    tops: dict[int, torch.Tensor] = {}  # each read chunk's row maxima, by first column
    ends: dict[int, int] = {}  # and its end
    lock = threading.Lock()

    def chunk_scores(cols: slice) -> torch.Tensor:
        """B of ``cols`` in this thread's scratch (valid until its next call here);
        the chunk's row maxima are kept."""
        w = cols.stop - cols.start
        score = runtime.buffer(Role.CHUNK_SCORES, n * w, F32, "cpu").view(n, w)
        total = runtime.buffer(Role.STREAMED_TOTAL, w, F32, "cpu")
        chunk = _chunk_inputs(loops, cols)
        top = bindings.scores_streamed(chunk, slice(0, w), score, rows, total, None)
        with lock:
            tops[cols.start], ends[cols.start] = top, cols.stop
        return score

    sample = cut.sample_rows("cpu")
    if sample is not None:  # pass 1: B at the sampled columns only
        digits, stride = sample
        picked = _scores_at(base, experts, rows, torch.arange(0, d, stride))
        radix.top_digits(picked, out=digits)
    else:  # the cut from block extremes (or a full radix count): B of every chunk
        runtime.map_chunks(lambda cols: cut.feed(cols, chunk_scores(cols)), columns, "cpu")

    def values_at(i: int, at: torch.Tensor) -> torch.Tensor:
        return _scores_at(base, experts, rows, at)[i]

    # Pass 2 reads every chunk (the window's count, or the radix passes if it missed),
    # or pass 1 did: either way the row maxima are complete (checked, not assumed).
    thresholds = cut.finish(columns, chunk_scores, values_at, "cpu")
    if not _covers(ends, d):
        runtime.map_chunks(chunk_scores, columns, "cpu")
    top = selection.row_maxima(tops)
    spans = torch.stack([safe_span(t, top) for t in thresholds.unbind(1)], dim=1)
    weights = coefficients.to(dtype=F32).contiguous()

    def level_sums(cols: slice) -> None:
        w = cols.stop - cols.start
        score = runtime.buffer(Role.CHUNK_SCORES, n * w, F32, "cpu").view(n, w)
        total = runtime.buffer(Role.STREAMED_TOTAL, w, F32, "cpu")
        chunk = bindings.scores_known(loops, cols, rows, score, total)
        scratch = tuple(runtime.buffer(role, w, F32, "cpu") for role in runtime.CHUNK_SUMS)
        found[cols.start] = bindings.level_partials(
            chunk, slice(0, w), score, clip, thresholds, spans, weights, scratch
        )

    found: dict[int, list[auto_scale.Partial]] = {}
    if len(ratios) > 1 or auto_scale.is_auto(scale):
        runtime.map_chunks(level_sums, columns, "cpu")
    level, scale = auto_scale.choose(found, ratios, scale, on_scale, on_ratio)
    threshold, span = thresholds[:, level].contiguous(), spans[:, level].contiguous()
    merged = torch.empty(d, dtype=base.dtype)
    output = (scale, merged)

    def combine(cols: slice) -> None:  # the last pass
        w = cols.stop - cols.start
        scratch = (
            runtime.buffer(Role.CHUNK_SCORES, n * w, F32, "cpu").view(n, w),
            runtime.buffer(Role.STREAMED_TOTAL, w, F32, "cpu"),
            *(runtime.buffer(role, w, F32, "cpu") for role in runtime.CHUNK_SUMS[:2]),
        )
        bindings.merge_chunk_known(loops, cols, rows, threshold, span, weights, output, scratch)

    runtime.map_chunks(combine, columns, "cpu")
    return merged


def _covers(ends: dict[int, int], d: int) -> bool:
    """Whether the chunks read so far (first column -> end) cover columns [0, d)."""
    reached = 0
    for start in sorted(ends):
        if start > reached:
            return False
        reached = max(reached, ends[start])
    return reached >= d
