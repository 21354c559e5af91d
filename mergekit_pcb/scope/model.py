"""``pcb_scope: model``: every statistic over all tensors of each model, streamed.

How the statistics pass finds its data from a plain ``mergekit-yaml pcb.yml out/``:
mergekit calls ``merge_group`` from ``ExecuteMergeMethodTask.execute``, which runs
inside ``Executor._run``. On the first model-scope call we walk up the Python
stack to that ``Executor``; its task universe holds *every* ``ExecuteMergeMethodTask``
of the merge. Those with ``method_name == "pcb"`` are exactly the tensors the merge
feeds to pcb (tensors other methods handle, or that a slice does not use, are not
there; a model tensor that several output tensors use is fed, and counted, once
per output tensor). Their input tasks (``GatherTensors``, or ``PermutedVocabulary``
with tokenizer alignment) are re-run through a private ``Executor`` on the same
devices, so each statistics pass sees the very tensors ``merge_group`` will see:
same ``dtype:`` conversion, same vocabulary alignment, same expert order.

Each model's statistics need four streamed passes over the inputs (float32; eight
for float64): two radix-selection passes for the clip bounds lo_i, hi_i of
|tau_i|, then two for the cut t_i of B_i (whose max M_i rides along). The bounds
must be final before B can be computed, so the passes cannot be merged. Memory
stays that of one tensor group plus a 65536-bin histogram per model and rank.
The results are cached for the rest of the run, keyed by the executor.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from mergekit.common import ModelReference, dtype_from_name
from mergekit.graph import Executor
from mergekit.merge_methods.base import (
    ParameterScope,
    ParameterSpec,
    TensorEntry,
    TensorGroup,
    TensorMetadata,
)
from mergekit.merge_methods.buffers import copy_non_floating_buffer
from mergekit.merge_methods.dtype import align_dtype
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.tokenizer.build import BuildTokenizer

from mergekit_pcb.kernel import ClipBounds, cut_index, quantile_indices, scores
from mergekit_pcb.scope.radix import StreamingSelector

LOG = logging.getLogger(__name__)
SHARED_ONLY = ("pcb_ratio", "clamp_ratio")


class ScopeError(ValueError):
    """A model-scope merge that cannot be computed as specified."""


@dataclass(frozen=True)
class ModelStats:
    """One model's whole-model statistics (plain floats, exact values of the data)."""

    low: float
    high: float
    threshold: float
    top: float
    elements: int


@dataclass(frozen=True)
class Prepared:
    """What ``merge_group`` computes from a group before the PCB steps."""

    experts: tuple  # the non-base entries, in the order of the rows of tau
    base: torch.Tensor  # flattened base in the compute dtype
    tau: torch.Tensor  # n x d task vectors
    unchanged: bool = False  # no model changed this tensor: the output is the base


Prepare = Callable[[TensorGroup, dict], Prepared | None]


def stats_tensors(
    stats: dict, experts, dtype: torch.dtype, device
) -> tuple[ClipBounds, torch.Tensor, torch.Tensor]:
    """(bounds, threshold, top) rows for ``experts`` from the per-model cache."""
    rows = [stats[e.id] for e in experts]

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(r, name) for r in rows], dtype=dtype, device=device)

    high = column("high")
    return ClipBounds(torch.minimum(column("low"), high), high), column("threshold"), column("top")


# ---------------------------------------------------------------- plan discovery


def _running_executor() -> tuple[ExecuteMergeMethodTask | None, Executor | None]:
    frame = sys._getframe(1)
    task = None
    while frame is not None:
        owner = frame.f_locals.get("self")
        if task is None and isinstance(owner, ExecuteMergeMethodTask):
            task = owner
        if isinstance(owner, Executor):
            return task, owner
        frame = frame.f_back
    return task, None


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
        if task.parameters["pcb_scope"] != "model":
            raise ScopeError(
                f"pcb: parameter 'pcb_scope' is 'model' for some tensors but "
                f"{task.parameters['pcb_scope']!r} for '{task.output_weight.name}'; "
                "allowed: one pcb_scope for the whole merge (no gradients or filters)"
            )
        for name in SHARED_ONLY:
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


def _group_of(task: ExecuteMergeMethodTask, tensors: dict, device) -> TensorGroup | None:
    """The group ``ExecuteMergeMethodTask.execute`` would pass to merge_group (or None)."""
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


class _Inputs:
    """Re-runs the input tasks of all pcb tasks, one group at a time, on demand."""

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
        for handle, value in sub._run(quiet=True):
            task = handle.task()
            if isinstance(task, BuildTokenizer):
                self.cached[task] = value
                continue
            for user in self.users[task]:
                yield user, value


# ---------------------------------------------------------------- the statistics


def _params_of(task: ExecuteMergeMethodTask, group: TensorGroup) -> dict:
    params = dict(task.parameters.items())
    params["weight"] = {e.id: task.input_parameters[e.id]["weight"] for e in group.non_base}
    return params


def compute(
    executor: Executor,
    tasks: list[ExecuteMergeMethodTask],
    prepare: Prepare,
) -> dict[ModelReference, ModelStats]:
    shared = _check_shared(tasks)
    pcb_ratio, clamp_ratio = shared["pcb_ratio"], shared["clamp_ratio"]
    inputs = _Inputs(executor, tasks)
    device = executor.math_device

    def prepared() -> Iterator[Prepared]:
        for task, tensors in inputs:
            group = _group_of(task, tensors, device)
            if group is None:
                continue
            p = prepare(group, _params_of(task, group))
            if p is not None:
                yield p

    dtypes: dict = {}
    counts: dict = {}

    def check(p: Prepared) -> None:
        for entry in p.experts:
            if dtypes.setdefault(entry.id, p.tau.dtype) != p.tau.dtype:
                raise ScopeError(
                    f"pcb: pcb_scope: model needs one compute dtype per model, but "
                    f"'{entry.id}' has tensors in {dtypes[entry.id]} and {p.tau.dtype}; "
                    "allowed: inputs that are all float64 or all not float64 (or set dtype:)"
                )
            if counts.setdefault(entry.id, len(p.experts)) != len(p.experts):
                raise ScopeError(
                    f"pcb: pcb_scope: model needs the same number of models in every tensor "
                    f"(the intra-balancing exp(n x^2) is scaled per model row), but "
                    f"'{entry.id}' is merged with {counts[entry.id]} and with "
                    f"{len(p.experts)} models; allowed: the same models in every slice, "
                    "or pcb_scope: tensor"
                )

    def select(ranks_of: Callable, rows: Callable, first: bool = False) -> dict:
        selectors: dict = {}
        while True:
            for p in prepared():
                if first:
                    check(p)
                for entry, row in rows(p):
                    if entry.id not in selectors:
                        selectors[entry.id] = StreamingSelector(row.dtype, ranks_of)
                    selectors[entry.id].feed(row)
            first = False
            for s in selectors.values():
                s.advance()
            if all(s.done for s in selectors.values()):
                return {m: (s.values(), s.total) for m, s in selectors.items()}

    def magnitudes(p: Prepared):
        return [(e, p.tau[i].abs()) for i, e in enumerate(p.experts)]

    selected = select(lambda d: list(quantile_indices(d, clamp_ratio)), magnitudes, first=True)
    if not selected:
        return {}
    bounds = {m: values for m, (values, _) in selected.items()}

    tops: dict = {}

    def balanced(p: Prepared):
        low = torch.tensor(
            [bounds[e.id][0] for e in p.experts], dtype=p.tau.dtype, device=p.tau.device
        )
        high = torch.tensor(
            [bounds[e.id][1] for e in p.experts], dtype=p.tau.dtype, device=p.tau.device
        )
        _, score = scores(p.tau, ClipBounds(torch.minimum(low, high), high))
        rows = []
        for i, e in enumerate(p.experts):
            top = float(score[i].max())
            tops[e.id] = max(tops.get(e.id, top), top)
            rows.append((e, score[i]))
        return rows

    cuts = select(lambda d: [cut_index(d, pcb_ratio)], balanced)
    return {
        m: ModelStats(
            low=bounds[m][0],
            high=bounds[m][1],
            threshold=cuts[m][0][0],
            top=tops[m],
            elements=cuts[m][1],
        )
        for m in bounds
    }


_CACHE: weakref.WeakKeyDictionary[Executor, dict] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def statistics(method_name: str, prepare: Prepare) -> dict[ModelReference, ModelStats]:
    """Whole-model statistics for the merge that is running this call (cached per run)."""
    task, executor = _running_executor()
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
            _CACHE[executor] = compute(executor, tasks, prepare)
            LOG.info("pcb_scope: model: statistics done in %.1f s", time.perf_counter() - start)
        return _CACHE[executor]


# ---------------------------------------------------------------- the parameter

SCOPES = ("tensor", "model")


@dataclass(frozen=True)
class ScopeParameter(ParameterSpec):
    """``pcb_scope``: a string choice whose error names the parameter and the choices."""

    def validate(self, value: Any) -> str:
        if value not in SCOPES:
            raise ValueError(
                f"pcb: parameter '{self.name}' got {value!r}; allowed: one of "
                f"{', '.join(SCOPES)} (where PCB takes its statistics: per tensor, or over "
                "all tensors of each model as in the paper's code)"
            )
        return value


PCB_SCOPE = ScopeParameter(
    "pcb_scope",
    str,
    ParameterScope.SHARED,
    default="tensor",
    description="statistics per tensor or over the whole model",
)
