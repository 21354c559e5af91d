"""Every use of mergekit's private API, in one place to audit on a mergekit upgrade.

mergekit >= 0.1.5 offers no public way to do these things; each function says what
it relies on. :func:`check` verifies that all of it is still there, and the test
suite calls it, so a mergekit release that moves any of it fails loudly, naming
this module, instead of breaking one feature at run time.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

LOG = logging.getLogger(__name__)
TORCH_DTYPE_DEPRECATION = "`torch_dtype` is deprecated! Use `dtype` instead!"
RUN_MERGE_PARAMETERS = ("merge_config", "out_path", "options", "config_source")
LOAD_CONFIG_PARAMETERS = ("config_source", "intermediate_dir")


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

    with without_torch_dtype_deprecation():
        return merge._model_out_config(config, arch_info, trust_remote_code=trust_remote_code)


@contextmanager
def without_torch_dtype_deprecation() -> Iterator[None]:
    """transformers' "`torch_dtype` is deprecated!" dropped inside the block only.

    mergekit 0.1.5's ``_model_out_config`` sets ``config.torch_dtype``, which recent
    transformers answers with that warning on every merge, demo and inspect; the user
    cannot act on it. It goes through ``Logger.warning_once``, whose cache is shared by
    the whole process: filtering the record would still mark the message as shown and
    hide it later from the user's own code. So on the one logger that emits it, and only
    inside the block, this message is dropped before that cache sees it; every other
    message, and this one outside the block, behaves as before.
    """
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers.configuration_utils")
    shared = getattr(type(logger), "warning_once", None)
    if shared is None:  # a transformers without warning_once: nothing to silence
        yield
        return
    previous = logger.__dict__.get("warning_once")
    emit = previous or functools.partial(shared, logger)

    def warning_once(*args: Any, **kwargs: Any) -> None:
        if not (args and args[0] == TORCH_DTYPE_DEPRECATION):
            emit(*args, **kwargs)

    logger.warning_once = warning_once
    try:
        yield
    finally:
        if previous is None:
            del logger.warning_once
        else:
            logger.warning_once = previous


def _parameters(function: Any) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


def _rebind(name: str, original: Any, replacement: Any) -> None:
    """Replace ``original`` wherever a loaded mergekit module bound it by name (``from
    mergekit.merge import run_merge`` in mergekit-yaml, mergekit-multi, ...)."""
    for loaded, module in list(sys.modules.items()):
        if loaded.split(".")[0] == "mergekit" and getattr(module, name, None) is original:
            setattr(module, name, replacement)


def guard_merge(module: Any, check_config: Callable[[Any, Any], bool]) -> bool:
    """``check_config(merge_config, config_source)`` (pcb's checks; True for a pcb config)
    before ``run_merge`` opens any model, and the torch_dtype warning dropped around the
    one call of ``run_merge`` that causes it.

    Relies on ``mergekit.merge.run_merge(merge_config, out_path, options, config_source)``
    and on ``run_merge`` calling the module-level ``_model_out_config``. Where either
    changed, mergekit is left as it is (with a warning; :func:`check` fails the tests).
    A config whose ``merge_method`` is not ``pcb`` runs exactly as before.
    """
    original = module.run_merge
    if getattr(original, "mergekit_pcb_guarded", False):
        return True
    if _parameters(original) != RUN_MERGE_PARAMETERS or not callable(
        getattr(module, "_model_out_config", None)
    ):
        LOG.warning(
            "mergekit %s changed run_merge; pcb's checks under mergekit-yaml are off "
            "(mergekit-pcb merge still checks)",
            _version(),
        )
        return False
    signature = inspect.signature(original)

    @functools.wraps(original)
    def run_merge(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)  # mergekit's own error for a wrong call
        arguments = bound.arguments
        if not check_config(arguments["merge_config"], arguments.get("config_source")):
            return original(*args, **kwargs)
        with local_folders_stay_local():
            return original(*args, **kwargs)

    run_merge.mergekit_pcb_guarded = True
    out_config = module._model_out_config

    @functools.wraps(out_config)
    def _model_out_config(*args: Any, **kwargs: Any) -> Any:
        with without_torch_dtype_deprecation():
            return out_config(*args, **kwargs)

    module._model_out_config = _model_out_config
    module.run_merge = run_merge
    _rebind("run_merge", original, run_merge)
    return True


def guard_run_yaml(module: Any, check_file: Callable[[Any], None]) -> bool:
    """``check_file(config_file)`` on the YAML of ``mergekit-yaml`` before mergekit's own
    parsing: pydantic would report ``pcb_ratio: null`` or a misspelt key
    of a filter entry as a traceback listing every union member it tried.

    Relies on ``mergekit.scripts.run_yaml.main`` being a click command whose callback
    receives ``config_file``.
    """
    command = module.main
    original = command.callback
    if getattr(original, "mergekit_pcb_guarded", False):
        return True
    if "config_file" not in {getattr(p, "name", None) for p in getattr(command, "params", ())}:
        LOG.warning(
            "mergekit %s changed mergekit-yaml's arguments; pcb's checks of its YAML "
            "before mergekit parses it are off (run_merge still checks)",
            _version(),
        )
        return False

    @functools.wraps(original)
    def callback(*args: Any, **kwargs: Any) -> Any:
        check_file(kwargs.get("config_file"))
        return original(*args, **kwargs)

    callback.mergekit_pcb_guarded = True
    command.callback = callback
    return True


def guard_multimerge(module: Any, check_source: Callable[[Any], None]) -> bool:
    """``check_source(config_source)`` on every ``mergekit-multi`` config before the first
    merge runs.

    Relies on ``mergekit.scripts.multimerge.main`` calling the module-level
    ``load_config(config_source, intermediate_dir)`` before it runs any merge.
    """
    original = module.load_config
    if getattr(original, "mergekit_pcb_guarded", False):
        return True
    if _parameters(original) != LOAD_CONFIG_PARAMETERS:
        LOG.warning(
            "mergekit %s changed multimerge.load_config; pcb's checks of all documents "
            "before the first merge are off (each merge is still checked)",
            _version(),
        )
        return False

    @functools.wraps(original)
    def load_config(config_source: Any, intermediate_dir: Any) -> Any:
        check_source(config_source)
        return original(config_source, intermediate_dir)

    load_config.mergekit_pcb_guarded = True
    module.load_config = load_config
    return True


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergekit")
    except PackageNotFoundError:
        return "?"


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
    from mergekit.scripts import multimerge, run_yaml

    if "config_file" not in {p.name for p in run_yaml.main.params}:
        missing.append("run_yaml.main's config_file")

    if _parameters(getattr(merge.run_merge, "__wrapped__", merge.run_merge)) != (
        RUN_MERGE_PARAMETERS
    ):
        missing.append(f"merge.run_merge({', '.join(RUN_MERGE_PARAMETERS)})")
    if _parameters(getattr(multimerge.load_config, "__wrapped__", multimerge.load_config)) != (
        LOAD_CONFIG_PARAMETERS
    ):
        missing.append(f"multimerge.load_config({', '.join(LOAD_CONFIG_PARAMETERS)})")
    if "load_config" not in inspect.unwrap(multimerge.main.callback).__code__.co_names:
        missing.append("multimerge.main calling load_config")
    if "_model_out_config" not in inspect.unwrap(merge.run_merge).__code__.co_names:
        missing.append("merge.run_merge calling _model_out_config")
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
        raise RuntimeError(
            f"mergekit {_version()} lacks {', '.join(missing)}, "
            f"which mergekit_pcb/mergekit_internals.py relies on; update that module"
        )
