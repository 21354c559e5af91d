"""The ``pcb`` merge method: mergekit's group API around :mod:`mergekit_pcb.kernel`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from pydantic import ValidationError

from mergekit_pcb.kernel import compute_dtype, pcb_task_vector

NAME = "pcb"
PRETTY_NAME = "PCB"
REFERENCE_URL = "https://arxiv.org/abs/2410.02396"


@dataclass(frozen=True)
class BoundedFloat(ParameterSpec):
    """A float parameter whose errors name the parameter and its allowed range.

    mergekit reports pydantic's generic text, which never says which parameter
    failed; ``allowed`` is the human-readable domain that the check enforces.
    """

    allowed: str = "a finite number"
    low: float = -math.inf
    high: float = math.inf
    low_inclusive: bool = True
    high_inclusive: bool = True

    def validate(self, value: Any) -> float:
        number = None
        if not isinstance(value, bool):
            try:
                number = super().validate(value)
            except ValidationError:
                pass
        if number is None or not self._inside(number):
            where = "per-model " if self.scope == ParameterScope.NON_BASE else ""
            raise ValueError(
                f"pcb: {where}parameter '{self.name}' got {value!r}; allowed: {self.allowed}"
            )
        return number

    def _inside(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        above = x >= self.low if self.low_inclusive else x > self.low
        below = x <= self.high if self.high_inclusive else x < self.high
        return above and below


PARAMETERS = (
    BoundedFloat(
        "pcb_ratio", float, ParameterScope.SHARED, default=0.1,
        description="fraction of entries kept per model",
        allowed="a number in (0, 1], the fraction of entries each model keeps",
        low=0.0, low_inclusive=False, high=1.0,
    ),
    BoundedFloat(
        "clamp_ratio", float, ParameterScope.SHARED, default=1e-4,
        description="outlier-clipping quantile of |task vector|",
        allowed="a number in [0, 0.5), the quantile clipped at each end of |task vector|",
        low=0.0, high=0.5, high_inclusive=False,
    ),
    BoundedFloat(
        "lambda", float, ParameterScope.SHARED, default=1.0,
        description="scale of the merged task vector",
        allowed="a finite number, the scale of the merged task vector",
    ),
    BoundedFloat(
        "weight", float, ParameterScope.NON_BASE, default=1.0,
        description="per-model task coefficient",
        allowed="a finite number, this model's task coefficient",
    ),
)


def check_finite(group: TensorGroup) -> None:
    """NaN or Inf would silently poison every statistic of the tensor; name the culprit."""
    for entry in group.entries:
        bad = (~torch.isfinite(entry.tensor)).sum().item()
        if bad:
            role = "base model" if entry.is_base else "model"
            raise ValueError(
                f"pcb: tensor '{group.metadata.name}' of {role} '{entry.id}' holds {bad} "
                "NaN/Inf value(s); allowed: finite values only"
            )


class PCBMerge(GroupMergeMethod):
    spec = MergeMethodSpec(
        name=NAME,
        pretty_name=PRETTY_NAME,
        reference_url=REFERENCE_URL,
        parameters=PARAMETERS,
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
    )

    def merge_group(self, group: TensorGroup, /, **params: Any) -> torch.Tensor:
        check_finite(group)
        base = group.base.tensor
        experts = group.non_base
        work = compute_dtype(base.dtype)
        base_work = base.to(work).reshape(-1)
        tau = torch.stack([e.tensor.to(work).reshape(-1) for e in experts]).sub_(base_work)
        if not tau.any():
            return base
        coefficients = torch.tensor(
            [params["weight"][e.id] for e in experts], dtype=work, device=tau.device
        )
        merged = pcb_task_vector(
            tau, coefficients,
            pcb_ratio=params["pcb_ratio"], clamp_ratio=params["clamp_ratio"],
        )
        # Out of place: base_work may alias the caller's tensor when it is already float32.
        return torch.add(base_work, merged, alpha=params["lambda"]).reshape(base.shape).to(base.dtype)


pcb = PCBMerge()
