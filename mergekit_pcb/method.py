"""The ``pcb`` merge method: mergekit's group API around :mod:`mergekit_pcb.kernel`."""

from __future__ import annotations

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

from mergekit_pcb import (
    _autoload,
    chosen_scales,
    groups,
    kernel,
    mergekit_internals,
    model_scope,
    parameters,
)
from mergekit_pcb.kernel.auto_scale import AUTO

NAME = "pcb"


@dataclass(frozen=True)
class _Spec(ParameterSpec):
    """mergekit's spec of one of :mod:`mergekit_pcb.parameters`, validated by it: mergekit's
    own (pydantic's) message would not name the parameter or say what is allowed."""

    parameter: parameters.Parameter | None = None

    def validate(self, value: Any) -> Any:
        return self.parameter.check(value)


SPECS = tuple(
    _Spec(
        p.name,
        float | str if p.keywords else type(p.default),
        ParameterScope.NON_BASE if p.per_model else ParameterScope.SHARED,
        default=p.default,
        description=p.description,
        parameter=p,
    )
    for p in parameters.ALL
)


class PCBMerge(GroupMergeMethod):
    spec = MergeMethodSpec(
        name=NAME,
        pretty_name="PCB",
        reference_url="https://arxiv.org/abs/2410.02396",
        parameters=SPECS,
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
    )

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        # mergekit's own message ("requires a base input") never names the config key.
        if base_id is None:
            where = f" (for {group_name})" if group_name else ""
            raise ValueError(
                f"pcb: 'base_model' is missing{where}; allowed: set base_model to the model "
                "the others were fine-tuned from (task vectors are taken against it)"
            )
        super().validate_inputs(input_ids, base_id, group_name=group_name)

    def merge_group(self, group: TensorGroup, /, **params: Any) -> torch.Tensor:
        # Whole-model statistics first: their passes run before any tau of ours exists.
        whole = model_scope.statistics(NAME) if params["pcb_scope"] == "model" else None
        experts = groups.ordered(group, params["weight"])
        base, tensors = group.base.tensor, [e.tensor for e in experts]
        coefficients = [params["weight"][e.id] for e in experts]
        chosen: list[float] = []  # lambda: auto's scale, told by the kernel
        ratios: list[float] = []  # pcb_ratio: auto's level, told by the kernel
        common = {"pcb_ratio": params["pcb_ratio"], "scale": params["lambda"]}
        common["on_scale"] = chosen.append
        try:
            if whole is not None:  # tensor scope for pcb_ratio: auto (model_scope refuses it)
                rows = [whole[e.id] for e in experts]
                result = kernel.merge_with_statistics(base, tensors, coefficients, rows, **common)
            elif kernel.streams(base, tensors, params["clamp_ratio"]):
                result = kernel.merge_streamed(
                    base,
                    tensors,
                    coefficients,
                    clamp_ratio=params["clamp_ratio"],
                    on_ratio=ratios.append,
                    **common,
                )
            elif params["pcb_ratio"] == AUTO:
                del common["pcb_ratio"]
                result = kernel.merge_ratio_auto(
                    base,
                    tensors,
                    coefficients,
                    clamp_ratio=params["clamp_ratio"],
                    on_ratio=ratios.append,
                    **common,
                )
            else:
                result = kernel.merge_stored(
                    base, tensors, coefficients, clamp_ratio=params["clamp_ratio"], **common
                )
        except kernel.NonFiniteTaskVector as error:
            raise groups.non_finite_error(group, error.dtype) from None
        if AUTO in (params["lambda"], params["pcb_ratio"]):
            asked = {}
            if params["lambda"] == AUTO:
                asked["scale"] = chosen[0] if chosen else None
            if params["pcb_ratio"] == AUTO:
                asked["ratio"] = ratios[0] if ratios else None
            chosen_scales.record(group.metadata.name, **asked)
        # mergekit would write inf silently (float16 overflow): name the tensor and the fix.
        error = groups.non_finite_output(group, result, mergekit_internals.output_dtype())
        if error is not None:
            raise error
        return result


pcb = PCBMerge()

# Importing this module first (``from mergekit_pcb.method import pcb``) loads mergekit's
# registry, whose hook cannot register a half-initialized module: register here.
_autoload.register()
