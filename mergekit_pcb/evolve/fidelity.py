"""Steps 4 and 5 of the search: the slice each candidate is scored on, and who goes on.

A search pays in examples scored (for an LLM, minutes of lm-eval each), and most
candidates lose by far more than one small slice can tell. So a round of ``k``
candidates is scored on a small slice of every task first and only the best go on
to a larger one: synchronous successive halving. Rung ``r`` of ``R`` scores the first
``ceil(N_t / eta ** (R - 1 - r))`` examples of task ``t`` (``N_t`` its search split),
so the last rung is the whole split, and keeps ``max(1, floor(k_r / eta))`` of the
``k_r`` candidates it scored for the next. With ``rungs: 1`` every candidate is
scored on the whole split, as before this schedule existed.

Why synchronous, and written here rather than taken from a library: optuna's
pruners (and Hyperband/ASHA schedulers) promote asynchronously, a trial at a time
against the ones that happened to finish before it, so a candidate can be promoted
while a better one of the same round is dropped later; the rule here compares a
round's candidates only with each other, on the same examples, and is a pure
function of their scores, which keeps ``--resume`` exact. It is a few lines.

Scores on different slices are never compared as if equal: a round's ranking
(:func:`rank_key`) orders candidates by the rung they reached first, and by their
objective on that rung's slice only among those that reached it; the result of a
search is the best candidate on the last rung (the whole split).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """The rungs: the examples of each task a candidate is scored on at each rung."""

    rungs: int
    eta: int
    # Each task's search split in the unit its slices are cut in (rows; an lm_eval task's
    # limit per lm-eval task; None: not known ahead) ...
    sizes: Mapping[str, int | None]
    # ... and how many examples one unit is (an lm_eval task's number of lm-eval tasks).
    units: Mapping[str, int] | None = None

    @property
    def top(self) -> int:
        return self.rungs - 1

    def fraction(self, rung: int) -> float:
        return float(self.eta) ** (rung - self.top)

    def limits(self, rung: int) -> dict[str, int] | None:
        """Examples of each task at ``rung``; None on the top rung of a one-rung search
        (every task scores its whole split, as without a schedule)."""
        if self.rungs == 1:
            return None
        return {
            name: math.ceil(size * self.fraction(rung) - 1e-9)
            for name, size in self.sizes.items()
            if size is not None
        }

    def examples(self, rung: int) -> int | None:
        """Examples one candidate costs at ``rung`` (None when a task's size is unknown)."""
        if any(size is None for size in self.sizes.values()):
            return None
        limits = self.limits(rung) or self.sizes
        units = self.units or {}
        return sum(n * units.get(name, 1) for name, n in limits.items())  # type: ignore[misc]

    def survivors(self, k: int) -> list[int]:
        """How many of a round's ``k`` candidates each rung scores."""
        counts = [k]
        for _ in range(self.top):
            counts.append(max(1, counts[-1] // self.eta))
        return counts

    def round_cost(self, k: int) -> int | None:
        """Examples a round of ``k`` candidates costs (each rung scores its slice anew)."""
        costs = [self.examples(r) for r in range(self.rungs)]
        if any(c is None for c in costs):
            return None
        return sum(n * c for n, c in zip(self.survivors(k), costs, strict=True))  # type: ignore[misc]

    def check(self, key: str = "optimizer.fidelity") -> None:
        """Every rung must hold at least one example of every task, and more than the
        rung below (else the rung costs examples and tells nothing new)."""
        if self.rungs == 1:
            return
        for name, size in self.sizes.items():
            if size is None:
                continue
            slices = [size * self.fraction(r) for r in range(self.rungs)]
            ceiled = [math.ceil(x - 1e-9) for x in slices]
            if slices[0] < 1 or len(set(ceiled)) < self.rungs:
                most = 1 + int(math.log(size) / math.log(self.eta) + 1e-9)
                raise ValueError(
                    f"{key}: {self.rungs} rungs of eta {self.eta} slice task '{name}' "
                    f"({size} examples) into {', '.join(map(str, ceiled))}; every rung needs "
                    f"at least one example and more than the rung below: at most {most} "
                    "rungs for this task, or more examples"
                )


def promote(scores: Sequence[tuple[int, float]], keep: int) -> list[int]:
    """The ``keep`` members with the highest scores on one slice (``(member, score)``
    pairs), best first; on equal scores the lower member goes on. No member with a
    lower score than one that is dropped goes on."""
    ranked = sorted(scores, key=lambda pair: (-pair[1], pair[0]))
    return [member for member, _ in ranked[:keep]]


def rank_key(objectives: Sequence[float]) -> tuple[int, float]:
    """Sort key of a candidate scored on rungs ``0..len - 1`` (its objective on each):
    first the rung it reached, then its objective there. Two candidates' objectives
    are only compared on a rung both reached."""
    return (len(objectives) - 1, objectives[-1])


def ranking(observations: Sequence[Sequence[float]]) -> list[int]:
    """Indices of ``observations`` best first by :func:`rank_key` (ties: lower index)."""
    return sorted(
        range(len(observations)),
        key=lambda i: (tuple(-v for v in rank_key(observations[i])), i),
    )


@dataclass(frozen=True)
class Budget:
    """How much a search may score: candidates (the default included) or examples."""

    unit: str  # "candidates" | "examples"
    limit: int

    def remaining(self, candidates: int, examples: int) -> int:
        return self.limit - (candidates if self.unit == "candidates" else examples)

    def round_size(self, schedule: Schedule, popsize: int, left: int) -> int:
        """The largest round (at most ``popsize`` candidates) that ``left`` units pay for."""
        if self.unit == "candidates":
            return max(0, min(popsize, left))
        for k in range(popsize, 0, -1):
            cost = schedule.round_cost(k)
            if cost is not None and cost <= left:
                return k
        return 0
