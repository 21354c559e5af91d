"""One number to maximise from several task scores.

Each task's score is divided by the magnitude of the default configuration's
score on the same task (PCB defaults, all weights 1), floored per task type so a
default accuracy of 0 cannot blow the scale up, and signed so higher is better
(loss enters negated). A weighted mean of these relative scores is the
objective: every task counts in units of "its own baseline", so a task with
large raw numbers (a loss of 3.2 next to an accuracy of 0.4) cannot dominate,
and a better candidate always has a higher objective.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergekit_pcb.evolve.config import TaskSpec


@dataclass(frozen=True)
class Objective:
    tasks: tuple[TaskSpec, ...]
    scales: dict[str, float]

    @classmethod
    def from_default(cls, tasks, default_scores: dict[str, float]) -> Objective:
        scales = {t.name: max(abs(default_scores[t.name]), t.floor) for t in tasks}
        return cls(tuple(tasks), scales)

    def __call__(self, scores: dict[str, float]) -> float:
        total = sum(t.weight for t in self.tasks)
        return (
            sum(t.weight * t.sign * scores[t.name] / self.scales[t.name] for t in self.tasks)
            / total
        )
