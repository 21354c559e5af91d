"""Every use of mergekit's private API, in one place to audit on a mergekit upgrade.

mergekit >= 0.1.5 offers no public way to do these things; each function says what
it relies on. :func:`check` verifies that all of it is still there, and the test
suite calls it, so a mergekit release that moves any of it fails loudly, naming
this module, instead of breaking one feature at run time.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def planned_tensors(planner: Any) -> list[tuple[Any, Any]]:
    """Every output tensor of a merge and the task that makes it, as mergekit plans them.

    Relies on ``MergePlanner._plan()`` filling ``MergePlanner._tensors`` with
    ``(WeightInfo, task)`` pairs (``plan_to_disk`` wraps them in writer tasks, which
    would hide the parameters each tensor resolved).
    """
    planner._plan()
    return list(planner._tensors)


def model_out_config(config: Any, arch_info: Any, trust_remote_code: bool = False) -> Any:
    """The output model's config exactly as ``run_merge`` makes it (layer counts of slices).

    Relies on ``mergekit.merge._model_out_config``; planning with any other config
    would give slices other output layer indices than the merge gives them.
    """
    from mergekit import merge

    return merge._model_out_config(config, arch_info, trust_remote_code=trust_remote_code)


def run_quietly(executor: Any) -> Iterator[tuple[Any, Any]]:
    """``(handle, value)`` of each target task of ``executor``, without a progress bar.

    Relies on ``Executor._run(quiet=True)`` yielding the targets' values as they are
    made (``Executor.run`` collects them all first).
    """
    return executor._run(quiet=True)


def running_executor() -> tuple[Any, Any]:
    """The ``ExecuteMergeMethodTask`` and the ``Executor`` that are running this call.

    Relies on mergekit calling ``merge_group`` from ``ExecuteMergeMethodTask.execute``
    inside ``Executor._run``, so both are ``self`` of some frame above this one.
    (None, None) where the call comes from elsewhere (``merge_tensors``).
    """
    from mergekit.graph import Executor
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

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


_CASTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # executor -> {task: dtype}


def output_dtype() -> str | None:
    """The dtype mergekit casts this ``merge_group`` call's result to afterwards, if any.

    Relies on the running ``ExecuteMergeMethodTask`` (see :func:`running_executor`) and
    on the ``SaveTensor``/``ReturnTensor`` tasks in ``Executor.universe.tasks`` that take
    its result as ``tensor_task`` and cast it to their ``dtype`` (the config's
    ``out_dtype``); read once per executor. None where no such task is running.
    """
    from mergekit.io.tasks import ReturnTensor, SaveTensor

    task, executor = running_executor()
    if task is None or task.out_dtype:
        return getattr(task, "out_dtype", None)
    if executor is None:
        return None
    casts = _CASTS.get(executor)
    if casts is None:
        casts = {
            t.tensor_task: t.dtype
            for t in executor.universe.tasks
            if isinstance(t, (SaveTensor, ReturnTensor)) and t.dtype
        }
        _CASTS[executor] = casts
    return casts.get(task)


@contextmanager
def local_folders_stay_local() -> Iterator[None]:
    """In the model card, an existing local folder is local, without asking the Hub.

    mergekit 0.1.5's ``card.is_hf`` asks the Hugging Face Hub about every existing
    folder written as a bare name (``base``); offline that raises after the weights
    are written, leaving a model without its card. Relies on the card writer
    calling the module-level ``card.is_hf``.
    """
    from mergekit import card

    hub_check = card.is_hf
    card.is_hf = lambda path: False if os.path.exists(path) else hub_check(path)
    try:
        yield
    finally:
        card.is_hf = hub_check


def merge_method_tasks(executor: Any, method_name: str) -> list[Any]:
    """Every ``ExecuteMergeMethodTask`` of ``method_name`` that ``executor`` will run.

    Relies on ``Executor.universe.tasks`` holding every task of the merge.
    """
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    return [
        t
        for t in executor.universe.tasks
        if isinstance(t, ExecuteMergeMethodTask) and t.method_name == method_name
    ]


def extend_model_card(section: Callable[[Any], str]) -> None:
    """Append ``section(executor)`` to the model card ``run_merge`` writes.

    Relies on ``run_merge`` calling the module-level ``merge.generate_card`` after its
    ``Executor`` (the local ``exec``) has run every task. Idempotent.
    """
    from mergekit import merge

    card = merge.generate_card
    if getattr(card, "_pcb_sections", None) is not None:
        if section not in card._pcb_sections:
            card._pcb_sections.append(section)
        return

    def generate_card(*args, **kwargs):
        text = card(*args, **kwargs)
        executor = sys._getframe(1).f_locals.get("exec")
        if executor is None:
            return text
        return text + "".join(extra(executor) for extra in generate_card._pcb_sections)

    generate_card._pcb_sections = [section]
    merge.generate_card = generate_card


def genotype_tensor(genome: Any, genotype: Any) -> Any:
    """A flat genotype reshaped to (layer groups, models, parameters), as mergekit does.

    Relies on ``ModelGenome._to_torch``.
    """
    return genome._to_torch(genotype)


def check() -> None:
    """Raise if this mergekit lacks anything this module relies on."""
    from mergekit import card, merge
    from mergekit.evo.genome import ModelGenome
    from mergekit.graph import Executor
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
    from mergekit.plan import MergePlanner

    needed = {
        "MergePlanner._plan": getattr(MergePlanner, "_plan", None),
        "Executor._run": getattr(Executor, "_run", None),
        "ExecuteMergeMethodTask.execute": getattr(ExecuteMergeMethodTask, "execute", None),
        "card.is_hf": getattr(card, "is_hf", None),
        "merge._model_out_config": getattr(merge, "_model_out_config", None),
        "ModelGenome._to_torch": getattr(ModelGenome, "_to_torch", None),
    }
    missing = [name for name, found in needed.items() if not callable(found)]
    from mergekit.io.tasks import ReturnTensor, SaveTensor

    if "out_dtype" not in ExecuteMergeMethodTask.model_fields:
        missing.append("ExecuteMergeMethodTask.out_dtype")
    for cast in (SaveTensor, ReturnTensor):
        if not {"tensor_task", "dtype"} <= set(cast.model_fields):
            missing.append(f"{cast.__name__}.tensor_task/dtype")
    if "universe" not in Executor.__init__.__code__.co_names:
        missing.append("Executor.universe")
    if "_tensors" not in MergePlanner.__init__.__code__.co_names:
        missing.append("MergePlanner._tensors")
    run_merge = getattr(merge.run_merge, "__wrapped__", merge.run_merge)
    if not {"exec", "generate_card"} <= {
        *run_merge.__code__.co_varnames,
        *run_merge.__code__.co_names,
    }:
        missing.append("run_merge's exec and generate_card")
    if missing:
        import mergekit

        raise RuntimeError(
            f"mergekit {getattr(mergekit, '__version__', '?')} lacks {', '.join(missing)}, "
            f"which mergekit_pcb/mergekit_internals.py relies on; update that module"
        )
