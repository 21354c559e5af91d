"""``optimizer.start.lambda: auto``: the searched lambda starts where pcb's own
``lambda: auto`` puts it for the start point.

Why a number: the search moves one global lambda, while auto chooses one per tensor;
the start is the median of those (as the merge's log line and model card report
them), found by one merge pass over the cached tensors in this process before the
search, so a resumed search finds the same start. With ``search.lambda: auto`` every
candidate uses auto's per-tensor scales instead, and nothing is resolved here.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics

from mergekit_pcb.evolve.cache import TensorCache
from mergekit_pcb.evolve.candidate import merged_tensor
from mergekit_pcb.evolve.config import AUTO, Optimizer, SearchSpace
from mergekit_pcb.evolve.layout import Values

LOG = logging.getLogger("mergekit_pcb.evolve")


def scales(cache: TensorCache, values: Values) -> list[float]:
    """The scale auto chooses for each changed tensor of the merge at ``values``."""
    told: list[float] = []
    for tensor in cache.tensors:
        with cache.inputs(tensor) as (base, experts):
            merged_tensor(cache, tensor, base, experts, values, on_scale=told.append)
    return told


def resolve(opt: Optimizer, space: SearchSpace, cache: TensorCache, start: Values) -> Optimizer:
    """``opt`` with a numeric ``start.lambda`` where it asked for auto's."""
    if opt.start is None or opt.start.lambda_ != AUTO or space.lambda_auto:
        return opt
    chosen = scales(cache, dataclasses.replace(start, lambda_=AUTO))
    value = statistics.median(chosen) if chosen else 1.0
    LOG.info(
        "optimizer.start.lambda: auto starts at %.4g (the median of %d tensors' scales)",
        value,
        len(chosen),
    )
    return opt.model_copy(update={"start": opt.start.model_copy(update={"lambda_": value})})
