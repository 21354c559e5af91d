"""A mergekit ``TensorGroup`` in the kernel's terms, for the method and the model scope.

Both must put the experts in the same order and name the same culprit, so the
two rules live here once, with the check of the method's output.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from mergekit.common import dtype_from_name
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


def non_finite_output(
    group: TensorGroup, result: torch.Tensor, out_dtype: str | None
) -> ValueError | None:
    """The error for a merged tensor that is, or would be written as, NaN/Inf; else None.

    From finite inputs the float32 result stays finite unless lambda and the weights
    are huge, but float16 holds only +-65504, so a merged value beyond it becomes inf
    in the kernel's final cast (``dtype: float16``) or in mergekit's cast to
    ``out_dtype``. The cast is monotonic: the two extremes tell whether any value
    overflows, at the cost of one min/max pass over the output.
    """
    if not result.is_floating_point() or result.numel() == 0:
        return None
    ends = torch.stack(torch.aminmax(result))
    target = dtype_from_name(out_dtype) if out_dtype else result.dtype
    if bool(torch.isfinite(ends.to(target)).all()):
        return None
    if bool(torch.isfinite(ends).all()):  # finite as merged, overflows in out_dtype's cast
        key, dtype = "out_dtype", target
        values = f"reach {float(ends.abs().max()):.6g}, beyond"
    else:
        key, dtype = "dtype", result.dtype
        values = "exceed"
    name = str(dtype).removeprefix("torch.")
    if torch.finfo(dtype).max < torch.finfo(torch.float32).max:
        fix = f"set {key}: bfloat16 or {key}: float32"
    else:
        fix = "lower lambda or the models' weights, or set dtype: float64"
    return ValueError(
        f"pcb: tensor '{group.metadata.name}': the merged values {values} {name}'s range "
        f"(+-{torch.finfo(dtype).max:.6g}) and would be written as inf; allowed: values "
        f"within it ({fix})"
    )
