"""Step 3 of the search: proposing candidates, behind one ask/tell interface.

An optimizer works in the unit cube (:class:`mergekit_pcb.evolve.candidate.Genome`
maps it to PCB's values). The driver calls, in this order and only so:

- ``start(x0, warmup)`` once: ``x0`` is the best point scored before the search
  (PCB's defaults, ``optimizer.start``, the sweep), ``warmup`` every such point with
  its observations;
- per round: ``ask(n)``, then, once every member is scored, ``tell(xs, observations)``
  (a partial last round is never told).

An observation is a candidate's objective on each rung it reached, lowest first
(:mod:`..fidelity`): only candidates on the same rung are compared by objective.
``--resume`` replays these calls with the recorded points and observations, so an
optimizer's proposals must be a pure function of its seed and the calls before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

Point = list[float]
Observation = Sequence[float]  # objective per rung reached, lowest rung first


class Optimizer(Protocol):
    def start(self, x0: Point, warmup: Sequence[tuple[Point, Observation]]) -> None: ...

    def ask(self, n: int) -> list[Point]: ...

    def tell(self, xs: Sequence[Point], observations: Sequence[Observation]) -> None: ...


# optimizer.method -> (module, class); imported on use (optuna only for the samplers).
METHODS = {
    "cmaes": ("cmaes", "CMAES"),
    "tpe": ("samplers", "TPE"),
    "gp": ("samplers", "GP"),
    "random": ("uniform", "Uniform"),
}


def make(
    method: str, dimension: int, *, seed: int, popsize: int, rungs: int, sigma: float | None
) -> Optimizer:
    """The optimizer ``optimizer.method`` names, for a ``dimension``-dimensional cube."""
    import importlib

    module, name = METHODS[method]
    cls = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    return cls(dimension, seed=seed, popsize=popsize, rungs=rungs, sigma=sigma)
