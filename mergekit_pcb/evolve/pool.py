"""Step 4 of the search: where candidates are scored, in this process or on Ray actors
(:mod:`.ray_pool`); both take a batch and call ``done`` as each result arrives."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from mergekit_pcb.evolve.evaluator import Evaluator, Result
from mergekit_pcb.evolve.layout import Values

Done = Callable[[int, Result], None]


class LocalPool:
    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator

    def evaluate(
        self,
        batch: list[Values],
        split: str = "search",
        done: Done | None = None,
        limits: Mapping[str, int] | None = None,
    ) -> list[Result]:
        results = []
        for i, values in enumerate(batch):
            results.append(self.evaluator.evaluate(values, split, limits))
            if done:
                done(i, results[-1])
        return results

    def close(self) -> None:
        pass
