"""Which tensors a merge feeds to pcb, with which inputs and parameters: mergekit's own plan.

Nothing here re-implements mergekit's config semantics. The config is planned by
mergekit's ``MergePlanner`` with the output config ``run_merge`` makes, so slices,
filters, gradients and the base model resolve exactly as in the merge; each output
tensor's ``ExecuteMergeMethodTask`` carries its resolved parameters, and its input
task (``GatherTensors``, or ``PermutedVocabulary`` with tokenizer alignment) is
re-run through a private ``Executor`` by :class:`mergekit_pcb.model_scope.Inputs`,
the same code the whole-model scope uses, so every group here is the one
``merge_group`` receives (same ``dtype:``, same vocabulary, same devices).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mergekit_pcb import mergekit_internals, model_scope
from mergekit_pcb.parameters import PCB_SCOPE

EMBEDDINGS = "embeddings"  # mergekit's "pre" weights, before the first layer
HEAD = "head"  # mergekit's "post" weights: final norm, lm_head

_COMPONENTS = (
    ("attention", re.compile(r"attn|attention", re.I)),
    ("MLP", re.compile(r"mlp|feed_forward|ffn|experts", re.I)),
    ("norm", re.compile(r"norm|\bln", re.I)),
)


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor that the merge hands to pcb."""

    name: str
    task: Any  # mergekit ExecuteMergeMethodTask
    layer: int | str  # output layer index, EMBEDDINGS or HEAD
    module: str
    component: str  # attention, MLP, norm, embeddings, head or other
    out_dtype: str | None  # what mergekit casts the result to when it writes it

    @property
    def parameters(self) -> dict:
        return dict(self.task.parameters.items())

    def weight_of(self, model) -> float:
        return self.task.input_parameters[model]["weight"]


@dataclass
class Plan:
    tensors: list[PlannedTensor]  # every pcb tensor, in mergekit's plan order
    experts: list[Any]  # ModelReference of every fine-tuned model, in config order
    base_models: list[Any]  # ModelReference of the base model(s) (one per slice at most)
    layers: dict[str, int]  # output layers per module
    executor: Any  # a target-less mergekit Executor: only its devices are used

    @property
    def scope(self) -> str:
        scopes = {t.parameters[PCB_SCOPE.name] for t in self.tensors}
        return "model" if "model" in scopes else "tensor"


def component(name: str, layer: int | str) -> str:
    for label, pattern in _COMPONENTS:
        if pattern.search(name):
            return label
    return layer if isinstance(layer, str) else "other"


def label_models(models: list[Any]) -> list[str]:
    """Short names for the page: a model's folder or repo name, or A, B, ... when two
    would read the same."""
    names = [os.path.basename(str(m.model.path).rstrip("/")) or str(m) for m in models]
    if len(set(names)) == len(names) and all(names):
        return names
    return [chr(ord("A") + i) if i < 26 else f"M{i + 1}" for i in range(len(models))]


def plan(config: Any, options: Any) -> Plan:
    """Plan ``config`` (a validated ``MergeConfiguration``) as ``run_merge`` would."""
    from mergekit.architecture import ConfiguredModuleArchitecture, get_architecture_info
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache
    from mergekit.plan import MergePlanner

    arch = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    out_config = mergekit_internals.model_out_config(
        config, arch, trust_remote_code=options.trust_remote_code
    )
    where: dict[str, tuple[str, int | str]] = {}
    layers: dict[str, int] = {}
    for module_name, module in arch.modules.items():
        configured = ConfiguredModuleArchitecture(
            info=module.architecture, config=out_config, weight_prefix=module.weight_prefix
        )
        layers[module_name] = configured.num_layers()
        for weight in configured.pre_weights():
            where[weight.name] = (module_name, EMBEDDINGS)
        for i in range(layers[module_name]):
            for weight in configured.layer_weights(i):
                where[weight.name] = (module_name, i)
        for weight in configured.post_weights():
            where[weight.name] = (module_name, HEAD)

    planner = MergePlanner(config, arch, options=options, out_model_config=out_config)
    tensors, experts, bases = [], [], []
    for weight, task in mergekit_internals.planned_tensors(planner):
        if getattr(task, "method_name", None) != "pcb":
            continue
        module_name, layer = where.get(weight.name, (next(iter(arch.modules)), HEAD))
        tensors.append(
            PlannedTensor(
                name=weight.name,
                task=task,
                layer=layer,
                module=module_name,
                component=component(weight.name, layer),
                out_dtype=weight.force_dtype or config.out_dtype,
            )
        )
        for model in task.model_order:
            target = bases if model == task.base_model else experts
            if model not in target:
                target.append(model)
    executor = Executor(targets=[], math_device=options.device, storage_device="cpu")
    return Plan(tensors, experts, bases, layers, executor)


def select(tensors: list[PlannedTensor], pattern: str | None) -> list[PlannedTensor]:
    """The tensors whose name ``pattern`` (a Python regex) finds; all without one."""
    if pattern is None:
        return list(tensors)
    compiled = re.compile(pattern)
    return [t for t in tensors if compiled.search(t.name)]


def groups(
    plan: Plan,
    tensors: list[PlannedTensor],
    wrap: Callable[[Iterator], Iterator] | None = None,
) -> Iterator[tuple[PlannedTensor, Any]]:
    """``(tensor, TensorGroup)`` exactly as ``merge_group`` receives it, one at a time.

    Tensors that mergekit copies instead of merging (integer buffers) are skipped,
    as the merge never hands them to pcb.
    """
    by_task = {t.task: t for t in tensors}
    inputs = model_scope.Inputs(plan.executor, [t.task for t in tensors])
    for task, values in wrap(iter(inputs)) if wrap else inputs:
        group = model_scope.group_of(task, values, plan.executor.math_device)
        if group is not None:
            yield by_task[task], group
