"""CMA-ES (the ``cma`` package): a Gaussian around the best point so far, adapted by rank.

It starts at the best warm-up point (with ``optimizer.sweep``: the best of a coarse
lambda x pcb_ratio grid). Each round is one generation of ``popsize``; CMA-ES uses
only the order of a generation's members, so the fidelity ranking
(:func:`..fidelity.ranking`: rung reached, then objective there) is told as ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from mergekit_pcb.evolve.fidelity import ranking
from mergekit_pcb.evolve.optimizers import Observation, Point


class CMAES:
    def __init__(self, dimension: int, *, seed: int, popsize: int, rungs: int, sigma):
        self.dimension, self.seed, self.popsize = dimension, seed, popsize
        self.sigma = 0.2 if sigma is None else sigma
        self.es = None

    def start(self, x0: Point, warmup: Sequence[tuple[Point, Observation]]) -> None:
        with warnings.catch_warnings():  # cma's own note on a missing matplotlib misleads
            warnings.filterwarnings("ignore", "Could not import matplotlib", UserWarning)
            import cma

        self.es = cma.CMAEvolutionStrategy(
            list(x0),
            self.sigma,
            {"bounds": [0, 1], "popsize": self.popsize, "seed": self.seed + 1, "verbose": -9},
        )

    def ask(self, n: int) -> list[Point]:
        return [list(map(float, x)) for x in self.es.ask()][:n]

    def tell(self, xs: Sequence[Point], observations: Sequence[Observation]) -> None:
        order = ranking(observations)
        fitness = [0.0] * len(order)
        for place, i in enumerate(order):
            fitness[i] = float(place)  # minimised: the best has rank 0
        self.es.tell([list(x) for x in xs], fitness)
