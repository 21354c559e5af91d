"""``pcb_scope: model``: every statistic over all tensors of each model, from a plain
``mergekit-yaml`` run.

How the statistics passes find their data: on the first model-scope call we find
the ``Executor`` that runs the merge (:func:`mergekit_internals.running_executor`);
its task universe holds *every* ``ExecuteMergeMethodTask`` of the merge. Those
with ``method_name == "pcb"`` are exactly the tensors the merge feeds to pcb
(tensors other methods handle, or that a slice does not use, are not there; a
model tensor that several output tensors use is fed, and counted, once per output
tensor). Their input tasks (``GatherTensors``, or ``PermutedVocabulary`` with
tokenizer alignment) are re-run through a private ``Executor`` on the same
devices, so each pass sees the very tensors ``merge_group`` will see: same
``dtype:`` conversion, same vocabulary alignment, same expert order. The passes
themselves are the kernel's (:mod:`mergekit_pcb.kernel.whole_model`); the results
are cached for the rest of the run, keyed by the executor.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from mergekit.common import ModelReference, dtype_from_name
from mergekit.graph import Executor
from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata
from mergekit.merge_methods.buffers import copy_non_floating_buffer
from mergekit.merge_methods.dtype import align_dtype
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.tokenizer.build import BuildTokenizer

from mergekit_pcb import groups, kernel, mergekit_internals
from mergekit_pcb.parameters import CLAMP_RATIO, PCB_RATIO, PCB_SCOPE

LOG = logging.getLogger(__name__)
WHOLE_MODEL = (PCB_RATIO.name, CLAMP_RATIO.name)  # define ranks over the whole model


class ScopeError(ValueError):
    """A model-scope merge that cannot be computed as specified."""


def _pcb_tasks(executor: Executor, method_name: str) -> list[ExecuteMergeMethodTask]:
    return [
        t
        for t in executor.universe.tasks
        if isinstance(t, ExecuteMergeMethodTask) and t.method_name == method_name
    ]


def _check_shared(tasks: list[ExecuteMergeMethodTask]) -> dict[str, Any]:
    """pcb_ratio and clamp_ratio define whole-model ranks: one value for the merge."""
    values: dict[str, Any] = {}
    for task in tasks:
        if task.parameters[PCB_SCOPE.name] != "model":
            raise ScopeError(
                f"pcb: parameter 'pcb_scope' is 'model' for some tensors but "
                f"{task.parameters[PCB_SCOPE.name]!r} for '{task.output_weight.name}'; "
                "allowed: one pcb_scope for the whole merge (no gradients or filters)"
            )
        if task.parameters[PCB_RATIO.name] == "auto":
            raise ScopeError(
                f"pcb: parameter 'pcb_ratio' is auto for '{task.output_weight.name}', which "
                "chooses a level per tensor, but pcb_scope: model cuts every tensor of a model "
                "at one rank; allowed: a number for pcb_ratio with pcb_scope: model, or "
                "pcb_scope: tensor with pcb_ratio: auto"
            )
        for name in WHOLE_MODEL:
            value = task.parameters[name]
            if values.setdefault(name, value) != value:
                raise ScopeError(
                    f"pcb: parameter '{name}' varies between tensors ({values[name]!r} vs "
                    f"{value!r} at '{task.output_weight.name}'), but pcb_scope: model takes "
                    f"its statistics over all tensors at once, so one {name} applies to the "
                    f"whole model; allowed: a single value for '{name}' (per-layer gradients "
                    "and filters only with pcb_scope: tensor; weight and lambda may vary)"
                )
    return values


# ---------------------------------------------------------------- streamed inputs


def group_of(task: ExecuteMergeMethodTask, tensors: dict, device) -> TensorGroup | None:
    """The group ``ExecuteMergeMethodTask.execute`` would pass to merge_group (or None).

    Shared with ``mergekit-pcb inspect``, whose numbers must be those of the same inputs.
    """
    entries = tuple(
        TensorEntry(id=model, tensor=tensor.to(device), is_base=model == task.base_model)
        for model in task.model_order
        if (tensor := tensors.get(model)) is not None
    )
    if not entries:
        return None
    if copy_non_floating_buffer([e.tensor for e in entries], task.output_weight.name) is not None:
        return None  # integer buffers are copied, never fed to pcb
    group = TensorGroup(
        entries=entries, metadata=TensorMetadata.from_weight_info(task.output_weight)
    )
    group.validate_tensors()
    return align_dtype(group, dtype_from_name(task.dtype))


class Inputs:
    """Re-runs the input tasks of all pcb tasks, one group at a time, on demand.

    ``executor`` only lends its devices (``mergekit-pcb inspect`` passes one without
    targets). Each iteration yields ``(task, tensors by model)`` for every task.
    """

    def __init__(self, executor: Executor, tasks: list[ExecuteMergeMethodTask]):
        self.executor = executor
        self.users: dict = {}
        for task in tasks:
            self.users.setdefault(task.gather_tensors, []).append(task)
        self.cached: dict | None = None

    def __iter__(self) -> Iterator[tuple[ExecuteMergeMethodTask, dict]]:
        targets = list(self.users)
        sub = Executor(
            targets=targets,
            math_device=self.executor.math_device,
            storage_device=self.executor.storage_device,
        )
        # Build tokenizers once, not once per pass: they are pure functions of the config.
        tokenizer_handles = [
            h
            for t in sub.universe.tasks
            if isinstance(t, BuildTokenizer)
            if (h := sub.universe.get_handle(t)) is not None
        ]
        if self.cached is None:
            sub = Executor(
                targets=sub.targets + tokenizer_handles,
                math_device=self.executor.math_device,
                storage_device=self.executor.storage_device,
            )
            self.cached = {}
        else:
            sub = Executor(
                targets=sub.targets,
                math_device=self.executor.math_device,
                storage_device=self.executor.storage_device,
                cached_values={h: self.cached[h.task()] for h in tokenizer_handles},
            )
        for handle, value in mergekit_internals.run_quietly(sub):
            task = handle.task()
            if isinstance(task, BuildTokenizer):
                self.cached[task] = value
                continue
            for user in self.users[task]:
                yield user, value


# ---------------------------------------------------------------- the statistics


def _rows(task: ExecuteMergeMethodTask, group: TensorGroup) -> Iterator[tuple[list, torch.Tensor]]:
    """The models and task vectors of one group, exactly as ``merge_group`` makes them,
    one piece of columns at a time (:func:`kernel.runtime.column_pieces`): the
    statistics are counts over elements, so pieces give the same values, and a 70B
    model's embedding costs one piece's tau and B instead of two n x d matrices."""
    weights = {e.id: task.input_parameters[e.id]["weight"] for e in group.non_base}
    experts = groups.ordered(group, weights)
    models = [e.id for e in experts]
    base = group.base.tensor.reshape(-1)
    rows = [e.tensor.reshape(-1) for e in experts]
    for cols in kernel.runtime.column_pieces(len(rows), base.numel(), base.device):
        # reuse: the statistics are done with one piece before they ask for the next
        vectors = kernel.task_vectors(base[cols], [r[cols] for r in rows], reuse=True)
        if not vectors.finite:
            raise groups.non_finite_error(group, vectors.tau.dtype)
        yield models, vectors.tau


def compute(
    executor: Executor,
    tasks: list[ExecuteMergeMethodTask],
    each_pass: Callable[[Iterator], Iterator] | None = None,
) -> dict[ModelReference, kernel.ModelStatistics]:
    """Every model's statistics; ``each_pass`` may wrap each pass's input iterator
    (``mergekit-pcb inspect`` draws a progress bar with it)."""
    shared = _check_shared(tasks)
    inputs = Inputs(executor, tasks)
    dtypes: dict = {}
    counts: dict = {}

    def check(models: list, tau: torch.Tensor) -> None:
        for model in models:
            if dtypes.setdefault(model, tau.dtype) != tau.dtype:
                raise ScopeError(
                    f"pcb: pcb_scope: model needs one compute dtype per model, but "
                    f"'{model}' has tensors in {dtypes[model]} and {tau.dtype}; "
                    "allowed: inputs that are all float64 or all not float64 (or set dtype:)"
                )
            if counts.setdefault(model, len(models)) != len(models):
                raise ScopeError(
                    f"pcb: pcb_scope: model needs the same number of models in every tensor "
                    f"(the intra-balancing exp(n x^2) is scaled per model row), but "
                    f"'{model}' is merged with {counts[model]} and with "
                    f"{len(models)} models; allowed: the same models in every slice, "
                    "or pcb_scope: tensor"
                )

    def tensors() -> Iterator[tuple[list, torch.Tensor]]:
        for task, values in each_pass(iter(inputs)) if each_pass else inputs:
            group = group_of(task, values, executor.math_device)
            if group is not None:
                for models, tau in _rows(task, group):
                    check(models, tau)
                    yield models, tau

    return kernel.statistics(tensors, shared[PCB_RATIO.name], shared[CLAMP_RATIO.name])


_CACHE: weakref.WeakKeyDictionary[Executor, dict] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def statistics(method_name: str) -> dict[ModelReference, kernel.ModelStatistics]:
    """Whole-model statistics for the merge that is running this call (cached per run)."""
    _, executor = mergekit_internals.running_executor()
    if executor is None:
        raise ScopeError(
            "pcb: pcb_scope: model needs the whole merge plan, which only a run of "
            "mergekit's graph Executor (mergekit-yaml, mergekit-multi) provides; got a call "
            "outside one (e.g. merge_tensors/merge_state_dicts); allowed: pcb_scope: tensor "
            "there, or merge with mergekit-yaml"
        )
    with _LOCK:
        if executor not in _CACHE:
            tasks = _pcb_tasks(executor, method_name)
            start = time.perf_counter()
            LOG.info("pcb_scope: model: statistics over %d tensors", len(tasks))
            _CACHE[executor] = compute(executor, tasks)
            LOG.info("pcb_scope: model: statistics done in %.1f s", time.perf_counter() - start)
        return _CACHE[executor]
