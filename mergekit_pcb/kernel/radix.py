"""Exact order statistics by radix selection over float bit patterns.

Why not ``torch.kthvalue``/``topk``: both need the whole row in memory, and on CPU
they cost many passes' worth of time. Radix selection only counts 16-bit digits
of the float's bit pattern (``bincount``), so it finds the exact ``sorted(x)[k]``
in a fixed number of passes (2 for float32, 4 for float64) whose cost does not
depend on the data (no gathers of variable size, e.g. of millions of zeros) and,
crucially for ``pcb_scope: model``, the passes can stream over data that arrives
tensor by tensor: the state between passes is one 65536-bin histogram per rank.

Ordering: read as signed integers, the bit patterns of non-negative floats
ascend with the value and sort above every negative float's; negative floats'
patterns ascend with the *magnitude*. So the search runs in integer order and
only the requested rank is translated: with N negative values (including -0.0),
value rank k < N is integer rank N-1-k. -0.0 and +0.0 compare equal, so the
selected value is numerically the same as a sort's. NaN is not supported;
callers reject non-finite data first.

Each pass after the first histograms one 16-bit digit below the fixed prefix:
``clamp(bits, lo, hi) - lo`` maps elements outside the prefix's range onto the
first or last bin, whose known counts are then subtracted. No pass allocates
more than one integer buffer the size of its input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mergekit_pcb.kernel import bindings, runtime
from mergekit_pcb.kernel.runtime import Role

DIGIT_BITS = 16
_RADIX = 1 << DIGIT_BITS
_HALF = _RADIX // 2
_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}


def key_bits(dtype: torch.dtype) -> int:
    if dtype not in _INT_OF:
        raise TypeError(f"radix selection supports float32 and float64, not {dtype}")
    return torch.finfo(dtype).bits


def _as_bits(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).view(_INT_OF[x.dtype])


def _top_digits(bits: torch.Tensor, width: int, out: torch.Tensor) -> torch.Tensor:
    """The top 16 bits (signed, shifted to 0..65535) into ``out``: integer order."""
    return torch.bitwise_right_shift(bits, width - DIGIT_BITS, out=out).add_(_HALF)


def digit_counts(digits: torch.Tensor) -> np.ndarray:
    """Counts of each top digit made by :func:`_top_digits` or :func:`top_digits`."""
    return _host(torch.bincount(digits.reshape(-1), minlength=_RADIX))


def _digit_histogram(
    bits: torch.Tensor, prefix: int, level: int, width: int, buffer: torch.Tensor
) -> torch.Tensor:
    """Counts of digit ``level`` among elements whose higher digits equal ``prefix``.

    Elements below (above) the prefix's range land in bin 0 (the last bin); the
    caller subtracts their known counts.
    """
    span = width - DIGIT_BITS * level
    low = prefix << span
    digits = torch.clamp(bits, low, low + (1 << span) - 1, out=buffer).sub_(low)
    if span > DIGIT_BITS:
        digits = digits.bitwise_right_shift_(span - DIGIT_BITS)
    return torch.bincount(digits, minlength=_RADIX)


def _pick(counts: np.ndarray, rank: int) -> tuple[int, int, int]:
    """(digit holding the rank-th element, count in lower digits, count in higher digits).

    Histogram bookkeeping runs in numpy: 65536-bin torch ops are each too small to
    gain from threads, and on a busy machine every threaded op pays for a barrier.
    """
    cumulative = np.cumsum(counts)
    digit = int(np.searchsorted(cumulative, rank, side="right"))
    below = int(cumulative[digit - 1]) if digit else 0
    return digit, below, int(cumulative[-1]) - int(cumulative[digit])


def _host(counts: torch.Tensor) -> np.ndarray:
    return counts.to(device="cpu", dtype=torch.int64).numpy()


def _integer_rank(rank: int, negatives: int) -> int:
    """Value-order rank -> integer-order rank (negative floats' patterns run backwards)."""
    return negatives - 1 - rank if rank < negatives else rank


def _to_float(bits: int, dtype: torch.dtype) -> float:
    return torch.tensor([bits], dtype=_INT_OF[dtype]).view(dtype).item()


@dataclass
class _Search:
    """One rank's progress: the fixed high digits and what lies outside them."""

    rank: int  # remaining rank inside the prefix's range
    prefix: int = 0  # signed value of the digits fixed so far
    below: int = 0  # elements whose integer key is below the prefix's range
    above: int = 0

    def narrow(self, counts: np.ndarray) -> None:
        counts = counts.copy()
        counts[0] -= self.below
        counts[-1] -= self.above
        digit, below, above = _pick(counts, self.rank)
        self.prefix = (self.prefix << DIGIT_BITS) + digit
        self.rank -= below
        self.below += below
        self.above += above


def _start(counts: np.ndarray, rank: int, total: int) -> _Search:
    """The search after the top-digit pass, for value-order ``rank``."""
    if not 0 <= rank < total:
        raise IndexError(f"order statistic {rank} out of range for {total} elements")
    rank = _integer_rank(rank, int(counts[:_HALF].sum()))
    digit, below, above = _pick(counts, rank)
    return _Search(rank - below, digit - _HALF, below, above)


def top_digits(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of x's elements as 0..65535 in integer order, into int32 ``out``
    (x float32, of any shape and strides)."""
    return _top_digits(x.view(_INT_OF[x.dtype]), key_bits(x.dtype), out)


def sample_window(
    counts: np.ndarray, sampled: int, rank: int, total: int, sigmas: float, max_digits: int
) -> tuple[int, int] | None:
    """Bit patterns [low, high] that hold ``sorted(row)[rank]`` unless the sample misled.

    ``counts`` are :func:`digit_counts` of ``sampled`` elements drawn evenly from
    a row of ``total``; the range spans the top digits of the sample's order
    statistics ``sigmas`` binomial standard deviations either side of the rank's
    share. None where that range reaches negative values (whose patterns run
    backwards) or spans more than ``max_digits`` top digits. The caller checks the
    full row's counts, so a sample that misled costs time, never exactness.
    """
    if sampled == 0:
        return None
    share = rank / total
    margin = sigmas * math.sqrt(sampled * share * (1 - share)) + 2
    first = max(0, math.floor(rank * sampled / total - margin))
    last = min(sampled - 1, math.ceil(rank * sampled / total + margin))
    low_digit, high_digit = _pick(counts, first)[0], _pick(counts, last)[0]
    if low_digit < _HALF or high_digit - low_digit >= max_digits or high_digit >= _RADIX - 1:
        return None
    return (low_digit - _HALF) << DIGIT_BITS, ((high_digit - _HALF + 1) << DIGIT_BITS) - 1


def window_counts(x: torch.Tensor, window: tuple[int, int]) -> np.ndarray:
    """Histogram of x's bit patterns in ``window``: bin 0 counts those below it, bin
    1 + j the pattern low + j, the last bin those above."""
    low, high = window
    bits = _as_bits(x)
    if bindings.enabled and bits.device.type == "cpu":
        return bindings.window_counts(bits, low, high)
    buffer = runtime.buffer(Role.RADIX_DIGITS, bits.numel(), bits.dtype, bits.device)
    digits = torch.clamp(bits, low - 1, high + 1, out=buffer).sub_(low - 1)
    return _host(torch.bincount(digits, minlength=high - low + 3))


def pick_in_window(
    counts: np.ndarray, rank: int, window: tuple[int, int], dtype: torch.dtype
) -> float | None:
    """``sorted(row)[rank]`` from the row's :func:`window_counts`; None if it lies outside.

    Below the window lie every negative value and -0.0 (the window starts at +0.0
    or above), so value order and pattern order agree from there on.
    """
    digit = _pick(counts, rank)[0]  # bin 0 and the last bin lie outside the window
    return _to_float(window[0] + digit - 1, dtype) if 0 < digit < len(counts) - 1 else None


@dataclass
class StreamingSelector:
    """Exact order statistics of one long virtual row that arrives in chunks.

    Call :meth:`feed` with every chunk of the row, then :meth:`advance`; repeat
    until :attr:`done` (2 passes for float32, 4 for float64; the chunks must be
    the same in every pass, in any order), then read :meth:`values`. Memory is
    one histogram per rank, never the row. ``ranks`` may be a function of the
    row's length, which is known only after the first pass.
    """

    dtype: torch.dtype
    ranks: Sequence[int] | Callable[[int], Sequence[int]]
    level: int = 0
    total: int = 0
    _searches: list = field(default_factory=list)
    _counts: dict = field(default_factory=dict)

    def __post_init__(self):
        self._width = key_bits(self.dtype)

    @property
    def passes(self) -> int:
        return self._width // DIGIT_BITS

    @property
    def done(self) -> bool:
        return self.level >= self.passes

    def feed(self, chunk: torch.Tensor) -> None:
        self.add(self.count(chunk))

    def count(self, chunk: torch.Tensor) -> dict:
        """This pass's histograms of one chunk; reads no state that :meth:`add` writes,
        so threads may count chunks concurrently and add them one at a time."""
        if self.done:
            raise RuntimeError("all passes are already done")
        if chunk.dtype != self.dtype:
            raise TypeError(f"chunk dtype {chunk.dtype} != selector dtype {self.dtype}")
        bits = _as_bits(chunk)
        # Reused per thread: a fresh chunk-sized buffer per row and pass page-faulted or
        # fragmented the heap (see mergekit_pcb.kernel.runtime).
        buffer = runtime.buffer(Role.RADIX_DIGITS, bits.numel(), bits.dtype, bits.device)
        if self.level == 0:
            return {None: (bits.numel(), digit_counts(_top_digits(bits, self._width, buffer)))}
        return {
            prefix: (0, _host(_digit_histogram(bits, prefix, self.level, self._width, buffer)))
            for prefix in {search.prefix for search in self._searches}
        }

    def add(self, counted: dict) -> None:
        for key, (elements, counts) in counted.items():
            self.total += elements
            if key in self._counts:
                self._counts[key] += counts
            else:
                self._counts[key] = counts

    def advance(self) -> None:
        """Fix one more digit of every rank from the histograms of this pass."""
        if self.level == 0:
            counts = self._counts.get(None, np.zeros(_RADIX, dtype=np.int64))
            ranks = self.ranks(self.total) if callable(self.ranks) else self.ranks
            self._searches = [_start(counts, int(rank), self.total) for rank in ranks]
        else:
            for search in self._searches:
                search.narrow(self._counts[search.prefix])
        self._counts = {}
        self.level += 1

    def values(self) -> list:
        if not self.done:
            raise RuntimeError(f"{self.passes - self.level} pass(es) still to run")
        return [_to_float(search.prefix, self.dtype) for search in self._searches]
