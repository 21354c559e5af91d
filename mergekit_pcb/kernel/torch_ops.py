"""Steps 2-11 as torch ops over column chunks: the path for CUDA and float64, and the
reference the compiled loops are tested against.

Every function takes ``tau`` as an ``n x d`` matrix (one row per fine-tuned model),
so the same code serves the per-tensor merge, the whole-model scope (which passes
statistics gathered over all tensors) and the search (which caches per tensor and
re-runs only the steps that depend on what it searches). Step numbers are those of
:mod:`mergekit_pcb.kernel`.

The merge is bound by memory traffic, so a tensor's elementwise steps run chunk by
chunk over columns (:func:`.runtime.column_chunks`), in cache, in threads; the
order statistics are taken from the same chunks while they are there
(:mod:`.selection`), and :func:`pcb_task_vector` never stores W. Where the compiled
loops serve (contiguous CPU float32, :func:`.bindings.serves`) a chunk's step is
one loop instead; both run the same blocks in the same order of additions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from mergekit_pcb.kernel import bindings, runtime, selection
from mergekit_pcb.kernel.runtime import Role, column_chunks

# exp(2x) - 1 is exactly representable as inf from here on; tanh(x) is 1.0 in float32
# and float64 long before it (tanh(20) = 1 - 8e-18).
_TANH_SATURATION = 20.0
# Below this |x|, tanh(x) = x - x^3/3 to 0.13 ulp in float32 (the first dropped
# term, 2/15 x^5, is below 7.9e-9 of x); usual task vectors (|x| ~ 1e-6) all land here.
_TANH_CUBIC_LIMIT = 1 / 64
# Below this |x|, tanh's Taylor polynomial to x^7 is within 1.3e-9 of tanh(x) in relative
# terms (the first dropped term is 62/2835 x^9), far inside float32's 6e-8.
_TANH_POLY_LIMIT = 0.125
_TANH_POLY = (-17 / 315, 2 / 15, -1 / 3)  # coefficients of x^7, x^5, x^3
_LOG2_E = 1.4426950408889634


def quantile_indices(d: int, clamp_ratio: float) -> tuple[int, int]:
    """0-based ranks of the clip bounds, with the reference code's exact truncation."""
    return int(d * clamp_ratio), int(d * (1 - clamp_ratio) - 1)


def cut_index(d: int, pcb_ratio: float) -> int:
    """0-based rank of the drop threshold: entries at or below it are dropped."""
    return int(d * (1 - pcb_ratio))


def order_statistics(x: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Row-wise ``sorted(x)[:, k]`` for every k in ``ks`` (n x len(ks)), never a full sort."""
    return selection.order_statistics(x, ks)


def order_statistic(x: torch.Tensor, k: int) -> torch.Tensor:
    """Row-wise ``sorted(x)[:, k]`` by selection, never a full sort."""
    return order_statistics(x, [k])[:, 0]


class ClipBounds(NamedTuple):
    """Per-row clip bounds of |tau|; after clipping they are also min and max of A."""

    low: torch.Tensor
    high: torch.Tensor


def clip_bounds_from(quantiles: torch.Tensor) -> ClipBounds:
    """The bounds from the n x 2 clip quantiles (low rank, high rank) of |tau|."""
    high = quantiles[:, 1].contiguous()
    # torch.clamp with min > max returns max everywhere; the row is then constant.
    return ClipBounds(torch.minimum(quantiles[:, 0], high), high)


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(dtype=like.dtype, device=like.device)[:, None]


def _rows(*columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """n x 1 per-row values as contiguous vectors of n, for the compiled loops."""
    return tuple(c[:, 0].contiguous() for c in columns)


def safe_span(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """max - min with 1 where the row is constant, so minmax yields 0 there."""
    span = high - low
    return torch.where(span > 0, span, torch.ones_like(span))


def _tanh_exact_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """tanh in place as expm1(2x) / (expm1(2x) + 2): 2x cheaper than torch.tanh on CPU.

    expm1 keeps full relative precision for tiny x (where tanh(x) ~ x); inputs are
    capped where tanh is already exactly 1, so that expm1 cannot overflow.
    x -> -inf gives -1 / 1 = -1 without a cap.
    """
    x.clamp_(max=_TANH_SATURATION).mul_(2).expm1_()
    return x.div_(torch.add(x, 2, out=scratch))


def _tanh_(x: torch.Tensor, square: torch.Tensor, poly: torch.Tensor) -> torch.Tensor:
    """tanh in place; float32 entries by x (1 - x^2/3) or a Taylor polynomial where accurate.

    Why: torch's exp-family kernels run through MKL's VML, which is slow on some
    CPUs (over 20x a multiply per element). Usual
    task vectors give |tau_i * sum tau| far below 1/64, where x (1 - x^2/3) (two ops
    after the square) is exact to float32 rounding; larger entries take the x^7 polynomial,
    and |x| >= 0.125 the expm1 form. Which formula an entry gets depends only on its
    own value, so results never depend on chunking. ``square`` and ``poly`` are
    scratch buffers. A GPU's own tanh is fast and needs no look at the data (which
    here would cost a host sync per chunk).
    """
    if runtime.gpu_style(x.device):
        return x.tanh_()
    if x.dtype != torch.float32:
        return _tanh_exact_(x, square)
    torch.square(x, out=square)
    largest = float(square.amax()) if x.numel() else 0.0
    if largest < _TANH_CUBIC_LIMIT**2:  # the usual case: every entry takes the cubic
        return x.mul_(_cubic_factor(square, out=square))
    exact = None
    if largest >= _TANH_POLY_LIMIT**2:  # rare: keep the exactly computed entries aside
        far = square >= _TANH_POLY_LIMIT**2
        values = x[far]
        exact = _tanh_exact_(values, torch.empty_like(values))
    near = square < _TANH_CUBIC_LIMIT**2
    c7, c5, c3 = _TANH_POLY
    torch.mul(square, c7, out=poly).add_(c5).mul_(square).add_(c3).mul_(square).add_(1)
    x.mul_(torch.where(near, _cubic_factor(square, out=square), poly, out=poly))
    if exact is not None:
        x[far] = exact
    return x


def _cubic_factor(square: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """1 - x^2/3, so that x * it is tanh(x) to x^3 (a product keeps tanh(-0) = -0)."""
    one = torch.ones((), dtype=square.dtype, device=square.device)
    return torch.add(one, square, alpha=-1 / 3, out=out)


def _each_chunk(like: torch.Tensor, step: Callable[[slice], object]) -> list:
    """``step(columns)`` for every column chunk of ``like`` (in threads on CPU)."""
    n, d = like.shape
    return runtime.map_chunks(step, column_chunks(n, d, device=like.device), like.device)


def _buffer(role: Role, n: int, cols: slice, like: torch.Tensor) -> torch.Tensor:
    """A contiguous n x w scratch for one chunk of ``like``, reused per thread and role."""
    w = cols.stop - cols.start
    return runtime.buffer(role, n * w, like.dtype, like.device).view(n, w)


def _column_sum(rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Sum over the rows into ``out``, added in row order (faster than sum(dim=0), and the
    order the compiled loops add in)."""
    if len(rows) == 1:
        return out.copy_(rows[0])
    torch.add(rows[0], rows[1], out=out)
    for row in rows[2:]:
        out.add_(row)
    return out


def _magnitude(chunk: torch.Tensor, cols: slice) -> torch.Tensor:
    """|chunk| (the chunk ``tau[:, cols]``) in this thread's reusable |tau| buffer."""
    return torch.abs(chunk, out=_buffer(Role.MAGNITUDE, len(chunk), cols, chunk))


class ClipSelection:
    """Step 3's clip bounds, gathered from chunks of tau as they are made.

    Why a class: the pass that writes tau (:func:`.experts.task_vectors`) feeds each
    chunk while it is in cache, which saves a whole read of tau. On a GPU the bounds
    come from the whole of |tau| at the end instead (see :class:`.selection.RowSelection`).
    """

    def __init__(self, n: int, d: int, dtype: torch.dtype, clamp_ratio: float):
        self._pick = selection.RowSelection(n, d, dtype, quantile_indices(d, clamp_ratio))

    def feed(self, cols: slice, chunk: torch.Tensor) -> None:
        """The n x w chunk ``tau[:, cols]`` (thread-safe; |tau| is never stored)."""
        if not runtime.gpu_style(chunk.device):
            self._pick.feed(cols, _magnitude(chunk, cols))

    def finish(self, tau: torch.Tensor) -> ClipBounds:
        """The bounds, once every chunk of ``tau`` was fed."""
        n, d = tau.shape
        both = self._pick.finish(
            column_chunks(n, d, device=tau.device),
            lambda cols: _magnitude(tau[:, cols], cols),
            lambda i, c: tau[i].index_select(0, c).abs(),
            tau.device,
        ).to(tau.device)
        return clip_bounds_from(both)


def clip_bounds(tau: torch.Tensor, clamp_ratio: float) -> ClipBounds:
    """Step 3's per-row quantiles of |tau|, in one read of tau."""
    n, d = tau.shape
    clip = ClipSelection(n, d, tau.dtype, clamp_ratio)
    _each_chunk(tau, lambda cols: clip.feed(cols, tau[:, cols]))
    return clip.finish(tau)


def scores(
    tau: torch.Tensor,
    bounds: ClipBounds | None = None,
    *,
    clamp_ratio: float = 0.0,
    out: torch.Tensor | None = None,
    observe: Callable[[slice, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3-8: the clipped task vectors T~ and the balancing scores B.

    Consumes ``tau`` (T~ is written over it); B goes to ``out`` when given, and
    ``observe(columns, B_chunk, row_maxima)`` sees each chunk of B while it is in cache.
    ``bounds`` default to this tensor's own (from ``clamp_ratio``); the whole-model
    scope passes the bounds gathered over all tensors.

    Intra-balancing is computed as exp(n * (x^2 - 1)) = exp(n * x^2) / e^n: a
    per-row constant factor that the later min-max rescale cancels exactly, and
    which keeps the exponent <= 0, so it cannot overflow for any n. It is
    evaluated as 2^(c x^2 - c) with c = n log2(e), since exp2 is the faster kernel.
    """
    n, d = tau.shape
    score = torch.empty_like(tau) if out is None else out
    if bounds is None:
        bounds = clip_bounds(tau, clamp_ratio)
    low, high = _column(bounds.low, tau), _column(bounds.high, tau)
    span = safe_span(low, high)
    if n <= bindings.MAX_MODELS and bindings.serves(tau, score):
        rows = _rows(low, high, span)

        def compiled(cols: slice) -> None:
            top = bindings.score_chunk(tau, score, cols, rows)
            if observe is not None:
                observe(cols, score[:, cols], top)

        _each_chunk(tau, compiled)
        return tau, score
    # exp(n (x^2 - 1)) as 2^(c x^2 - c), c = n log2(e): exp2 is 2-3x cheaper than exp here.
    exponent_scale = n * _LOG2_E
    exponent_offset = torch.tensor(-exponent_scale, dtype=tau.dtype, device=tau.device)

    def chunk(cols: slice) -> None:
        t, s = tau[:, cols], score[:, cols]
        column_total = _column_sum(t, _buffer(Role.COLUMN_TOTAL, 1, cols, tau)[0])
        c = torch.mul(t, column_total, out=s)
        # |tau|'s buffer is free until _magnitude fills it: tanh's square goes there, which
        # keeps the chunk's working set at three n x w matrices (cache-bound).
        _tanh_(c, _buffer(Role.MAGNITUDE, n, cols, tau), _buffer(Role.POLYNOMIAL, n, cols, tau))
        a = _magnitude(t, cols)
        a.clamp_(min=low).clamp_(max=high)  # A (one clamp with both tensor bounds: 9x slower)
        t.sign_().mul_(a)  # T~ = sign(tau) * A
        a.sub_(low).div_(span)  # minmax(A)
        torch.addcmul(exponent_offset, a, a, value=exponent_scale, out=a).exp2_()  # S / e^n
        s.mul_(a)  # B = S * C
        if observe is not None:
            observe(cols, s, s.amax(dim=1))

    _each_chunk(tau, chunk)
    return tau, score


def _weights(score: torch.Tensor, threshold: torch.Tensor, span: torch.Tensor, out: torch.Tensor):
    """Step 9 on a chunk: (max(B, t) - t) / (M - t), the floats of clamp(B, t, M) - t."""
    return torch.sub(score, threshold, out=out).clamp_(min=0).div_(span)


def _mix(
    clipped: torch.Tensor,
    weights: torch.Tensor,
    coefficients: torch.Tensor,
    out: torch.Tensor,
    scratch: torch.Tensor | None = None,
) -> None:
    """Step 10 on a chunk: sum_i lambda_i W_i T~_i / max(sum_i W_i, 1e-12) into ``out``.

    The products go through a contiguous n x w scratch on every path (stored or
    fresh W), so the matrix-vector product always sees one memory layout;
    ``scratch`` may be ``weights`` itself when the caller is done with W (one
    matrix less in cache).
    """
    n, w = clipped.shape
    denominator = _buffer(Role.DENOMINATOR, 1, slice(0, w), clipped)[0]
    _column_sum(weights, denominator).clamp_(min=1e-12)
    if scratch is None:
        scratch = _buffer(Role.PRODUCTS, n, slice(0, w), clipped)
    product = torch.mul(clipped, weights, out=scratch)
    torch.mv(product.T, coefficients, out=out).div_(denominator)


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
    t, m = _column(threshold, score), _column(top, score)
    span = safe_span(t, m)
    weights = torch.empty_like(score) if out is None else out
    if bindings.serves(score, weights):
        rows = _rows(t, span)
        _each_chunk(score, lambda cols: bindings.drop_chunk(score, cols, *rows, weights))
    else:
        _each_chunk(score, lambda cols: _weights(score[:, cols], t, span, weights[:, cols]))
    return weights


def combine(
    clipped: torch.Tensor, weights: torch.Tensor, coefficients: torch.Tensor
) -> torch.Tensor:
    """Step 10: m = sum_i lambda_i W_i T~_i / max(sum_i W_i, 1e-12), per position."""
    d = clipped.shape[1]
    coefficients = coefficients.to(device=clipped.device, dtype=clipped.dtype)
    merged = torch.empty(d, dtype=clipped.dtype, device=clipped.device)
    if bindings.serves(clipped, weights, coefficients):
        unused = torch.empty(len(clipped), dtype=clipped.dtype)
        _each_chunk(
            clipped,
            lambda cols: bindings.combine_chunk(
                clipped, weights, False, cols, unused, unused, coefficients, merged
            ),
        )
    else:
        _each_chunk(
            clipped,
            lambda cols: _mix(clipped[:, cols], weights[:, cols], coefficients, merged[cols]),
        )
    return merged


def pcb_task_vector(
    tau: torch.Tensor,
    coefficients: torch.Tensor,
    *,
    pcb_ratio: float,
    clamp_ratio: float,
    bounds: ClipBounds | None = None,
) -> torch.Tensor:
    """The merged task vector m of one tensor (steps 2-10), consuming ``tau``.

    ``bounds``: the clip bounds when already gathered (see :class:`ClipSelection`).

    The same floats as scores -> drop_weights -> combine, with less traffic: the
    cut's first radix pass and the row maxima are taken from each chunk of B while
    scores() has it in cache, and W is made per chunk in cache, never stored.
    """
    n, d = tau.shape
    score = runtime.buffer(Role.SCORES, n * d, tau.dtype, tau.device).view(n, d)
    cut = selection.RowSelection(n, d, tau.dtype, [cut_index(d, pcb_ratio)])
    tops: dict[int, torch.Tensor] = {}

    def observe(cols: slice, chunk: torch.Tensor, top: torch.Tensor) -> None:
        cut.feed(cols, chunk)
        tops[cols.start] = top

    clipped, score = scores(tau, bounds, clamp_ratio=clamp_ratio, out=score, observe=observe)
    threshold = cut.finish_stored(score)[:, 0]
    t, m = _column(threshold, score), _column(selection.row_maxima(tops), score)
    span = safe_span(t, m)
    coefficients = coefficients.to(device=tau.device, dtype=tau.dtype)
    merged = torch.empty(d, dtype=tau.dtype, device=tau.device)

    def finish(cols: slice) -> None:
        weights = _weights(score[:, cols], t, span, _buffer(Role.WEIGHTS, n, cols, tau))
        _mix(clipped[:, cols], weights, coefficients, merged[cols], scratch=weights)

    if bindings.serves(clipped, score, coefficients):
        rows = _rows(t, span)
        _each_chunk(
            tau,
            lambda cols: bindings.combine_chunk(
                clipped, score, True, cols, *rows, coefficients, merged
            ),
        )
    else:
        _each_chunk(tau, finish)
    return merged


def add_scaled(
    base: torch.Tensor, merged: torch.Tensor, scale: float, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Step 11: base + scale * m, cast to ``dtype``; out of place (base may alias an input).

    Chunked in threads like the rest, and every caller (method, evolve) uses it, so
    they agree bit for bit; the cast of each chunk happens while it is in cache.
    """
    d = merged.numel()
    out = torch.empty(d, dtype=dtype or merged.dtype, device=merged.device)
    if bindings.serves(merged) and bindings.output_serves(base, out.dtype):
        runtime.map_chunks(
            lambda cols: bindings.add_scaled_chunk(base, merged, scale, cols, out),
            column_chunks(1, d, device=merged.device),
            merged.device,
        )
        return out

    def chunk(cols: slice) -> None:
        if out.dtype == merged.dtype:
            torch.add(base[cols], merged[cols], alpha=scale, out=out[cols])
        else:
            work = _buffer(Role.OUTPUT, 1, cols, merged)[0]
            out[cols].copy_(torch.add(base[cols], merged[cols], alpha=scale, out=work))

    runtime.map_chunks(chunk, column_chunks(1, d, device=merged.device), merged.device)
    return out
