"""The compared methods, declared as data, and their tuning on the validation split.

Every method gets the same budget: the regime's ``scales`` grid for its global scale
and, where it has one, the regime's ``densities`` grid for its kept fraction (TIES
and DARE ``density``, PCB ``pcb_ratio``). The best pair on the validation split is
then scored once on the test split. A row is added by appending to :data:`METHODS`.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import _quality_evolve
import torch
import toy
from mergekit.merge_methods import get, merge_state_dicts, registered_methods
from safetensors.torch import load_file

import mergekit_pcb  # noqa: F401  (registers ``pcb`` even when autoload is off)


def _accepts(method: str, parameter: str, value: object) -> bool:
    spec = {p.name: p for p in get(method).spec.parameters}.get(parameter)
    try:
        return spec is not None and spec.validate(value) == value
    except ValueError:
        return False


def _has_parameter(method: str, parameter: str) -> Callable[[], bool]:
    def check() -> bool:
        if method not in {m.spec.name for m in registered_methods()}:
            return False
        return parameter in {p.name for p in get(method).spec.parameters}

    return check


@dataclass(frozen=True)
class Method:
    """One row of the table.

    ``grid`` maps a mergekit parameter to the regime grid it sweeps (``"scale"`` or
    ``"density"``); ``fixed`` holds the parameters that are not tuned. ``uses_base``
    is False for ``linear``, which averages the experts alone.
    """

    label: str
    merge_method: str
    grid: dict[str, str] = field(default_factory=dict)
    fixed: dict[str, object] = field(default_factory=dict)
    uses_base: bool = True
    available: Callable[[], bool] = lambda: True
    # "api": mergekit.merge_methods.merge_state_dicts in memory; "run_merge": mergekit's
    # full pipeline on checkpoints on disk (what mergekit-yaml runs), needed where the
    # method looks beyond one tensor group, as pcb_scope: model does; "evolve": tuned
    # by ``mergekit-pcb evolve`` instead of the grid; "random": tuned by a random search
    # of the same space (both in _quality_evolve.py).
    via: str = "api"
    # For via="random": the search's budget in units of PCB's grid size (candidates).
    budget_factor: int = 1
    # For via="evolve": the run (budget as a multiple of the grid's examples scored,
    # optimizer, fidelity, label-free).
    search: _quality_evolve.EvolveSpec = field(default_factory=_quality_evolve.EvolveSpec)
    # False: left out of --quick (the test suite's run), to keep it short.
    quick: bool = True


METHODS: tuple[Method, ...] = (
    Method("linear", "linear", fixed={"weight": 1.0, "normalize": True}, uses_base=False),
    Method("task_arithmetic", "task_arithmetic", {"lambda": "scale"}, {"weight": 1.0}),
    Method("ties", "ties", {"lambda": "scale", "density": "density"}, {"weight": 1.0}),
    Method("dare_ties", "dare_ties", {"lambda": "scale", "density": "density"}, {"weight": 1.0}),
    Method("pcb", "pcb", {"lambda": "scale", "pcb_ratio": "density"}, {"weight": 1.0}),
    # Untuned (issue 22): what a user who runs one YAML once gets. No grid: nothing is
    # chosen on validation, so no examples are spent.
    Method("pcb (defaults)", "pcb", fixed={"weight": 1.0, "pcb_ratio": 0.1, "lambda": 1.0}),
    Method(
        "pcb (lambda: auto)",
        "pcb",
        fixed={"weight": 1.0, "pcb_ratio": 0.1, "lambda": "auto"},
        available=lambda: _accepts("pcb", "lambda", "auto"),
    ),
    Method(
        "pcb (auto)",
        "pcb",
        fixed={"weight": 1.0, "pcb_ratio": "auto", "lambda": "auto"},
        available=lambda: _accepts("pcb", "pcb_ratio", "auto"),
    ),
    Method(
        "pcb (model scope)",
        "pcb",
        {"lambda": "scale", "pcb_ratio": "density"},
        {"weight": 1.0, "pcb_scope": "model"},
        available=_has_parameter("pcb", "pcb_scope"),
        via="run_merge",
    ),
    *(
        Method(
            label,
            "pcb",
            via="evolve",
            available=_quality_evolve.available,
            search=spec,
            quick=quick,
        )
        for label, spec, quick in (
            ("pcb + evolve", _quality_evolve.EvolveSpec(), True),
            ("pcb + evolve (1/3 budget)", _quality_evolve.EvolveSpec(factor=1 / 3), True),
            ("pcb + evolve (4x)", _quality_evolve.EvolveSpec(factor=4), False),
            # The optimizers at the grid's examples, each with the same schedule; and the
            # default without the schedule (every candidate on the whole split).
            ("pcb + evolve (cmaes)", _quality_evolve.EvolveSpec(method="cmaes"), False),
            ("pcb + evolve (tpe)", _quality_evolve.EvolveSpec(method="tpe"), False),
            ("pcb + evolve (random)", _quality_evolve.EvolveSpec(method="random"), False),
            ("pcb + evolve (one fidelity)", _quality_evolve.EvolveSpec(rungs=1), False),
        )
    ),
    Method(
        "pcb + evolve (label-free)",
        "pcb",
        via="evolve",
        available=_quality_evolve.agreement_available,
        search=_quality_evolve.EvolveSpec(label_free=True),
        # Out of --quick: one more search per run; tests/test_evolve_agreement.py covers
        # the task type, the full benchmark the row.
        quick=False,
    ),
    Method("pcb + random search", "pcb", via="random"),
    Method("pcb + random search (4x)", "pcb", via="random", budget_factor=4),
)


def configurations(method: Method, scales, densities) -> list[dict[str, object]]:
    axes = {"scale": scales, "density": densities}
    names = list(method.grid)
    combos = itertools.product(*(axes[method.grid[n]] for n in names)) if names else [()]
    return [{**method.fixed, **dict(zip(names, values, strict=True))} for values in combos]


@torch.no_grad()
def merge(
    method: Method,
    base: dict[str, torch.Tensor],
    experts: dict[str, dict[str, torch.Tensor]],
    parameters: dict[str, object],
    on_disk: dict[str, Path] | None = None,
) -> dict[str, torch.Tensor]:
    """One merge through mergekit's registered method; DARE's coin flips are seeded.

    ``on_disk`` maps ``"__base__"`` and each task to a saved checkpoint of the same
    weights, for methods merged ``via="run_merge"``.
    """
    if method.via == "run_merge":
        if on_disk is None:
            raise ValueError(f"{method.label}: needs the checkpoints on disk (on_disk)")
        return _run_merge(method, on_disk, list(experts), parameters)
    models = dict(experts)
    if method.uses_base:
        models = {"__base__": base, **models}
    torch.manual_seed(0)
    return merge_state_dicts(
        models,
        method.merge_method,
        base="__base__" if method.uses_base else None,
        parameters=parameters,
    )


def _run_merge(method: Method, on_disk: dict[str, Path], tasks: list[str], parameters) -> dict:
    shared = {k: v for k, v in parameters.items() if k != "weight"}
    weight = parameters.get("weight", 1.0)  # one for all, or {task: weight}
    weights = weight if isinstance(weight, dict) else dict.fromkeys(tasks, weight)
    return run_merge_config(
        {
            "merge_method": method.merge_method,
            "base_model": str(on_disk["__base__"]),
            "models": [
                {"model": str(on_disk[t]), "parameters": {"weight": weights[t]}} for t in tasks
            ],
            "parameters": shared,
            "dtype": "float32",
        }
    )


def run_merge_config(config: dict) -> dict[str, torch.Tensor]:
    """Merge a mergekit config dict with mergekit's full pipeline; return the weights."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
    with tempfile.TemporaryDirectory(prefix="quality-merge-") as out:
        run_merge(MergeConfiguration.model_validate(config), out, options)
        state = {}
        for shard in sorted(Path(out).glob("*.safetensors")):
            state.update(load_file(shard))
    return state


def scored(model, tokenizer, state, examples) -> torch.Tensor:
    model.load_state_dict(state)
    return toy.correct(model, tokenizer, examples)
