"""Where candidates are scored: in this process, or on Ray actors (:mod:`.ray_pool`)."""

from __future__ import annotations

from collections.abc import Callable

from mergekit_pcb.evolve.evaluator import Evaluator
from mergekit_pcb.evolve.layout import Values

Result = tuple[dict[str, float], float]  # raw scores per task, seconds


class LocalPool:
    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator

    def evaluate(
        self,
        batch: list[Values],
        split: str = "search",
        done: Callable[[int, Result], None] | None = None,
    ) -> list[Result]:
        results = []
        for i, values in enumerate(batch):
            results.append(self.evaluator.evaluate(values, split))
            if done:
                done(i, results[-1])
        return results

    def close(self) -> None:
        pass
