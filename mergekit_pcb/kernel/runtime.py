"""The kernel's CPU runtime: column chunks, chunk-level threads, per-thread buffers.

Threads: inside the kernel (every entry point is :func:`owns_threads`) torch's own
intra-op threads are off. Each op runs on one cache-sized chunk, too small for them
to pay off, and their barrier after every op stalls the whole merge whenever a busy
machine deschedules one of them. Instead :func:`map_chunks` hands whole chunks to
the caller and helper threads, which take the next chunk as each finishes theirs:
a descheduled thread then holds up one chunk, not every op. How many threads share
a tensor follows its size and the thread budget (mergekit's ``-j``, torch's thread
count): one per :data:`MIN_CHUNKS_PER_THREAD` chunks, at most the budget. Results
do not depend on the number of threads: every chunk runs the same ops on the same
data, and what chunks share (extremes, histograms) is combined order-independently.

Buffers: a tensor's task vectors and scores are n x d float matrices. A fresh
allocation that large is served by ``mmap``, and every 4 KiB page then faults on
first touch; reusing one buffer per :class:`Role` and thread avoids that. Only
buffers up to :data:`MAX_BUFFER_BYTES` are kept (layer-sized tensors, merged by the
hundred): holding the embedding-sized ones would raise the merge's peak memory.
One role may keep more: the streamed path's stored B (:data:`MAX_STORED_SCORES_BYTES`),
which a merge fills and reads for every layer tensor of a 3B model and the attention
tensors of a 7B-8B one.
mergekit's executors merge one tensor per thread at a time, so a role's holder is
always done with it before the next tensor. On CUDA torch's caching allocator
already reuses memory, so a buffer there is a plain allocation.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

# A thread's least share of a tensor, in chunks (see the module).
MIN_CHUNKS_PER_THREAD = 2
MAX_BUFFER_BYTES = 64 << 20
# The stored B of :mod:`.streamed` is kept up to this (a 3B model's MLP: 302 MB; every
# tensor of Llama-3-70B but k/v recomputes B instead): one fixed cost per merge, where
# making B again in two more passes costs a 3B merge 16% of its time.
MAX_STORED_SCORES_BYTES = 512 << 20
CHUNK_ELEMENTS = 1 << 19  # elements of one chunk of an n x d matrix (all rows), on CPU
# On a GPU a chunk is a few large kernels, not a cache-sized piece: big enough that
# launches are few, small enough that a chunk's temporaries stay a fraction of tau.
GPU_CHUNK_ELEMENTS = 1 << 24
BLOCK = 64  # chunks start at multiples of this many columns (the selection's blocks)


# The GPU-style steps (large chunks, whole-matrix selection, no look at the data from
# the host) also run on CPU tensors when this is set: how the tests check them without
# a GPU.
GPU_STYLE_ON_CPU = False


def gpu_style(device: torch.device | str) -> bool:
    """Whether the steps on ``device`` run the GPU's way (see :data:`GPU_STYLE_ON_CPU`)."""
    return GPU_STYLE_ON_CPU or torch.device(device).type != "cpu"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other storage dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def column_chunks(
    n: int, d: int, elements: int | None = None, device: torch.device | str = "cpu"
) -> list[slice]:
    """Column ranges of about ``elements`` elements of n rows (default: CHUNK_ELEMENTS on
    CPU, GPU_CHUNK_ELEMENTS elsewhere), starting at multiples of BLOCK: every path on a
    device cuts a tensor into the same chunks, so sums add in the same order."""
    if elements is None:
        elements = GPU_CHUNK_ELEMENTS if gpu_style(device) else CHUNK_ELEMENTS
    width = elements // max(n, 1)
    width = max(BLOCK, width - width % BLOCK)
    return [slice(start, min(start + width, d)) for start in range(0, d, width)]


class Role(Enum):
    """What a reusable buffer holds; two live temporaries never share a role."""

    TASK_VECTORS = "task vectors"  # tau, n x d
    TASK_VECTORS_BASE = "task vectors base"  # a chunk of the base in the compute dtype
    SCORES = "scores"  # B, n x d
    STORED_SCORES = "stored scores"  # B, n x d, of the streamed path (kept larger)
    MAGNITUDE = "|tau|"  # a chunk of |tau|; also tanh's square before that
    COLUMN_TOTAL = "column total"  # a chunk's sum of tau over the models
    POLYNOMIAL = "tanh polynomial"
    DENOMINATOR = "denominator"  # a chunk's sum of W
    PRODUCTS = "products"  # W * T~ of a chunk
    WEIGHTS = "W"  # a chunk of W
    OUTPUT = "output"  # base + lambda * m of a chunk, before the cast
    CUT_SAMPLE = "cut sample"  # the keep cut's sampled top digits
    RADIX_DIGITS = "radix digits"
    STREAMED_TOTAL = "streamed total"  # the streamed path's column sums
    STREAMED_NUMERATOR = "streamed numerator"
    STREAMED_DENOMINATOR = "streamed denominator"
    STREAMED_MERGED = "streamed m"  # m of one chunk (lambda: auto, pcb_ratio: auto)
    CHUNK_TAU = "chunk tau"  # tau of one chunk (merges with known cuts)
    CHUNK_SCORES = "chunk scores"  # B of one chunk (merges with known cuts)


# Scratch of one chunk's width: step 10's numerator and denominator, and m.
CHUNK_SUMS = (Role.STREAMED_NUMERATOR, Role.STREAMED_DENOMINATOR, Role.STREAMED_MERGED)

_local = threading.local()


def buffer(role: Role, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat tensor of ``numel`` elements, reused by every call with the same role on
    this thread. The contents are garbage; the previous holder must be done with it."""
    kept = MAX_STORED_SCORES_BYTES if role is Role.STORED_SCORES else MAX_BUFFER_BYTES
    too_big = numel * dtype.itemsize > kept
    if too_big or torch.device(device).type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    store: dict = _local.__dict__.setdefault("buffers", {})
    key = (role, dtype)
    held = store.get(key)
    if held is None or held.numel() < numel:
        store.pop(key, None)  # free the smaller one before allocating its successor
        held = store[key] = torch.empty(numel, dtype=dtype)
    return held[:numel]


def release(role: Role) -> None:
    """Free this thread's buffer of ``role``: for a phase that is over (the search's
    statistics), so that what comes after does not hold it."""
    store: dict = _local.__dict__.get("buffers", {})
    for key in [key for key in store if key[0] is role]:
        del store[key]


_state = threading.local()


def threads() -> int:
    """The threads this merge may use: torch's thread count when the kernel was entered
    (mergekit's ``-j``), or now, outside the kernel."""
    return getattr(_state, "budget", None) or torch.get_num_threads()


def owns_threads(entry: Callable[..., R]) -> Callable[..., R]:
    """A kernel entry point: torch's intra-op threads are off while it runs (restored
    after), so every op runs on the thread that calls it and only :func:`map_chunks`
    spreads work, over :func:`threads` threads."""

    @functools.wraps(entry)
    def entered(*args, **kwargs):
        if getattr(_state, "budget", None) is not None:  # already inside the kernel
            return entry(*args, **kwargs)
        _state.budget = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return entry(*args, **kwargs)
        finally:
            torch.set_num_threads(_state.budget)
            _state.budget = None

    return entered


def workers(chunks: int) -> int:
    """How many threads share ``chunks`` chunks: all of :func:`threads` for a large
    tensor, fewer for a smaller one, one below 2 x :data:`MIN_CHUNKS_PER_THREAD`."""
    return max(1, min(threads(), chunks // MIN_CHUNKS_PER_THREAD))


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_busy = threading.local()


def _helpers(count: int) -> ThreadPoolExecutor:
    """The process's pool, grown (never shrunk) to at least ``count`` threads."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < count:
            if _pool is not None:
                _pool.shutdown(wait=False)  # its running and queued work still finishes
            _pool = ThreadPoolExecutor(count, thread_name_prefix="mergekit-pcb")
            _pool_size = count
        return _pool


def map_chunks(fn: Callable[[T], R], items: Sequence[T], device: torch.device) -> list[R]:
    """``[fn(x) for x in items]``, on :func:`workers` threads (CPU only): the caller and
    helpers from a pool, each taking the next item when done with its last, every op
    single-threaded. A busy machine that deschedules one of them then delays the call
    by at most that thread's current item, not by a share fixed in advance.

    With one worker, on a GPU, or when called from inside a worker, a plain loop.
    """
    count = workers(len(items))
    if count <= 1 or torch.device(device).type != "cpu" or getattr(_busy, "inside", False):
        return [fn(x) for x in items]
    results: list = [None] * len(items)
    queue = iter(enumerate(items))
    lock = threading.Lock()

    def work() -> None:
        _busy.inside = True
        try:
            while True:
                with lock:
                    item = next(queue, None)
                if item is None:
                    return
                results[item[0]] = fn(item[1])
        finally:
            _busy.inside = False

    def helper() -> None:
        if not getattr(_busy, "single", False):
            # OpenMP's thread count is per calling thread: set it in each pool thread.
            torch.set_num_threads(1)
            _busy.single = True
        work()

    helpers = [_helpers(count - 1).submit(helper) for _ in range(count - 1)]
    outer = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        work()
    finally:
        torch.set_num_threads(outer)
        for done in helpers:
            done.result()  # waits for every helper; re-raises a helper's error
    return results


# A piece of a tensor that the whole-model scope holds at once: tau and B of this many
# elements (all rows), so that one tensor costs O(piece), not O(n x d), whatever its size.
PIECE_ELEMENTS = 1 << 24  # 64 MB of float32: within MAX_BUFFER_BYTES, so reused


def column_pieces(
    n: int, d: int, device: torch.device | str = "cpu", elements: int | None = None
) -> list[slice]:
    """Runs of whole :func:`column_chunks` (the device's) of about ``elements`` elements of
    n rows (default :data:`PIECE_ELEMENTS`; at least one chunk each). Steps applied to a
    piece cut it into exactly the chunks they cut the whole tensor into (a piece starts
    on a chunk boundary and spans whole chunks), so they give the same floats."""
    limit = PIECE_ELEMENTS if elements is None else elements
    pieces: list[slice] = []
    for cols in column_chunks(n, d, device=device):
        if pieces and n * (cols.stop - pieces[-1].start) <= limit:
            pieces[-1] = slice(pieces[-1].start, cols.stop)
        else:
            pieces.append(cols)
    return pieces
