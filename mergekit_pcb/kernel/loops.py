"""The kernel's hottest CPU steps as compiled loops (numba): one pass over each chunk.

Imported only through :mod:`.bindings` on the first CPU merge, never with
mergekit itself (numba is slow to import). Each function takes numpy views of
the torch buffers and writes its results in place; ``nogil`` lets the kernel's
chunk threads run them side by side. See :mod:`.bindings` for why and
for the numerics.

Two sources of tau: a stored n x d matrix (model scope, evolve, float32 task
vectors made by torch), or the inputs themselves (the ``*_row`` loops of the
per-tensor merge, which never stores tau or T~: one call per model and chunk, so
that no list of arrays crosses into numba, whose typed lists are slow to set up
in each process). Both run the same per-row block functions on the same float32
values, adding rows in the same order, so they agree bit for bit. Inputs are read
as bit patterns: bf16 as int16 (``shift`` 16: the float32 with those top bits,
exact) or float32 as int32 (``shift`` 0).

Loops index slices from 0 throughout: an offset index (``a[first + j]``) keeps
numba's negative-index check in the loop, which stops vectorization.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Columns per inner block: the block's temporaries (a few x 2 KiB) stay in L1.
_BLOCK = 512
_TANH_CUBIC_LIMIT = 1 / 64
_EXP2_TAYLOR = tuple(math.log(2) ** k / math.factorial(k) for k in range(8))
SIGN_FLIP = 0x7FFFFFFF
# Columns per block of the clip selection's block extremes (selection.BLOCK); _BLOCK is a
# multiple of it.
_STAT_BLOCK = 64


@njit(inline="always")
def _load(source, shift, first, w, out):
    """float32 patterns of source[first:first + w] into the int32 ``out`` (see module)."""
    values = source[first : first + w]
    if shift:
        for j in range(w):
            out[j] = (np.int32(values[j]) & 0xFFFF) << 16
    else:
        for j in range(w):
            out[j] = np.int32(values[j])


@njit(inline="always")
def _task_vector(source, first, w, out, scratch):
    """tau = float32(expert) - float32(base) on columns [first, first + w) into the
    float32 ``out``, as torch.sub makes it. ``source``: (expert, its shift, base, its
    shift); ``scratch``: 2 x _BLOCK int32."""
    expert, shift, base, base_shift = source
    base_bits, expert_bits = scratch[0], scratch[1]
    _load(base, base_shift, first, w, base_bits)
    _load(expert, shift, first, w, expert_bits)
    base_values = base_bits.view(np.float32)
    expert_values = expert_bits.view(np.float32)
    for j in range(w):
        out[j] = expert_values[j] - base_values[j]


@njit(inline="always")
def _clipped(x, a):
    """T~ = sign(tau) * A, with torch.sign's sign (0 for both zeros)."""
    one, zero = np.float32(1), np.float32(0)
    return (one if x > 0 else (-one if x < 0 else zero)) * a


@njit(inline="always")
def _weight(score, threshold, width):
    """W = max(B - t, 0) / (M - t)."""
    zero = np.float32(0)
    weight = score - threshold
    return (weight if weight > zero else zero) / width


@njit(inline="always")
def _score_row(row, total, w, low, high, span, scale, out, key, work, keep_clipped):
    """Steps 3-8 on w columns of one row: T~ written over ``row`` (tau), B into ``out``;
    returns ``key`` raised to the row's max B as an order-preserving int32 key (an
    integer max vectorizes, a float one does not). ``work``: 3 x _BLOCK float32."""
    product, power = work[0], work[1]
    power_bits = power.view(np.int32)
    exponent = work[2].view(np.int32)
    c1, c2, c3 = (
        np.float32(_EXP2_TAYLOR[1]),
        np.float32(_EXP2_TAYLOR[2]),
        np.float32(_EXP2_TAYLOR[3]),
    )
    c4, c5 = np.float32(_EXP2_TAYLOR[4]), np.float32(_EXP2_TAYLOR[5])
    c6, c7 = np.float32(_EXP2_TAYLOR[6]), np.float32(_EXP2_TAYLOR[7])
    one, half = np.float32(1), np.float32(0.5)
    third = np.float32(-1 / 3)
    cubic_limit = np.float32(_TANH_CUBIC_LIMIT**2)
    offset = -scale
    beyond_cubic = 0
    for j in range(w):
        x = row[j]
        c = x * total[j]
        product[j] = c
        beyond_cubic |= np.int32(c * c >= cubic_limit)
        a = min(max(abs(x), low), high)  # A
        m = (a - low) / span  # minmax(A)
        # S / e^n = 2^y = 2^f 2^r with r = round(y), |f| <= 1/2: a polynomial for 2^f,
        # then r added to its exponent bits (exact while 2^y stays normal).
        y = offset + scale * (m * m)
        r = np.floor(y + half)
        f = y - r
        power[j] = ((((((c7 * f + c6) * f + c5) * f + c4) * f + c3) * f + c2) * f + c1) * f + one
        exponent[j] = np.int32(r) << 23
        if keep_clipped:
            row[j] = _clipped(x, a)
    for j in range(w):
        power_bits[j] += exponent[j]
    if beyond_cubic:  # rare: some |tau_i sum tau| >= 1/64 takes the exact tanh
        for j in range(w):
            c = product[j]
            q = c * c
            t = c * (one + q * third) if q < cubic_limit else np.float32(math.tanh(c))
            power[j] = t * power[j]
    else:
        for j in range(w):
            c = product[j]
            power[j] = c * (one + (c * c) * third) * power[j]
    for j in range(w):
        out[j] = power[j]
        b = power_bits[j]
        key = max(key, b ^ ((b >> 31) & SIGN_FLIP))
    return key


@njit(inline="always")
def _combine_row(
    values, kept, w, from_scores, threshold, span, coefficient, numerator, denominator
):
    """Step 10's sums, one more row: W from B (``from_scores``) or stored, T~ in ``values``."""
    for j in range(w):
        weight = _weight(kept[j], threshold, span) if from_scores else kept[j]
        denominator[j] += weight
        numerator[j] += coefficient * (values[j] * weight)


@njit(nogil=True, cache=True, boundscheck=False)
def finish(numerator, denominator, out):
    """Step 10's quotient: sum_i lambda_i W_i T~_i / max(sum_i W_i, 1e-12)."""
    floor = np.float32(1e-12)
    for j in range(out.shape[0]):
        out[j] = numerator[j] / max(denominator[j], floor)


@njit(inline="always")
def _output(base, base_shift, first, w, merged, scale, out, to_bf16, scratch):
    """Step 11 on w columns: base + scale * m in float32, then rounded to nearest even
    into bf16 (``to_bf16``: int16 ``out``, as torch casts) or stored (int32 ``out``)."""
    base_bits, sums_bits = scratch[0], scratch[1]
    _load(base, base_shift, first, w, base_bits)
    base_values = base_bits.view(np.float32)
    sums = sums_bits.view(np.float32)
    for j in range(w):
        sums[j] = base_values[j] + scale * merged[j]
    target = out[first : first + w]
    if to_bf16:
        for j in range(w):
            b = sums_bits[j]
            target[j] = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    else:
        for j in range(w):
            target[j] = sums_bits[j]


@njit(nogil=True, cache=True, boundscheck=False)
def add_scaled(base, base_shift, merged, scale, start, stop, out, to_bf16):
    """Step 11 on columns [start, stop) of a stored m (see _output)."""
    scratch = np.empty((2, _BLOCK), np.int32)
    for first in range(start, stop, _BLOCK):
        w = min(first + _BLOCK, stop) - first
        _output(base, base_shift, first, w, merged[first : first + w], scale, out, to_bf16, scratch)


@njit(nogil=True, cache=True, boundscheck=False)
def finish_output(numerator, denominator, base, base_shift, start, stop, scale, out, to_bf16):
    """Steps 10 (the quotient, as finish) and 11 (as add_scaled) on columns [start, stop),
    the sums indexed from start: m is never stored."""
    scratch = np.empty((2, _BLOCK), np.int32)
    merged = np.empty(_BLOCK, np.float32)
    for first in range(start, stop, _BLOCK):
        w = min(first + _BLOCK, stop) - first
        finish(
            numerator[first - start : first - start + w],
            denominator[first - start : first - start + w],
            merged[:w],
        )
        _output(base, base_shift, first, w, merged, scale, out, to_bf16, scratch)


@njit(nogil=True, cache=True, boundscheck=False)
def scores(tau, score, start, stop, low, high, span, scale, top_keys):
    """Steps 3-8 on columns [start, stop) of a stored n x d ``tau`` (T~ written over it,
    B into ``score``), the column sums of tau added in row order; ``top_keys``: each
    row's max B so far (see _score_row)."""
    n = tau.shape[0]
    column_total = np.empty(_BLOCK, np.float32)
    work = np.empty((3, _BLOCK), np.float32)
    for first in range(start, stop, _BLOCK):
        last = min(first + _BLOCK, stop)
        w = last - first
        column_total[:w] = tau[0, first:last]
        for i in range(1, n):
            row = tau[i, first:last]
            for j in range(w):
                column_total[j] += row[j]
        for i in range(n):
            top_keys[i] = _score_row(
                tau[i, first:last],
                column_total,
                w,
                low[i],
                high[i],
                span[i],
                scale,
                score[i, first:last],
                top_keys[i],
                work,
                True,
            )


@njit(nogil=True, cache=True, boundscheck=False)
def combine(clipped, source, from_scores, start, stop, threshold, span, coefficients, out):
    """Steps 9-10 on columns [start, stop) of stored T~ and B (``from_scores``) or W."""
    numerator = np.empty(_BLOCK, np.float32)
    denominator = np.empty(_BLOCK, np.float32)
    for first in range(start, stop, _BLOCK):
        last = min(first + _BLOCK, stop)
        w = last - first
        numerator[:w] = 0
        denominator[:w] = 0
        for i in range(clipped.shape[0]):
            _combine_row(
                clipped[i, first:last],
                source[i, first:last],
                w,
                from_scores,
                threshold[i],
                span[i],
                coefficients[i],
                numerator,
                denominator,
            )
        finish(numerator[:w], denominator[:w], out[first:last])


@njit(nogil=True, cache=True, boundscheck=False)
def drop(score, start, stop, threshold, span, out):
    """Step 9 on columns [start, stop): W as _combine_row makes it."""
    for i in range(score.shape[0]):
        t, width = threshold[i], span[i]
        values = score[i, start:stop]
        weights = out[i, start:stop]
        for j in range(stop - start):
            weights[j] = _weight(values[j], t, width)


@njit(nogil=True, cache=True, boundscheck=False)
def statistics_row(source, start, stop, minima, maxima):
    """One model's min and max |tau| of each _STAT_BLOCK-column block in [start, stop)
    (start a multiple of it; a short tail is its own block) into the int32 views
    ``minima``/``maxima`` (indexed from column 0); returns the largest |tau|'s pattern
    (>= 0x7F800000: some tau is not finite; 0: tau is all zero).

    All on the bit patterns: for |x| they ascend with the value, and integer min/max
    vectorize where float ones do not.
    """
    row = np.empty(_BLOCK, np.float32)
    bits = row.view(np.int32)
    scratch = np.empty((2, _BLOCK), np.int32)
    largest = np.int32(0)
    for first in range(start, stop, _BLOCK):
        w = min(first + _BLOCK, stop) - first
        _task_vector(source, first, w, row, scratch)
        for k in range(0, w, _STAT_BLOCK):
            low = np.int32(0x7FFFFFFF)
            high = np.int32(0)
            part = bits[k : min(k + _STAT_BLOCK, w)]
            for j in range(part.shape[0]):
                magnitude = part[j] & 0x7FFFFFFF
                low = min(low, magnitude)
                high = max(high, magnitude)
            minima[(first + k) // _STAT_BLOCK] = low
            maxima[(first + k) // _STAT_BLOCK] = high
            largest = max(largest, high)
    return largest


@njit(nogil=True, cache=True, boundscheck=False)
def total_row(source, start, stop, total, first_row):
    """Adds one model's tau on [start, stop) to the column sums ``total`` (indexed from
    start); the first model's is copied, so the sums add rows in order, as scores does."""
    row = np.empty(_BLOCK, np.float32)
    scratch = np.empty((2, _BLOCK), np.int32)
    for first in range(start, stop, _BLOCK):
        w = min(first + _BLOCK, stop) - first
        _task_vector(source, first, w, row, scratch)
        sums = total[first - start : first - start + w]
        if first_row:
            sums[:] = row[:w]
        else:
            for j in range(w):
                sums[j] += row[j]


@njit(nogil=True, cache=True, boundscheck=False)
def score_row(source, start, stop, total, low, high, span, scale, out, key, sample, stride):
    """One model's B on [start, stop) from its input (``total`` from total_row) into
    ``out`` (its row of scores); returns ``key`` raised to its max (see _score_row).
    With a ``stride``, the top 16 bits (as 0..65535, integer order) of B at every
    column that is a multiple of it go to ``sample`` at column // stride, as
    selection.RowSelection samples them."""
    out_bits = out.view(np.int32)
    row = np.empty(_BLOCK, np.float32)
    scratch = np.empty((2, _BLOCK), np.int32)
    work = np.empty((3, _BLOCK), np.float32)
    for first in range(start, stop, _BLOCK):
        last = min(first + _BLOCK, stop)
        w = last - first
        _task_vector(source, first, w, row, scratch)
        key = _score_row(
            row,
            total[first - start : last - start],
            w,
            low,
            high,
            span,
            scale,
            out[first:last],
            key,
            work,
            False,  # the streamed path never reads T~ back: no need to write it
        )
        if stride:
            for column in range(-(-first // stride) * stride, last, stride):
                sample[column // stride] = (out_bits[column] >> 16) + (1 << 15)
    return key


@njit(nogil=True, cache=True, boundscheck=False)
def combine_row(
    source, start, stop, low, high, score, threshold, span, coefficient, numerator, denominator
):
    """Adds one model's share of step 10's sums on [start, stop) (indexed from start),
    T~ made from its input, W from its row of B."""
    row = np.empty(_BLOCK, np.float32)
    scratch = np.empty((2, _BLOCK), np.int32)
    for first in range(start, stop, _BLOCK):
        last = min(first + _BLOCK, stop)
        w = last - first
        _task_vector(source, first, w, row, scratch)
        for j in range(w):
            x = row[j]
            row[j] = _clipped(x, min(max(abs(x), low), high))
        _combine_row(
            row,
            score[first:last],
            w,
            True,
            threshold,
            span,
            coefficient,
            numerator[first - start : last - start],
            denominator[first - start : last - start],
        )


@njit(nogil=True, cache=True, boundscheck=False)
def window_counts(bits, low, high, counts):
    """Counts of ``bits`` below, at each pattern of, and above [low, high].

    The window holds a few percent of a row (more with ties, common for bf16
    models), at random places: a branch per element mispredicts, so each block's
    in-window offsets are first compacted without branches, then counted.
    """
    below = 0
    above = 0
    for i in range(bits.shape[0]):
        b = bits[i]
        below += b < low
        above += b > high
    low = np.int64(low)
    span = np.uint64(np.int64(high) - low)
    offsets = np.empty(_BLOCK * 8, np.uint64)
    for first in range(0, bits.shape[0], offsets.shape[0]):
        found = 0
        for i in range(first, min(first + offsets.shape[0], bits.shape[0])):
            offset = np.uint64(np.int64(bits[i]) - low)  # below the window: wraps past span
            offsets[found] = offset
            found += offset <= span
        for k in range(found):
            counts[offsets[k] + 1] += 1
    counts[0] += below
    counts[-1] += above


# rank_patterns: rows up to this many elements are sorted whole; longer ones are
# counted in 2^_RANK_BITS bins of their order keys' top bits, then the bins holding a
# rank are counted again by the remaining low bits (exact: the two parts are all 32).
_RANK_SORT_ROW = 1 << 16
_RANK_BITS = 20


@njit(inline="always")
def _order_key(b):
    """A float32 pattern's signed-integer key in float order (-0.0 just below +0.0, as
    radix selection orders them); the map is its own inverse."""
    return b ^ ((b >> 31) & SIGN_FLIP)


@njit(nogil=True, cache=True, boundscheck=False)
def rank_patterns(bits, ranks, out):
    """``sorted(row)[k]`` for every k of ``ranks`` (ascending, in [0, d)) as float32 bit
    patterns into ``out``; ``bits`` is the row's int32 view (d < 2^31).

    Two reads of a long row, whatever the data: one histogram of the keys' top
    _RANK_BITS bits, which places every rank in a bin; then one histogram of the low
    bits of the elements in those bins only (a slot per needed bin; every other bin
    counts into slot 0, which keeps the loop free of branches), which places it on
    one key. Ties (e.g. the zero scores of unchanged entries) cost nothing extra.
    """
    d = bits.shape[0]
    m = ranks.shape[0]
    if d <= _RANK_SORT_ROW:
        keys = np.empty(d, np.int32)
        for j in range(d):
            keys[j] = _order_key(bits[j])
        keys.sort()
        for r in range(m):
            out[r] = _order_key(keys[ranks[r]])
        return
    low_bits = 32 - _RANK_BITS
    low_mask = (1 << low_bits) - 1
    offset = np.int64(1) << 31  # signed key -> 0 .. 2^32 - 1, in the same order
    counts = np.zeros(1 << _RANK_BITS, np.int32)
    for j in range(d):
        counts[(np.int64(_order_key(bits[j])) + offset) >> low_bits] += 1
    # Each rank's bin and the elements below that bin (ranks ascend: one walk).
    rank_bin = np.empty(m, np.int64)
    below = np.empty(m, np.int64)
    cumulative = np.int64(0)
    position = 0
    for r in range(m):
        while cumulative + counts[position] <= ranks[r]:
            cumulative += counts[position]
            position += 1
        rank_bin[r] = position
        below[r] = cumulative
    slot = np.zeros(1 << _RANK_BITS, np.int32)
    slots = 0
    for r in range(m):
        if slot[rank_bin[r]] == 0:
            slots += 1
            slot[rank_bin[r]] = slots
    low_counts = np.zeros((slots + 1, 1 << low_bits), np.int32)
    for j in range(d):
        u = np.int64(_order_key(bits[j])) + offset
        low_counts[slot[u >> low_bits], u & low_mask] += 1
    for r in range(m):
        row = low_counts[slot[rank_bin[r]]]
        rest = ranks[r] - below[r]
        low = 0
        while rest >= row[low]:
            rest -= row[low]
            low += 1
        out[r] = _order_key(np.int32(((rank_bin[r] << low_bits) | low) - offset))


# ---------------------------------------------------------------- lambda: auto's sums


@njit(inline="always")
def _add_weighted(row, w, weight, total, energy):
    """total += weight * row (float64, per column) over w columns; returns ``energy``
    plus the (weight * row)^2, added column by column (the same order however the
    columns are blocked)."""
    for j in range(w):
        x = np.float64(row[j]) * weight
        total[j] += x
        energy += x * x
    return energy


@njit(nogil=True, cache=True, boundscheck=False)
def weighted_row(row, weight, total):
    """One stored float32 tau row's share of s and E (see auto_scale), whole slice."""
    return _add_weighted(row, row.shape[0], weight, total, 0.0)


@njit(nogil=True, cache=True, boundscheck=False)
def weighted_input_row(source, start, stop, weight, total):
    """As weighted_row, with tau made from the inputs as the other ``*_row`` loops do."""
    row = np.empty(_BLOCK, np.float32)
    scratch = np.empty((2, _BLOCK), np.int32)
    energy = 0.0
    for first in range(start, stop, _BLOCK):
        w = min(first + _BLOCK, stop) - first
        _task_vector(source, first, w, row, scratch)
        energy = _add_weighted(row, w, weight, total[first - start : first - start + w], energy)
    return energy


@njit(nogil=True, cache=True, boundscheck=False)
def auto_dots(merged, total):
    """(<m, s>, |m|^2, |s|^2) of float32 vectors, in float64, column by column."""
    ms = mm = ss = 0.0
    for j in range(merged.shape[0]):
        m = np.float64(merged[j])
        s = np.float64(total[j])
        ms += m * s
        mm += m * m
        ss += s * s
    return ms, mm, ss
