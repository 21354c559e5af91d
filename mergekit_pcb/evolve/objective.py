"""Step 4 of the search: one number to maximise from several task scores.

Each task's score is compared with the default configuration's score on the search
split (PCB defaults, all weights 1): ``1 + sign * (score - default) / scale``, where
``scale`` is the default's magnitude, floored per task type so that a default
accuracy of 0 cannot blow the scale up, and ``sign`` is -1 where lower is better
(losses). A weighted mean of these is the objective: every task counts in units of
"its own baseline", so a task with large raw numbers (a loss of 3.2 next to an
accuracy of 0.4) cannot dominate, a better candidate always has a higher
objective, and the default's value on the search split is 1 (on a fidelity slice
or on the test split it is what the default really scores there, in the same units).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mergekit_pcb.evolve.config import TaskSpec


@dataclass(frozen=True)
class Objective:
    tasks: tuple[TaskSpec, ...]
    reference: Mapping[str, float]  # the default's raw score per task
    scales: Mapping[str, float]

    @classmethod
    def from_default(cls, tasks, default_scores: Mapping[str, float]) -> Objective:
        scales = {t.name: max(abs(default_scores[t.name]), t.floor) for t in tasks}
        reference = {t.name: float(default_scores[t.name]) for t in tasks}
        return cls(tuple(tasks), reference, scales)

    def __call__(self, scores: Mapping[str, float]) -> float:
        total = sum(t.weight for t in self.tasks)
        return (
            sum(
                t.weight
                * (1 + t.sign * (scores[t.name] - self.reference[t.name]) / self.scales[t.name])
                for t in self.tasks
            )
            / total
        )
