"""Exact row-wise order statistics of an n x d matrix that is read in column chunks.

Why chunks: the merge is bound by memory traffic, not arithmetic. The kernel
computes |tau| and the scores chunk by chunk in cache, and selection consumes the
same chunks while they are there instead of making its own passes over memory
(a whole-row radix pass reads and writes 32-bit digit copies: 5x the traffic).
Two exact strategies, chosen per rank:

* **Extreme ranks** (the clip quantiles: the k-th smallest or largest with small k)
  use block extremes: with the rows cut into blocks of ``BLOCK`` columns, one cheap
  ``amin``/``amax`` per block, a ``topk`` over those and a gather of at most k
  blocks give the exact answer (see :func:`_from_blocks`) for a fraction of one
  pass, where radix selection needs two histogram passes per rank.
* **Other ranks** (the drop cut) use streamed radix selection
  (:class:`mergekit_pcb.kernel.radix.StreamingSelector`): its first histogram pass
  is fed by the chunks as they are made, the second reads them back once. A lone
  such rank of a long float32 row (the keep cut) instead stores the top digits of
  every fifth column as the chunks pass; they choose a window of bit patterns
  that the one read-back counts exactly, and only if the rank falls outside it
  do the two full passes run.

All are exact for any data, ties and signed zeros included.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from mergekit_pcb.kernel import radix, runtime
from mergekit_pcb.kernel.radix import StreamingSelector
from mergekit_pcb.kernel.runtime import BLOCK, Role, column_chunks

# The radix passes after the first re-read the chunks this many at a time: every
# histogram costs a fixed 65536-bin allocation and merge, which wider reads amortize
# (the counts are exact integers, so the grouping cannot change a result).
_REREAD_FACTOR = 4
# A single radix rank of a long float32 row (the keep cut) replaces its first pass by
# a sample: the top digits of every column whose index is a multiple of the stride
# (odd, so that no power-of-two layout of a weight matrix lines up with it; at least
# _SAMPLE_STRIDE, more for rows past _SAMPLE_MAX slots) are stored while the chunks
# pass, and counted once. The sample picks a window of at most _WINDOW_DIGITS top
# digits (65536 patterns each) that the one re-read counts pattern by pattern. On
# the benchmark's tensors the window held the rank every time and spanned 1-2
# digits; a miss costs the full radix passes, never exactness.
_SAMPLE_STRIDE = 5
_SAMPLE_MAX = 1 << 20
_SAMPLE_MIN_COLUMNS = 1 << 16
_WINDOW_SIGMAS = 4.5
_WINDOW_DIGITS = 8
# A rank counts as extreme while its <= k candidate blocks cover <= 1/16 of the row.
_EXTREME_SHARE = 16

# Row i's values at the given column indices (the values the chunks hold there).
ValuesAt = Callable[[int, torch.Tensor], torch.Tensor]


def is_extreme(rank: int, d: int) -> bool:
    """Whether ``sorted(row)[rank]`` of a row of d is found from block extremes."""
    return _is_extreme(rank, d) is not None


def _is_extreme(rank: int, d: int) -> str | None:
    if (rank + 1) * BLOCK * _EXTREME_SHARE <= d:
        return "low"
    if (d - rank) * BLOCK * _EXTREME_SHARE <= d:
        return "high"
    return None


class RowSelection:
    """``sorted(row_i)[k]`` for every row i and every k in ``ranks``, from chunks.

    Feed every column chunk once with :meth:`feed` (any order, any thread), then
    call :meth:`finish`, which may read each chunk once more and gather the values
    of a few columns. Chunks must start at multiples of BLOCK.
    """

    def __init__(self, n: int, d: int, dtype: torch.dtype, ranks: Sequence[int]):
        for k in ranks:
            if not 0 <= k < d:
                raise IndexError(f"order statistic {k} out of range for {d} elements")
        self.n, self.d, self.dtype, self.ranks = n, d, dtype, [int(k) for k in ranks]
        self._kinds = [_is_extreme(k, d) for k in self.ranks]
        self._radix_ranks = [k for k, kind in zip(self.ranks, self._kinds, strict=True) if not kind]
        self._selectors = [StreamingSelector(dtype, self._radix_ranks) for _ in range(n)]
        self._sampled = (
            dtype == torch.float32 and len(self._radix_ranks) == 1 and d >= _SAMPLE_MIN_COLUMNS
        )
        self._stride = max(_SAMPLE_STRIDE, -(-d // _SAMPLE_MAX)) | 1
        self._sample: torch.Tensor | None = None  # n x slots top digits, made on first feed
        self._lock = threading.Lock()
        # Block extremes of each fed chunk, by its first column.
        self._minima: dict[int, torch.Tensor | None] = {}
        self._maxima: dict[int, torch.Tensor | None] = {}

    def feed(self, columns: slice, chunk: torch.Tensor) -> None:
        """One n x w chunk of the first pass (thread-safe; the work runs unlocked).
        Nothing to do off the CPU: :meth:`finish` selects from the whole matrix there."""
        if runtime.gpu_style(chunk.device):
            return
        if columns.start % BLOCK:
            raise ValueError(f"chunk {columns} does not start at a block boundary")
        low = _block_reduce(chunk, torch.amin) if "low" in self._kinds else None
        high = _block_reduce(chunk, torch.amax) if "high" in self._kinds else None
        if self._sampled:
            self._store_sample(columns, chunk)
        else:
            counted = self._count(chunk)
        with self._lock:
            self._minima[columns.start] = low
            self._maxima[columns.start] = high
            if not self._sampled:
                self._add(counted)

    def feed_blocks(self, columns: slice, minima: torch.Tensor, maxima: torch.Tensor) -> None:
        """Instead of :meth:`feed`: the chunk's per-row extremes of every BLOCK columns
        (n x blocks, a short tail its own block), made elsewhere (e.g. by the compiled
        loops straight from a merge's inputs). Only where every rank is extreme."""
        if self._radix_ranks:
            raise ValueError(f"ranks {self._radix_ranks} are not extreme: they need feed()")
        with self._lock:
            self._minima[columns.start] = minima if "low" in self._kinds else None
            self._maxima[columns.start] = maxima if "high" in self._kinds else None

    def finish_stored(
        self, x: torch.Tensor, columns: Sequence[slice] | None = None
    ) -> torch.Tensor:
        """:meth:`finish` when the chunks fed were ``columns`` (default: the device's
        chunks) of a stored n x d matrix ``x`` (e.g. the scores B), read again from it."""
        if columns is None:
            columns = column_chunks(self.n, self.d, device=x.device)
        return self.finish(
            columns, lambda cols: x[:, cols], lambda i, c: x[i].index_select(0, c), x.device
        )

    def finish(
        self,
        columns: Sequence[slice],
        chunk_at: Callable[[slice], torch.Tensor],
        values_at: ValuesAt,
        device: torch.device,
    ) -> torch.Tensor:
        """The n x len(ranks) statistics (on the CPU, or on ``device`` if that is a GPU).
        Radix ranks read ``chunk_at`` once more for every chunk in ``columns``; extreme
        ranks gather ``values_at``. On a GPU ``chunk_at`` gives the whole matrix once."""
        if runtime.gpu_style(device):
            return _select_on_device(chunk_at(slice(0, self.d)), self.ranks)
        out = [[0.0] * len(self.ranks) for _ in range(self.n)]
        extremes = {
            kind: torch.cat([parts[k] for k in sorted(parts)], dim=1)
            for kind, parts in (("low", self._minima), ("high", self._maxima))
            if kind in self._kinds
        }
        # On the calling thread: in the pool, these small allocations stayed in the
        # threads' malloc arenas and raised the merge's peak memory.
        for j, (rank, kind) in enumerate(zip(self.ranks, self._kinds, strict=True)):
            if kind is not None:
                largest = kind == "high"
                k = self.d - 1 - rank if largest else rank  # 0-based, counted from that end
                # The (k+1)-th extreme block of every row in one op: the costliest step.
                bounds = extremes[kind].topk(k + 1, dim=1, largest=largest).values[:, -1]
                for i in range(self.n):
                    out[i][j] = _from_blocks(
                        extremes[kind][i], bounds[i], k, largest, self.d, i, values_at
                    )
        if self._radix_ranks:
            columns = _coarser(columns, _REREAD_FACTOR)
            values = self._from_window(columns, chunk_at, device) if self._sampled else None
            if values is None:
                if self._sampled:  # the sample's window missed: the first pass, in full
                    self._reread(columns, chunk_at, device)
                values = self._from_radix(columns, chunk_at, device)
            for i, row_values in enumerate(values):
                by_rank = dict(zip(self._radix_ranks, row_values, strict=True))
                for j, k in enumerate(self.ranks):
                    if k in by_rank:
                        out[i][j] = by_rank[k]
        return torch.tensor(out, dtype=self.dtype)

    def _reread(self, columns, chunk_at, device) -> None:
        """One radix pass over every chunk at the selectors' current digit."""

        def count(cols: slice) -> None:
            counted = self._count(chunk_at(cols))
            with self._lock:  # add at once: each chunk's histograms are 0.5 MB a row
                self._add(counted)

        runtime.map_chunks(count, list(columns), device)

    def _from_radix(self, columns, chunk_at, device) -> list[list[float]]:
        """The radix ranks by full radix selection, the first pass already counted."""
        for selector in self._selectors:
            selector.advance()
        while not self._selectors[0].done:
            self._reread(columns, chunk_at, device)
            for selector in self._selectors:
                selector.advance()
        return [selector.values() for selector in self._selectors]

    def sample_rows(self, device: torch.device) -> tuple[torch.Tensor, int] | None:
        """Where the sample goes (n x slots int32: the top digits of every stride-th
        column, at column // stride) and the stride; None if this selection takes no
        sample. A producer that writes every chunk's sample there itself need not
        :meth:`feed` the chunks (e.g. the compiled loops of :mod:`.streamed`)."""
        if not self._sampled:
            return None
        with self._lock:
            if self._sample is None:  # reused between merges; a clash costs a miss at most
                slots = -(-self.d // self._stride)
                self._sample = runtime.buffer(
                    Role.CUT_SAMPLE, self.n * slots, torch.int32, device
                ).view(self.n, slots)
        return self._sample, self._stride

    def _store_sample(self, columns: slice, chunk: torch.Tensor) -> None:
        """The top digits of this chunk's sampled columns, into their slots (disjoint per
        chunk, so no lock is held while they are written)."""
        self.sample_rows(chunk.device)
        first = -(-columns.start // self._stride) * self._stride
        if first >= columns.stop:
            return
        picked = chunk[:, first - columns.start :: self._stride]
        slot = first // self._stride
        radix.top_digits(picked, out=self._sample[:, slot : slot + picked.shape[1]])

    def _from_window(self, columns, chunk_at, device) -> list[list[float]] | None:
        """The one radix rank from the sampled first pass and one re-read; None on a miss."""
        (rank,) = self._radix_ranks
        if self._sample is None:
            return None
        windows = [
            radix.sample_window(
                radix.digit_counts(row), len(row), rank, self.d, _WINDOW_SIGMAS, _WINDOW_DIGITS
            )
            for row in self._sample
        ]
        if None in windows:
            return None
        totals: list = [None] * self.n

        def count(cols: slice) -> None:
            chunk = chunk_at(cols)
            counted = [radix.window_counts(row, w) for row, w in zip(chunk, windows, strict=True)]
            with self._lock:
                for i, counts in enumerate(counted):
                    if totals[i] is None:
                        totals[i] = counts
                    else:
                        totals[i] += counts

        runtime.map_chunks(count, list(columns), device)
        picks = [
            radix.pick_in_window(counts, rank, window, self.dtype)
            for counts, window in zip(totals, windows, strict=True)
        ]
        return None if None in picks else [[value] for value in picks]

    def _count(self, chunk: torch.Tensor) -> list[dict]:
        if not self._radix_ranks:
            return []
        return [s.count(row) for row, s in zip(chunk, self._selectors, strict=True)]

    def _add(self, counted: list[dict]) -> None:
        for selector, counts in zip(self._selectors, counted, strict=False):
            selector.add(counts)


def _select_on_device(x: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """Row-wise ``sorted(x)[:, k]`` of a whole matrix on a GPU, with no host sync.

    Each rank is a ``topk`` from the nearer end of the row, unsorted (a multi-block
    radix selection on CUDA, where ``kthvalue`` runs one block per row), and the
    k-th value is the extreme of what it returns: exact, whatever the ties.
    """
    n, d = x.shape
    columns = []
    for rank in ranks:
        if rank + 1 <= d - rank:
            smallest = x.topk(rank + 1, dim=1, largest=False, sorted=False).values
            columns.append(smallest.amax(dim=1))
        else:
            largest = x.topk(d - rank, dim=1, largest=True, sorted=False).values
            columns.append(largest.amin(dim=1))
    return torch.stack(columns, dim=1)


def _block_reduce(chunk: torch.Tensor, reduce) -> torch.Tensor:
    """Per-row extremes of consecutive BLOCK-column blocks (a short tail is its own block)."""
    n, w = chunk.shape
    full = w - w % BLOCK
    parts = []
    if full:
        parts.append(reduce(chunk[:, :full].reshape(n, full // BLOCK, BLOCK), dim=2))
    if full < w:
        parts.append(reduce(chunk[:, full:], dim=1, keepdim=True))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _from_blocks(
    extremes: torch.Tensor,
    bound: torch.Tensor,
    k: int,
    largest: bool,
    d: int,
    row: int,
    values_at: ValuesAt,
) -> float:
    """The exact order statistic from block extremes (stated for the low end).

    With b (``bound``) the (k+1)-th smallest block minimum, k+1 elements are <= b,
    and every element < b lies in one of the <= k blocks whose minimum is < b. So
    if those blocks hold at least k+1 elements < b, the answer is the (k+1)-th
    smallest of them; otherwise it is b. Ties at b (a mostly-zero row) cost nothing.
    """
    beyond = extremes > bound if largest else extremes < bound
    blocks = torch.nonzero(beyond).flatten()
    if blocks.numel() == 0:
        return float(bound)
    columns = (blocks[:, None] * BLOCK + torch.arange(BLOCK, device=blocks.device)).flatten()
    values = values_at(row, columns[columns < d])
    values = values[values > bound] if largest else values[values < bound]
    if values.numel() <= k:
        return float(bound)
    return float(values.topk(k + 1, largest=largest).values[-1])


def _coarser(columns: Sequence[slice], factor: int) -> list[slice]:
    """Up to ``factor`` adjacent column ranges joined into one range each."""
    joined: list[slice] = []
    run = 0
    for cols in columns:
        if joined and run < factor and joined[-1].stop == cols.start:
            joined[-1] = slice(joined[-1].start, cols.stop)
            run += 1
        else:
            joined.append(cols)
            run = 1
    return joined


def order_statistics(x: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """Row-wise ``sorted(x)[:, k]`` (n x len(ranks)) of an in-memory matrix, never a full sort."""
    n, d = x.shape
    if x.dtype not in (torch.float32, torch.float64):
        for k in ranks:
            if not 0 <= k < d:
                raise IndexError(f"order statistic {k} out of range for {d} elements")
        return torch.stack([x.kthvalue(k + 1, dim=1).values for k in ranks], dim=1)
    columns = column_chunks(n, d, 1 << 20)
    selection = RowSelection(n, d, x.dtype, ranks)
    runtime.map_chunks(lambda cols: selection.feed(cols, x[:, cols]), columns, x.device)
    return selection.finish_stored(x, columns).to(x.device)


def row_maxima(per_chunk: dict[int, torch.Tensor]) -> torch.Tensor:
    """Each row's maximum from the chunks' row maxima, keyed by the chunk's first column:
    combined in column order whichever thread finished first."""
    return torch.stack([per_chunk[k] for k in sorted(per_chunk)], dim=1).amax(dim=1)
