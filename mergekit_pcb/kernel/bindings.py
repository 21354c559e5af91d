"""Which steps run as compiled loops (:mod:`.loops`), and the torch-to-numpy calls into them.

Why: on CPU every torch op streams its whole operand through the cache once; the
score step is ~15 ops, and the keep cut's count writes a digits copy and re-reads
it for ``bincount``. Threads barely help such ops when cores share one cache, so
the time per element is what counts, and one compiled loop per step reads each
element once. The torch ops (:mod:`.torch_ops`) stay the reference and the path
for CUDA tensors and float64; the ``*_row`` loops also read a tensor's inputs
directly (:mod:`.streamed`). Every CPU float32 caller (method, model scope, search)
goes through the same loops, so they agree bit for bit.

Numerics differ from the torch ops only by float32 rounding (a few ulp): exp2 is
a degree-7 Taylor polynomial on [-1/2, 1/2] (first dropped term 5.2e-9 relative)
scaled by an exact power of two, valid while the exponent stays >= -125, i.e. for
up to :data:`MAX_MODELS` models; tanh is x (1 - x^2/3) below |x| < 1/64, as in
:mod:`.torch_ops`, and ``math.tanh`` above.

numba is imported on the first CPU merge, not with mergekit: other methods never
pay for it. The loops are compiled once per machine and cached on disk (numba's
``cache=True``; the README's performance section says what that costs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

# exp(n (m^2 - 1)) = 2^y with y >= -n log2(e); the power-of-two scaling stays a normal
# float32 while y >= -125.
MAX_MODELS = int(125 / math.log2(math.e))

enabled = True  # tests switch it off to run the torch ops on CPU


def serves(*tensors: torch.Tensor) -> bool:
    """Whether the compiled loops take the step (else: the torch ops): contiguous CPU float32."""
    return enabled and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    )


def _loops():
    from mergekit_pcb.kernel import loops  # numba: on first use (see the module docstring)

    return loops


def _no_keys(n: int) -> np.ndarray:
    """Row-maximum keys before any score (see loops._score_row): below every float's."""
    return np.full(n, np.iinfo(np.int32).min, dtype=np.int32)


def _maxima(keys: np.ndarray) -> torch.Tensor:
    """The floats whose order-preserving keys these are (the key map is its own inverse)."""
    return torch.from_numpy(keys ^ ((keys >> 31) & _loops().SIGN_FLIP)).view(torch.float32)


def score_chunk(
    tau: torch.Tensor,
    score: torch.Tensor,
    cols: slice,
    bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """torch_ops.scores' step for ``cols`` (T~ over tau, B into score); each row's max B
    there. ``bounds``: low, high and span per row (float32 vectors of n)."""
    loops = _loops()
    keys = _no_keys(len(tau))
    loops.scores(
        tau.numpy(),
        score.numpy(),
        cols.start,
        cols.stop,
        *(b.numpy() for b in bounds),
        np.float32(len(tau) * math.log2(math.e)),
        keys,
    )
    return _maxima(keys)


def window_counts(bits: torch.Tensor, low: int, high: int) -> np.ndarray:
    """radix.window_counts of a flat CPU int32/int64 tensor of bit patterns."""
    counts = np.zeros(high - low + 3, dtype=np.int64)
    array = bits.numpy()
    kind = array.dtype.type
    _loops().window_counts(array, kind(low), kind(high), counts)
    return counts


def combine_chunk(
    clipped: torch.Tensor,
    source: torch.Tensor,
    from_scores: bool,
    cols: slice,
    threshold: torch.Tensor,
    span: torch.Tensor,
    coefficients: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """kernel's steps 9-10 for ``cols`` into ``out`` (the merged vector of d).

    ``source`` is B (``from_scores``: W is made from it with ``threshold`` and
    ``span``) or W itself.
    """
    _loops().combine(
        clipped.numpy(),
        source.numpy(),
        from_scores,
        cols.start,
        cols.stop,
        threshold.numpy(),
        span.numpy(),
        coefficients.numpy(),
        out.numpy(),
    )


def drop_chunk(
    score: torch.Tensor, cols: slice, threshold: torch.Tensor, span: torch.Tensor, out: torch.Tensor
) -> None:
    """kernel's step 9 for ``cols``: W into ``out`` (n x d)."""
    _loops().drop(
        score.numpy(), cols.start, cols.stop, threshold.numpy(), span.numpy(), out.numpy()
    )


# Storage dtypes the *_row loops read as bit patterns: (integer view, shift to float32).
_PATTERNS = {torch.bfloat16: (torch.int16, 16), torch.float32: (torch.int32, 0)}


class Inputs(NamedTuple):
    """A tensor's flat inputs as the ``*_row`` loops read them (see :func:`inputs`)."""

    experts: list[tuple[np.ndarray, int]]  # per model: int16/int32 patterns and shift
    base: tuple[np.ndarray, int]


def _patterns(t: torch.Tensor) -> tuple[np.ndarray, int]:
    """A bf16/float32 tensor, flat, as the loops read it: integer patterns and shift."""
    view, shift = _PATTERNS[t.dtype]
    return t.reshape(-1).view(view).numpy(), shift


def accepts(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the ``*_row`` loops can read these inputs: contiguous CPU bf16 or float32."""
    return enabled and all(
        t.device.type == "cpu" and t.is_contiguous() and t.dtype in _PATTERNS for t in tensors
    )


def inputs(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> Inputs:
    """The loops' view of a tensor's inputs, which :func:`accepts` must accept."""
    return Inputs([_patterns(e) for e in experts], _patterns(base))


def statistics_row(
    source: Inputs, row: int, cols: slice, minima: torch.Tensor, maxima: torch.Tensor
) -> int:
    """One model's block extremes of |tau| on ``cols`` (into float32 vectors of blocks);
    the bit pattern of its largest |tau| there."""
    return int(
        _loops().statistics_row(
            (*source.experts[row], *source.base),
            cols.start,
            cols.stop,
            minima.view(torch.int32).numpy(),
            maxima.view(torch.int32).numpy(),
        )
    )


def scores_streamed(
    source: Inputs,
    cols: slice,
    score: torch.Tensor,
    bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    total: torch.Tensor,
    sample: tuple[torch.Tensor, int] | None,
) -> torch.Tensor:
    """B for ``cols`` from the inputs into ``score`` (n x d), as :func:`score_chunk`
    makes it from a stored tau; each row's max B there. ``total``: scratch of the
    chunk's width; ``sample``: the keep cut's sample rows and stride (see loops.score_row)."""
    loops = _loops()
    sums = total.numpy()
    for i, expert in enumerate(source.experts):
        loops.total_row((*expert, *source.base), cols.start, cols.stop, sums, i == 0)
    n = len(source.experts)
    low, high, span = (b.tolist() for b in bounds)
    scale = np.float32(n * math.log2(math.e))
    scores = score.numpy()
    keys = _no_keys(n)
    rows, stride = (sample[0].numpy(), sample[1]) if sample else (np.empty((n, 0), np.int32), 0)
    for i, expert in enumerate(source.experts):
        keys[i] = loops.score_row(
            (*expert, *source.base), cols.start, cols.stop, sums,
            np.float32(low[i]), np.float32(high[i]), np.float32(span[i]), scale, scores[i], keys[i],
            rows[i], stride,
        )  # fmt: skip
    return _maxima(keys)


def output_serves(base: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether step 11 runs as a compiled loop: a contiguous CPU base and output dtype of
    bf16 or float32 (float32 m)."""
    return accepts([base]) and dtype in _PATTERNS


def _output_args(base: torch.Tensor, out: torch.Tensor) -> tuple:
    target = out.view(_PATTERNS[out.dtype][0]).numpy()
    return *_patterns(base), target, out.dtype == torch.bfloat16


def add_scaled_chunk(
    base: torch.Tensor, merged: torch.Tensor, scale: float, cols: slice, out: torch.Tensor
) -> None:
    """kernel.add_scaled for ``cols``: base + scale * m into ``out`` (flat, bf16 or float32)."""
    base_bits, shift, target, to_bf16 = _output_args(base, out)
    _loops().add_scaled(
        base_bits, shift, merged.numpy(), np.float32(scale), cols.start, cols.stop, target, to_bf16
    )


def _combine(source, cols, score, bounds, threshold, span, coefficients, sums) -> None:
    """Step 10's sums of ``cols`` into ``sums`` (numerator, denominator: the chunk's
    width), T~ made from the inputs, W from B's rows in ``score`` (read at ``cols``)."""
    loops = _loops()
    numerator, denominator = (t.numpy() for t in sums)
    numerator[:] = 0
    denominator[:] = 0
    low, high = (b.tolist() for b in bounds)
    t, width, weight = threshold.tolist(), span.tolist(), coefficients.tolist()
    scores = score.numpy()
    f32 = np.float32
    for i, expert in enumerate(source.experts):
        loops.combine_row(
            (*expert, *source.base), cols.start, cols.stop, f32(low[i]), f32(high[i]), scores[i],
            f32(t[i]), f32(width[i]), f32(weight[i]), numerator, denominator,
        )  # fmt: skip


def combine_streamed(
    source: Inputs,
    cols: slice,
    score: torch.Tensor,
    bounds: tuple[torch.Tensor, torch.Tensor],
    threshold: torch.Tensor,
    span: torch.Tensor,
    coefficients: torch.Tensor,
    output: tuple[torch.Tensor, float, torch.Tensor],
    sums: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Steps 1-4 and 9-11 for ``cols`` from the inputs and B: ``output`` is (base, lambda,
    out), and out gets what :func:`add_scaled_chunk` makes of the merged task vector
    (the same floats as :func:`combine_chunk` gives), which is never stored.
    ``sums``: two scratch vectors of the chunk's width."""
    _combine(source, cols, score, bounds, threshold, span, coefficients, sums)
    base, scale, out = output
    base_bits, shift, target, to_bf16 = _output_args(base, out)
    _loops().finish_output(
        *(t.numpy() for t in sums), base_bits, shift, cols.start, cols.stop, np.float32(scale),
        target, to_bf16,
    )  # fmt: skip


def rank_values(row: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """``sorted(row)[k]`` for each k of ``ranks`` (ascending, no repeats) of a contiguous
    CPU float32 row, as radix selection picks it (see loops.rank_patterns)."""
    if row.numel() >= 1 << 31:
        raise ValueError(f"a row of {row.numel()} elements is too long for rank_values")
    out = np.empty(len(ranks), np.int32)
    _loops().rank_patterns(row.view(torch.int32).numpy(), np.asarray(ranks, np.int64), out)
    return torch.from_numpy(out).view(torch.float32)


def _columns(source: Inputs, cols: slice) -> Inputs:
    """The inputs' views from column ``cols.start`` on: the loops then index the chunk from 0."""
    return Inputs(
        [(bits[cols], shift) for bits, shift in source.experts],
        (source.base[0][cols], source.base[1]),
    )


def scores_known(
    source: Inputs,
    cols: slice,
    bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    score: torch.Tensor,
    total: torch.Tensor,
) -> Inputs:
    """Steps 1-8 of ``cols`` into an n x w ``score`` (``total``: w of scratch), with each
    row's maximum known elsewhere (not tracked): the loops of :func:`scores_streamed` on
    the chunk alone. Returns the inputs' view of the chunk (index it from 0)."""
    loops = _loops()
    chunk = _columns(source, cols)
    w = cols.stop - cols.start
    column_total = total.numpy()
    for i, expert in enumerate(chunk.experts):
        loops.total_row((*expert, *chunk.base), 0, w, column_total, i == 0)
    low, high, width = (b.tolist() for b in bounds)
    f32 = np.float32
    scale = f32(len(chunk.experts) * math.log2(math.e))
    key = _no_keys(1)[0]  # the row maxima are known: the keys are not read
    no_sample = np.empty(0, np.int32)
    rows = score.numpy()
    for i, expert in enumerate(chunk.experts):
        loops.score_row(
            (*expert, *chunk.base), 0, w, column_total, f32(low[i]), f32(high[i]),
            f32(width[i]), scale, rows[i], key, no_sample, 0,
        )  # fmt: skip
    return chunk


def merge_chunk_known(
    source: Inputs,
    cols: slice,
    bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    threshold: torch.Tensor,
    span: torch.Tensor,
    coefficients: torch.Tensor,
    output: tuple[float, torch.Tensor],
    scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Steps 1-11 on ``cols`` with the cut ``threshold`` and ``span`` (= M - t) already
    known: :func:`scores_known` then :func:`combine_streamed`'s loops on the chunk alone,
    with B in an n x w ``scratch`` (scores, column total, numerator, denominator)
    instead of an n x d buffer. The same loops on the same blocks: the same floats.
    ``output``: (lambda, the flat output of d); lambda None: m itself into a float32 out."""
    score, total, numerator, denominator = scratch
    chunk = scores_known(source, cols, bounds, score, total)
    w = cols.stop - cols.start
    _combine(chunk, slice(0, w), score, bounds[:2], threshold, span, coefficients, scratch[2:])
    loops = _loops()
    scale_out, out = output
    if scale_out is None:  # lambda: auto: m itself (float32) into out, scaled later
        loops.finish(numerator.numpy(), denominator.numpy(), out[cols].numpy())
        return
    target = out[cols].view(_PATTERNS[out.dtype][0]).numpy()
    loops.finish_output(
        numerator.numpy(), denominator.numpy(), *chunk.base, 0, w, np.float32(scale_out), target,
        out.dtype == torch.bfloat16,
    )  # fmt: skip


def level_partials(
    source: Inputs,
    cols: slice,
    score: torch.Tensor,
    bounds: tuple[torch.Tensor, torch.Tensor],
    thresholds: torch.Tensor,
    spans: torch.Tensor,
    coefficients: torch.Tensor,
    scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> list[tuple[float, float, float, float]]:
    """For each cut (column k of the n x k ``thresholds`` and ``spans``): m of ``cols``
    as :func:`combine_streamed` makes it (from B in ``score``, read at ``cols``), and
    lambda: auto's (<m, s>, |m|^2, |s|^2, E) over them, as :func:`auto_sums_streamed`
    adds them; s and E are made once for every cut. ``scratch``: three vectors of the
    chunk's width (numerator, denominator, m). m itself is not kept: ``pcb_ratio: auto``
    compares the cuts by these sums, and the chosen cut is merged again."""
    loops = _loops()
    total, energy = _task_sum_streamed(source, cols, coefficients.tolist())
    numerator, denominator, merged = (t.numpy() for t in scratch)
    found = []
    for k in range(thresholds.shape[1]):
        _combine(
            source, cols, score, bounds, thresholds[:, k].contiguous(), spans[:, k].contiguous(),
            coefficients, scratch[:2],
        )  # fmt: skip
        loops.finish(numerator, denominator, merged)
        found.append((*loops.auto_dots(merged, total), energy))
    return found


def _task_sum_streamed(source: Inputs, cols: slice, weights: Sequence[float]) -> tuple:
    """(s of ``cols``, added in float64 and rounded once to float32; E), tau made from
    the inputs: the floats :func:`auto_task_sum` gives from a stored tau."""
    loops = _loops()
    total = np.zeros(cols.stop - cols.start, np.float64)
    energy = 0.0
    for expert, weight in zip(source.experts, weights, strict=True):
        energy += loops.weighted_input_row(
            (*expert, *source.base), cols.start, cols.stop, np.float64(weight), total
        )
    return total.astype(np.float32), energy


def auto_sums_streamed(source: Inputs, cols: slice, weights: Sequence[float], merged) -> tuple:
    """lambda: auto's (<m, s>, |m|^2, |s|^2, E) on ``cols``, tau made from the inputs
    (the float32 m of those columns given); the same floats as :func:`auto_task_sum` and
    :func:`auto_dots` give from a stored tau."""
    total, energy = _task_sum_streamed(source, cols, weights)
    return (*_loops().auto_dots(merged.numpy(), total), energy)


def auto_task_sum(rows: torch.Tensor, weights: Sequence[float], out: torch.Tensor) -> float:
    """s of a stored float32 n x w chunk of tau into ``out`` (rounded once to float32);
    returns its E. See :func:`auto_sums_streamed`."""
    loops = _loops()
    total = np.zeros(rows.shape[1], np.float64)
    energy = 0.0
    for row, weight in zip(rows, weights, strict=True):
        energy += loops.weighted_row(row.numpy(), np.float64(weight), total)
    out.numpy()[:] = total.astype(np.float32)
    return energy


def auto_dots(merged: torch.Tensor, total: torch.Tensor) -> tuple[float, float, float]:
    return _loops().auto_dots(merged.numpy(), total.numpy())
