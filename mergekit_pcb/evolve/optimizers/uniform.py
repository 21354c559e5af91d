"""Random search: points drawn uniformly from the cube, blind to every score.

The reference every other optimizer must beat at equal examples scored; with a
fidelity schedule it is successive halving over random points (Hyperband's core).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mergekit_pcb.evolve.optimizers import Observation, Point


class Uniform:
    def __init__(self, dimension: int, *, seed: int, popsize: int, rungs: int, sigma):
        self.dimension = dimension
        self.rng = np.random.default_rng(seed + 1)

    def start(self, x0: Point, warmup: Sequence[tuple[Point, Observation]]) -> None:
        pass

    def ask(self, n: int) -> list[Point]:
        return [list(map(float, row)) for row in self.rng.random((n, self.dimension))]

    def tell(self, xs: Sequence[Point], observations: Sequence[Observation]) -> None:
        pass
