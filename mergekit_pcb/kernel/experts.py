"""Step 1 (task vectors) and the canonical expert order that every path shares.

Float sums over models depend on their order in the last bit, so every path (the
method's, the whole-model scope's, the search's) puts the experts in one order
fixed by their content: the result then never depends on the order of the
models in the config, and paths that cache per tensor agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from mergekit_pcb.kernel import runtime
from mergekit_pcb.kernel.runtime import Role, column_chunks, compute_dtype

# Entries sampled for a content key; the full key costs as much as a pass of the merge.
_KEY_SAMPLE = 4096


ContentKey = tuple[float, float]


def content_keys(tensors: Sequence[torch.Tensor]) -> list[ContentKey]:
    """(sum, norm) in float64 of each tensor: of ~4096 evenly spaced entries, or of all.

    Only when two tensors tie on their samples (e.g. experts that changed other
    entries than the sampled ones) are all keys taken over every entry. Tensors
    that still tie are identical in practice, and their order cannot matter.
    """

    def keys(whole: bool) -> list[ContentKey]:
        parts = []
        for tensor in tensors:
            flat = tensor.reshape(-1)[:: 1 if whole else max(1, tensor.numel() // _KEY_SAMPLE)]
            parts.append(flat.sum(dtype=torch.float64))
            parts.append(torch.linalg.vector_norm(flat, dtype=torch.float64))
        # Every key in one transfer: on a GPU one host sync, not two per tensor.
        values = torch.stack([part.to(parts[0].device) for part in parts]).tolist()
        return list(zip(values[::2], values[1::2], strict=True))

    if not tensors:
        return []
    quick = keys(whole=False)
    if len(set(quick)) == len(quick):
        return quick
    return keys(whole=True)


def order_by(keys: Sequence[ContentKey], coefficients: Sequence[float] | None = None) -> list[int]:
    """The canonical order of experts with these content keys: by content, then by
    coefficient. Content comes first so that the order does not change with the
    coefficients: the search fixes it once per tensor and varies only those."""
    tiebreak = coefficients if coefficients is not None else [0.0] * len(keys)
    return sorted(range(len(keys)), key=lambda i: (*keys[i], float(tiebreak[i])))


def canonical_order(
    experts: Sequence[torch.Tensor], coefficients: Sequence[float] | None = None
) -> list[int]:
    """Indices of ``experts`` in the canonical order (see :func:`order_by`)."""
    return order_by(content_keys(experts), coefficients)


class TaskVectors(NamedTuple):
    base: torch.Tensor  # flat base in its storage dtype (aliases the input)
    tau: torch.Tensor  # n x d, in the compute dtype
    finite: bool  # no NaN/Inf anywhere in tau
    changed: bool  # some entry of tau is nonzero


@runtime.owns_threads
def task_vectors(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    reuse: bool = False,
    observe: Callable[[slice, torch.Tensor], None] | None = None,
) -> TaskVectors:
    """Step 1: the flat base and the n x d task vectors tau_i = theta_i - theta_0.

    Each expert is subtracted straight into its row, chunk by chunk in threads
    (one pass, no converted copy of anything), and each chunk's extremes are taken
    while it is in cache (finiteness and "changed" need no extra pass), as is
    anything ``observe(columns, tau_chunk)`` wants (e.g. the clip quantiles). An
    input whose dtype is wider than the compute dtype is first rounded to it, so
    every row is round(expert) - round(base) whatever the inputs' dtypes. The
    returned base keeps its storage dtype (step 11 promotes it exactly).
    ``reuse`` writes tau into this thread's reusable buffer: only for a caller
    that is done with it before the next call.
    """
    work = compute_dtype(base.dtype)
    flat = base.reshape(-1)
    n, d = len(experts), base.numel()
    if reuse:
        tau = runtime.buffer(Role.TASK_VECTORS, n * d, work, base.device).view(n, d)
    else:
        tau = torch.empty((n, d), dtype=work, device=base.device)
    rows = [e.reshape(-1) for e in experts]
    rows = [r if torch.promote_types(r.dtype, work) == work else r.to(work) for r in rows]

    def subtract(cols: slice) -> torch.Tensor:
        base_chunk = flat[cols]
        if base_chunk.dtype != work:
            width = cols.stop - cols.start
            scratch = runtime.buffer(Role.TASK_VECTORS_BASE, width, work, flat.device)
            base_chunk = scratch.copy_(base_chunk)
        for i, row in enumerate(rows):
            torch.sub(row[cols], base_chunk, out=tau[i, cols])
        chunk = tau[:, cols]
        if observe is not None:
            observe(cols, chunk)
        return torch.stack([chunk.amax(), chunk.amin()])

    columns = column_chunks(n, d, device=base.device)
    extremes = runtime.map_chunks(subtract, columns, base.device) if d else []
    extremes = torch.cat(extremes) if extremes else torch.zeros(2, dtype=work)
    # Both flags in one transfer: on a GPU this is the tensor's one host sync.
    finite, changed = torch.stack([torch.isfinite(extremes).all(), extremes.ne(0).any()]).tolist()
    return TaskVectors(flat, tau, finite, changed)
