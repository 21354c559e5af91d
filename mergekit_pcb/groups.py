"""A mergekit ``TensorGroup`` in the kernel's terms, for the method and the model scope.

Both must put the experts in the same order and name the same culprit, so the
two rules live here once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from mergekit.merge_methods.base import TensorEntry, TensorGroup

from mergekit_pcb import kernel


def ordered(group: TensorGroup, weights: Mapping) -> list[TensorEntry]:
    """The experts in the kernel's canonical order (by content, then weight)."""
    experts = list(group.non_base)
    tensors = [e.tensor for e in experts]
    return [experts[i] for i in kernel.canonical_order(tensors, [weights[e.id] for e in experts])]


def non_finite_error(group: TensorGroup, dtype: torch.dtype) -> ValueError:
    """The error for a task vector that is not finite, naming the input at fault, if any.

    The kernel sees this for free (a task vector's extremes come with it); only then
    is every input scanned, to say which one holds NaN/Inf.
    """
    for entry in group.entries:
        bad = (~torch.isfinite(entry.tensor)).sum().item()
        if bad:
            role = "base model" if entry.is_base else "model"
            return ValueError(
                f"pcb: tensor '{group.metadata.name}' of {role} '{entry.id}' holds {bad} "
                "NaN/Inf value(s); allowed: finite values only"
            )
    return ValueError(
        f"pcb: tensor '{group.metadata.name}': a task vector overflows {dtype} "
        "(model minus base_model exceeds its range); allowed: differences representable "
        f"in {dtype} (set dtype: float64)"
    )
