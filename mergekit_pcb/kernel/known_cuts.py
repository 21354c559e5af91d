"""One tensor merged at many ``pcb_ratio`` levels: statistics once, then one pass per merge.

Why: a search (:mod:`mergekit_pcb.evolve`) merges the same inputs again and again
with other ratios and coefficients. Steps 1-8 depend only on the inputs and
``clamp_ratio``, and of their n x d results step 9 needs only each row's cut
t_i = sorted(B_i)[int(d (1 - r))] and max M_i. :func:`statistics` takes those
once, for every ratio level at once, with the clip bounds of steps 3-4 (a few
numbers per row and level); :func:`merge` then makes B chunk by chunk, in cache,
and combines each chunk at once: one read of the inputs and no n x d buffer.

Bit for bit the merge of :mod:`.paths`, as mergekit runs it:

* ``streamed`` (where :func:`.paths.streams` says so): the loops of
  :func:`.paths.merge_streamed`, on the same chunks and blocks (each chunk's
  inputs are passed as views that start at its first column), with the clip
  bounds of :func:`.streamed.statistics`.
* ``stored`` (every other tensor, and any on a GPU): the chunk functions of
  :func:`.paths.merge_stored` (torch ops, or the loops on CPU float32) on its
  chunks, with the clip bounds of its :class:`.torch_ops.ClipSelection`.

The cuts are the elements that :class:`.selection.RowSelection` picks: the ranks
it takes from block extremes by that very class, the others by an exact
selection in the same order of floats (radix selection's: -0.0 below +0.0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from mergekit_pcb.kernel import auto_scale, bindings, selection, streamed
from mergekit_pcb.kernel.experts import task_vectors
from mergekit_pcb.kernel.paths import NonFiniteTaskVector, streams
from mergekit_pcb.kernel.runtime import (
    Role,
    buffer,
    column_chunks,
    compute_dtype,
    map_chunks,
    owns_threads,
    threads,
)
from mergekit_pcb.kernel.torch_ops import (
    ClipBounds,
    ClipSelection,
    add_scaled,
    combine,
    drop_weights,
    safe_span,
    scores,
)

STREAMED, STORED = "streamed", "stored"
# Rows at least this long are selected in threads (one row per thread).
_THREADED_ROW = 1 << 20


@dataclass
class Statistics:
    """What a merge of one tensor needs besides its inputs, for every level.

    Rows are the experts in the order they were given; ``cuts[:, j]`` is each
    row's cut at ``ranks[j]``. All on CPU, in the compute dtype.
    """

    flavour: str  # STREAMED or STORED: which merge of .paths this reproduces
    changed: bool  # some expert changed the tensor (else the merge is the base)
    low: torch.Tensor | None = None  # clip bounds of |tau| per row
    high: torch.Tensor | None = None
    top: torch.Tensor | None = None  # max B per row
    cuts: torch.Tensor | None = None  # n x len(ranks)

    def rows(self, order: Sequence[int]) -> Statistics:
        """The same statistics with the rows in ``order`` (the experts permuted alike)."""
        if not self.changed:
            return self
        index = torch.tensor(list(order), dtype=torch.long)
        return Statistics(
            self.flavour,
            True,
            self.low[index],
            self.high[index],
            self.top[index],
            self.cuts[index],
        )


def flavour(base: torch.Tensor, experts: Sequence[torch.Tensor], clamp_ratio: float) -> str:
    """Which path mergekit takes for these inputs (and so which one a merge reproduces)."""
    return STREAMED if streams(base, experts, clamp_ratio) else STORED


@owns_threads
def statistics(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    clamp_ratio: float,
    ranks: Sequence[int],
) -> Statistics:
    """Clip bounds, max B and the cut at every rank of ``ranks`` (repeats allowed), for
    the experts in the given order, as the merge of :func:`flavour` takes them.
    Raises :class:`.paths.NonFiniteTaskVector` as the merge does."""
    n, d = len(experts), base.numel()
    kind = flavour(base, experts, clamp_ratio)
    if kind == STREAMED:
        inputs = streamed.source(base, experts)
        stats = streamed.statistics(inputs, clamp_ratio)
        if not stats.finite:
            raise NonFiniteTaskVector(torch.float32)
        if not stats.changed:
            return Statistics(kind, False)
        bounds = stats.bounds
        # The merge's stored-B buffer, kept across tensors as there (up to its limit).
        score = buffer(Role.STORED_SCORES, n * d, torch.float32, "cpu").view(n, d)
        clip = (bounds.low.contiguous(), bounds.high.contiguous())
        rows = (*clip, safe_span(*clip))

        def chunk(cols: slice) -> torch.Tensor:
            total = buffer(Role.STREAMED_TOTAL, cols.stop - cols.start, torch.float32, "cpu")
            return bindings.scores_streamed(inputs.loops, cols, score, rows, total, None)

        tops = map_chunks(chunk, column_chunks(n, d), "cpu")
    else:
        clip_selection = ClipSelection(n, d, compute_dtype(base.dtype), clamp_ratio)
        vectors = task_vectors(base, experts, reuse=True, observe=clip_selection.feed)
        if not vectors.finite:
            raise NonFiniteTaskVector(vectors.tau.dtype)
        if not vectors.changed:
            return Statistics(kind, False)
        tau = vectors.tau
        bounds = clip_selection.finish(tau)
        score = buffer(Role.SCORES, n * d, tau.dtype, tau.device).view(n, d)
        found: dict[int, torch.Tensor] = {}
        _, score = scores(
            tau, bounds, out=score, observe=lambda cols, b, top: found.__setitem__(cols.start, top)
        )
        tops = [found[k] for k in sorted(found)]
    top = torch.stack([t.to(score.device) for t in tops], dim=1).amax(dim=1)
    return Statistics(
        kind,
        True,
        bounds.low.cpu(),
        bounds.high.cpu(),
        top.cpu(),
        cut_values(score, ranks),
    )


def cut_values(score: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """``sorted(score_i)[k]`` (n x len(ranks), on CPU) as the merge's RowSelection picks
    it for a lone rank k (see the module docstring)."""
    n, d = score.shape
    wanted = sorted(set(int(k) for k in ranks))
    extreme = [k for k in wanted if selection.is_extreme(k, d)]
    others = [k for k in wanted if not selection.is_extreme(k, d)]
    found: dict[int, torch.Tensor] = {}
    if extreme:
        columns = column_chunks(n, d, device=score.device)
        pick = selection.RowSelection(n, d, score.dtype, extreme)
        map_chunks(lambda cols: pick.feed(cols, score[:, cols]), columns, score.device)
        values = pick.finish_stored(score, columns)
        found.update({k: values[:, j].cpu() for j, k in enumerate(extreme)})
    if others:
        values = _order_statistics(score, others)
        found.update({k: values[:, j] for j, k in enumerate(others)})
    if not wanted:
        return torch.empty(n, 0, dtype=score.dtype)
    return torch.stack([found[int(k)] for k in ranks], dim=1)


def _order_statistics(score: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """Exact ``sorted(score_i)[k]`` for ascending ``ranks``, -0.0 below +0.0 (n x len)."""
    n, d = score.shape
    if score.device.type == "cpu" and score.dtype == torch.float32 and bindings.enabled:
        rows = [score[i].contiguous() for i in range(n)]
        workers = min(n, threads())
        if workers > 1 and d >= _THREADED_ROW:
            with ThreadPoolExecutor(workers) as pool:  # the loop releases the GIL
                picked = list(pool.map(lambda row: bindings.rank_values(row, ranks), rows))
        else:
            picked = [bindings.rank_values(row, ranks) for row in rows]
        return torch.stack(picked)
    # Elsewhere (float64, a GPU): a sort of the order keys, which never ties -0.0 with 0.0.
    # (On a GPU the merge itself picks a cut by topk, which may return either zero: the
    # two can differ in the sign of a zero output where the base holds -0.0, nowhere else.)
    signed = {torch.float32: torch.int32, torch.float64: torch.int64}[score.dtype]
    flip = torch.iinfo(signed).max
    index = torch.tensor(ranks, device=score.device)
    out = []
    for i in range(n):
        bits = score[i].view(signed)
        keys = bits ^ ((bits >> (torch.iinfo(signed).bits - 1)) & flip)
        picked = keys.sort().values.index_select(0, index)
        out.append((picked ^ ((picked >> (torch.iinfo(signed).bits - 1)) & flip)).view(score.dtype))
    return torch.stack(out).cpu()


@owns_threads
def merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    stats: Statistics,
    level: int,
    *,
    scale: float | str,
    out: torch.Tensor | None = None,
    on_scale: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """base + scale * m (flat, in the base's dtype, on its device) with the cut at
    ``stats.cuts[:, level]``: the floats of the merge of ``stats.flavour`` at that
    level's ratio, for the experts in the order ``stats`` has its rows. Written into
    ``out`` (flat, contiguous, the base's dtype and device) when given. ``scale``
    "auto": as in :func:`.paths.merge_streamed` (m kept in float32, then step 11)."""
    flat = base.reshape(-1)
    if out is None:
        out = torch.empty_like(flat)
    if not stats.changed:
        return out.copy_(flat)
    if stats.flavour == STREAMED:
        _merge_streamed(flat, experts, coefficients, stats, level, scale, out, on_scale)
    else:
        _merge_stored(flat, experts, coefficients, stats, level, scale, out, on_scale)
    return out


def _auto(merged, base, partials, on_scale, out) -> None:
    """Step 11 with :mod:`.auto_scale`'s choice from the chunks' partial sums."""
    chosen = auto_scale.scale_of(partials)
    if on_scale is not None:
        on_scale(chosen)
    out.copy_(add_scaled(base, merged, chosen, base.dtype))


def _merge_streamed(base, experts, coefficients, stats, level, scale, out, on_scale) -> None:
    n, d = len(experts), base.numel()
    inputs = bindings.inputs(base, experts)
    clip = (stats.low.contiguous(), stats.high.contiguous())
    rows = (*clip, safe_span(*clip))
    threshold = stats.cuts[:, level].contiguous()
    span = safe_span(threshold, stats.top)
    weights = torch.tensor(list(coefficients), dtype=torch.float32)
    auto = auto_scale.is_auto(scale)
    merged = torch.empty(d, dtype=torch.float32) if auto else None
    output = (None, merged) if auto else (scale, out)
    partials: dict[int, auto_scale.Partial] = {}

    def chunk(cols: slice) -> None:
        w = cols.stop - cols.start
        scratch = (
            buffer(Role.CHUNK_SCORES, n * w, torch.float32, "cpu").view(n, w),
            buffer(Role.STREAMED_TOTAL, w, torch.float32, "cpu"),
            buffer(Role.STREAMED_NUMERATOR, w, torch.float32, "cpu"),
            buffer(Role.STREAMED_DENOMINATOR, w, torch.float32, "cpu"),
        )
        bindings.merge_chunk_known(inputs, cols, rows, threshold, span, weights, output, scratch)
        if auto:
            partials[cols.start] = bindings.auto_sums_streamed(
                inputs, cols, weights.tolist(), merged[cols]
            )

    map_chunks(chunk, column_chunks(n, d), "cpu")
    if auto:
        _auto(merged, base, partials, on_scale, out)


def _merge_stored(base, experts, coefficients, stats, level, scale, out, on_scale) -> None:
    """As :func:`.paths.merge_stored`: per chunk, tau as task_vectors makes it, then
    scores -> drop_weights -> combine (the floats of pcb_task_vector's chunks); step 11
    over the whole tensor at once, as there (torch's own threads split an op by its size)."""
    n, d = len(experts), base.numel()
    device = base.device
    work = compute_dtype(base.dtype)
    rows = [e.reshape(-1) for e in experts]
    rows = [r if torch.promote_types(r.dtype, work) == work else r.to(work) for r in rows]
    bounds = ClipBounds(stats.low.to(device, work), stats.high.to(device, work))
    threshold = stats.cuts[:, level].to(device, work)
    top = stats.top.to(device, work)
    weights = torch.tensor(list(coefficients), dtype=work, device=device)
    merged = torch.empty(d, dtype=work, device=device)
    auto = auto_scale.is_auto(scale)
    partials: dict[int, auto_scale.Partial] = {}

    def chunk(cols: slice) -> None:
        w = cols.stop - cols.start
        tau = buffer(Role.CHUNK_TAU, n * w, work, device).view(n, w)
        base_chunk = base[cols]
        if base_chunk.dtype != work:
            base_chunk = buffer(Role.TASK_VECTORS_BASE, w, work, device).copy_(base_chunk)
        for i, row in enumerate(rows):
            torch.sub(row[cols], base_chunk, out=tau[i])
        total = auto_scale.task_sum(tau, weights.tolist()) if auto else None
        score = buffer(Role.CHUNK_SCORES, n * w, work, device).view(n, w)
        clipped, score = scores(tau, bounds, out=score)
        kept = drop_weights(score, 1.0, threshold=threshold, top=top, out=score)
        merged[cols] = combine(clipped, kept, weights)
        if auto:
            partials[cols.start] = auto_scale.partial(merged[cols], *total)

    map_chunks(chunk, column_chunks(n, d, device=device), device)
    if auto:
        _auto(merged, base, partials, on_scale, out)
    else:
        out.copy_(add_scaled(base, merged, scale, base.dtype))
