"""Chunk-level threads for the kernel on CPU.

Why: each of the kernel's ops runs on one cache-sized chunk, too small for torch's
own intra-op threads to pay off (measured on 2 cores: 1.1x, the barriers eat the
rest). Handing whole chunks to a pool of threads that each run their ops
single-threaded uses the cores for the whole chain of ops. Results do not depend
on the number of threads: every chunk runs the same ops on the same data, and
what chunks share (extremes, histograms) is combined order-independently.

Only work of at least ``CHUNKS_PER_THREAD`` chunks per thread goes to the pool: on
the 2-core project machine a layer-sized tensor (a few to 14 chunks) merged 1.2-1.5x
*slower* in two threads than in one (hand-offs, and two streams through one L3),
while the embeddings (100+ chunks) gained 1.4x; the whole 166M-parameter merge took
0.85x the time with this gate.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

CHUNKS_PER_THREAD = 16

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
_busy = threading.local()


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_workers
    with _lock:
        if _pool is None or _pool_workers != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="mergekit-pcb")
            _pool_workers = workers
        return _pool


def map_chunks(fn: Callable[[T], R], items: Sequence[T], device: torch.device) -> list[R]:
    """``[fn(x) for x in items]``, on torch's thread count of pool threads (CPU only).

    torch's intra-op threads are set to 1 meanwhile (and restored), so the pool's
    threads are the only ones working; with one thread, fewer than two threads'
    worth of items (see the module), on a GPU, or when called from inside a pool
    thread, it is a plain loop.
    """
    workers = torch.get_num_threads()
    if (
        min(workers, len(items) // CHUNKS_PER_THREAD) <= 1
        or torch.device(device).type != "cpu"
        or getattr(_busy, "inside", False)
    ):
        return [fn(x) for x in items]

    def run(x: T) -> R:
        if not getattr(_busy, "single", False):
            # OpenMP's thread count is per calling thread: set it in each pool thread.
            torch.set_num_threads(1)
            _busy.single = True
        _busy.inside = True
        try:
            return fn(x)
        finally:
            _busy.inside = False

    pool = _executor(workers)
    torch.set_num_threads(1)
    try:
        return list(pool.map(run, items))
    finally:
        torch.set_num_threads(workers)
