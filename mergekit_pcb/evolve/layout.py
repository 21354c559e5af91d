"""Step 1 of the search (and best.yml in step 6): which tensors a merge has, which
layer group each belongs to, and the mergekit config.

The search must score exactly the model that ``mergekit-yaml best.yml`` writes, so
nothing here guesses mergekit's behaviour: the tensor list, the input names and
every per-tensor parameter value come from mergekit's own planner run on the very
config that becomes ``best.yml``.

Layer groups: layer ``i`` of ``L`` belongs to group ``i * G // L`` (contiguous,
sizes differing by at most one). Tensors outside the layers join the group
nearest to them in the network: embeddings (mergekit's "pre" weights) group 0,
the final norm and ``lm_head`` ("post" weights) the last group. With ``G > 1``
``pcb_ratio`` is written as a mergekit filter list: one ``{filter: <layer
prefix>, value}`` per layer (``model.layers.3.`` matches no other layer, unlike a
gradient, whose interpolation ``t = layer / (L - 1)`` would not reproduce the
values exactly), the post weights by their full names, and a final unfiltered
entry for the embeddings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mergekit_pcb import mergekit_internals
from mergekit_pcb.evolve.config import EvolveConfigError, MergeInputs
from mergekit_pcb.parameters import LAMBDA, PCB_RATIO, WEIGHT


@dataclass(frozen=True)
class Values:
    """One point of the search: a ratio per layer group, lambda, a weight per model."""

    pcb_ratio: tuple[float, ...]
    lambda_: float | str  # a number, or "auto" (pcb's own per-tensor scale, issue 22)
    weights: tuple[float, ...]

    def to_json(self) -> dict:
        return {
            "pcb_ratio": list(self.pcb_ratio),
            "lambda": self.lambda_,
            "weight": list(self.weights),
        }

    @classmethod
    def from_json(cls, data: dict) -> Values:
        return cls(
            tuple(float(x) for x in data["pcb_ratio"]),
            data["lambda"] if isinstance(data["lambda"], str) else float(data["lambda"]),
            tuple(float(x) for x in data["weight"]),
        )


def default_values(inputs: MergeInputs, groups: int) -> Values:
    """PCB's own defaults for every value: the baseline the search must beat."""
    return Values(
        (PCB_RATIO.default,) * groups, LAMBDA.default, (WEIGHT.default,) * len(inputs.models)
    )


@dataclass(frozen=True)
class Layout:
    num_layers: int
    groups: int
    layer_prefixes: tuple[str, ...]
    post_names: tuple[str, ...]

    def group_of_layer(self, layer: int) -> int:
        return layer * self.groups // self.num_layers

    def pcb_ratio_setting(self, ratios: tuple[float, ...]) -> Any:
        if self.groups == 1:
            return ratios[0]
        setting = [
            {"filter": prefix, "value": ratios[self.group_of_layer(i)]}
            for i, prefix in enumerate(self.layer_prefixes)
        ]
        setting += [{"filter": name, "value": ratios[-1]} for name in self.post_names]
        setting.append({"value": ratios[0]})
        return setting


def merge_config(inputs: MergeInputs, values: Values, layout: Layout) -> dict:
    """The plain mergekit config (``best.yml``) for ``values``."""
    return {
        "merge_method": "pcb",
        "base_model": inputs.base_model,
        "models": [
            {"model": model, "parameters": {"weight": float(w)}}
            for model, w in zip(inputs.models, values.weights, strict=True)
        ],
        "parameters": {
            "pcb_ratio": layout.pcb_ratio_setting(values.pcb_ratio),
            "lambda": values.lambda_ if isinstance(values.lambda_, str) else float(values.lambda_),
            "clamp_ratio": float(inputs.clamp_ratio),
        },
        "dtype": inputs.dtype,
    }


def _common_prefix(names: list[str]) -> str:
    prefix = os.path.commonprefix(names)
    return prefix[: prefix.rfind(".") + 1]


def build_layout(inputs: MergeInputs, groups: int = 1) -> Layout:
    """Layer prefixes and post-weight names from mergekit's architecture description."""
    from mergekit.architecture import ConfiguredModuleArchitecture, get_architecture_info
    from mergekit.common import ModelReference
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    options = MergeOptions(trust_remote_code=inputs.trust_remote_code)
    probe = MergeConfiguration.model_validate(
        merge_config(inputs, default_values(inputs, 1), Layout(1, 1, (), ()))
    )
    arch = get_architecture_info(probe, options)
    if len(arch.modules) != 1:
        raise EvolveConfigError(
            f"search.layer_groups: models with several modules ({', '.join(arch.modules)}) "
            "are not supported"
        )
    module = next(iter(arch.modules.values()))
    base_cfg = ModelReference.parse(inputs.base_model).config(
        trust_remote_code=inputs.trust_remote_code
    )
    configured = ConfiguredModuleArchitecture(
        info=module.architecture, config=base_cfg, weight_prefix=module.weight_prefix
    )
    num_layers = configured.num_layers()
    if groups > num_layers:
        raise EvolveConfigError(
            f"search.layer_groups: {groups} groups but the model has only {num_layers} layers"
        )
    prefixes = []
    for i in range(num_layers):
        prefix = _common_prefix([w.name for w in configured.layer_weights(i)])
        if str(i) not in prefix:
            raise EvolveConfigError(
                f"search.layer_groups: cannot name layer {i} by a tensor-name prefix "
                f"(common prefix '{prefix}'); use layer_groups: 1"
            )
        prefixes.append(prefix)
    post = tuple(w.name for w in configured.post_weights())
    return Layout(num_layers, groups, tuple(prefixes), post)


@dataclass
class PlannedTensor:
    """One output tensor as mergekit plans it, with the parameter values it resolved."""

    name: str
    task: Any  # mergekit ExecuteMergeMethodTask
    pcb_ratio: float
    lambda_: float
    clamp_ratio: float
    weights: tuple[float, ...]  # per row of the task vector, in ``rows`` order
    rows: tuple[int, ...]  # index into inputs.models for each non-base input

    def load_inputs(self):
        """(base, experts) exactly as mergekit's GatherTensors would hand them over."""
        gather = self.task.gather_tensors
        loaded = gather.execute(**{k: t.execute() for k, t in gather.arguments().items()})
        base = loaded.get(self.task.base_model)
        experts = [loaded.get(m) for m in self.task.model_order if m != self.task.base_model]
        return base, experts


def plan(inputs: MergeInputs, merge_dict: dict) -> list[PlannedTensor]:
    """Run mergekit's planner on ``merge_dict`` and read back each tensor's parameters."""
    from mergekit.architecture import get_architecture_info
    from mergekit.common import ModelReference
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    import mergekit_pcb

    mergekit_pcb.register()
    options = MergeOptions(trust_remote_code=inputs.trust_remote_code)
    LoaderCache().setup(options)
    merge = MergeConfiguration.model_validate(merge_dict)
    arch = get_architecture_info(merge, options)
    out_cfg = ModelReference.parse(inputs.base_model).config(
        trust_remote_code=inputs.trust_remote_code
    )
    planner = MergePlanner(merge, arch, options=options, out_model_config=out_cfg)
    index = {ModelReference.parse(m): i for i, m in enumerate(inputs.models)}
    planned = []
    for weight, task in mergekit_internals.planned_tensors(planner):
        experts = [m for m in task.model_order if m != task.base_model]
        rows = tuple(index[m] for m in experts)
        params = task.parameters
        planned.append(
            PlannedTensor(
                name=weight.name,
                task=task,
                pcb_ratio=params["pcb_ratio"],
                lambda_=params["lambda"],
                clamp_ratio=params["clamp_ratio"],
                weights=tuple(task.input_parameters[m]["weight"] for m in experts),
                rows=rows,
            )
        )
    return planned


def tensor_groups(inputs: MergeInputs, layout: Layout) -> tuple[list[PlannedTensor], list[int]]:
    """The planned tensors and each one's layer group, learnt by planning distinct ratios."""
    sentinels = tuple((g + 1) / (layout.groups + 1) for g in range(layout.groups))
    probe = Values(sentinels, 1.0, (1.0,) * len(inputs.models))
    planned = plan(inputs, merge_config(inputs, probe, layout))
    lookup = {r: g for g, r in enumerate(sentinels)}
    return planned, [lookup[p.pcb_ratio] for p in planned]


def check_reproduces(
    inputs: MergeInputs,
    merge_dict: dict,
    values: Values,
    groups: list[int],
    names: list[str] | None = None,
) -> None:
    """Plan ``merge_dict`` again and insist mergekit resolves exactly ``values`` per tensor."""
    planned = plan(inputs, merge_dict)
    if names is not None and [p.name for p in planned] != names:
        raise RuntimeError("best.yml plans a different tensor list than the search used")
    for p, g in zip(planned, groups, strict=True):
        expected_w = tuple(values.weights[r] for r in p.rows)
        if (p.pcb_ratio, p.lambda_, p.weights) != (values.pcb_ratio[g], values.lambda_, expected_w):
            raise RuntimeError(
                f"best.yml would merge tensor '{p.name}' with pcb_ratio={p.pcb_ratio}, "
                f"lambda={p.lambda_}, weights={p.weights}; the search used "
                f"{values.pcb_ratio[g]}, {values.lambda_}, {expected_w}"
            )
