"""The search's ask/tell optimizers and its fidelity schedule, on problems whose answer is
known (no model involved)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_pcb.evolve import optimizers
from mergekit_pcb.evolve.fidelity import Budget, Schedule, promote, ranking

CENTRE = (0.3, 0.7, 0.55)


def sphere(x) -> float:
    """Maximised at CENTRE, where it is 0."""
    return -sum((a - c) ** 2 for a, c in zip(x, CENTRE, strict=True))


def drive(method: str, rounds: int, popsize: int = 6, seed: int = 0, rungs: int = 1):
    """Ask/tell as the search does: start at the cube's centre, then whole rounds."""
    opt = optimizers.make(method, len(CENTRE), seed=seed, popsize=popsize, rungs=rungs, sigma=None)
    x0 = [0.5] * len(CENTRE)
    opt.start(x0, [(x0, [None] * (rungs - 1) + [sphere(x0)])])
    asked = []
    for _ in range(rounds):
        xs = opt.ask(popsize)
        assert len(xs) == popsize and all(0.0 <= v <= 1.0 for x in xs for v in x)
        asked += xs
        opt.tell(xs, [[None] * (rungs - 1) + [sphere(x)] for x in xs])
    return asked


@pytest.mark.parametrize(
    ("method", "rounds", "within"),
    [("cmaes", 12, 0.05), ("tpe", 10, 0.15), ("gp", 3, 0.1)],
)
def test_model_based_optimizers_find_the_known_optimum(method, rounds, within):
    if method in ("tpe", "gp"):
        pytest.importorskip("optuna")
    asked = drive(method, rounds)
    best = max(asked, key=sphere)
    assert math.dist(best, CENTRE) < within, (method, best)
    # ... and beat blind sampling of the same number of points (same seed).
    blind = max(drive("random", rounds), key=sphere)
    assert sphere(best) > sphere(blind)


@pytest.mark.parametrize("method", ["cmaes", "tpe", "gp", "random"])
def test_proposals_are_a_pure_function_of_seed_and_calls(method):
    """What --resume relies on: replaying the same calls gives the same points."""
    if method in ("tpe", "gp"):
        pytest.importorskip("optuna")
    # Four rounds of 4: the model-based samplers model the last one (after 10 trials).
    assert drive(method, 4, 4, seed=4) == drive(method, 4, 4, seed=4)
    assert drive(method, 4, 4, seed=4) != drive(method, 4, 4, seed=5)


def test_random_is_uniform_and_blind():
    xs = drive("random", 40)
    for d in range(len(CENTRE)):
        column = sorted(x[d] for x in xs)
        # Kolmogorov-Smirnov distance to the uniform law, 240 draws: well under 0.1.
        ks = max(abs((i + 1) / len(column) - v) for i, v in enumerate(column))
        assert ks < 0.1


def test_cmaes_is_told_ranks_of_the_fidelity_order():
    """Members that reached a higher rung rank first whatever their objective there."""
    observations = [[0.9], [0.1, 0.2], [0.5, 0.8, 0.3], [0.95], [0.4, 0.7]]
    assert ranking(observations) == [2, 4, 1, 3, 0]


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.floats(-5, 5, allow_nan=False) | st.sampled_from([0.0, 1.0]), max_size=12),
    keep=st.integers(1, 12),
)
def test_promotion_never_drops_a_better_candidate(scores, keep):
    pairs = list(enumerate(scores))
    up = promote(pairs, keep)
    assert len(up) == min(keep, len(scores)) and len(set(up)) == len(up)
    dropped = [m for m, _ in pairs if m not in up]
    for m in up:
        for d in dropped:
            assert scores[m] > scores[d] or (scores[m] == scores[d] and m < d)


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(30, 600), min_size=1, max_size=3),
    rungs=st.integers(1, 3),
    eta=st.integers(2, 3),
    k=st.integers(1, 12),
)
def test_schedule_costs_by_hand(sizes, rungs, eta, k):
    schedule = Schedule(rungs, eta, {f"t{i}": n for i, n in enumerate(sizes)})
    schedule.check()
    per_rung = []
    for r in range(rungs):
        # The slice of each task: its first ceil(N / eta ** (rungs - 1 - r)) examples.
        per_rung.append(sum(-(-n // eta ** (rungs - 1 - r)) for n in sizes))
    assert per_rung[-1] == sum(sizes)  # the last rung is the whole split
    assert per_rung == sorted(set(per_rung))  # strictly more examples each rung
    assert [schedule.examples(r) for r in range(rungs)] == per_rung
    alive, cost = k, 0
    for r in range(rungs):
        cost += alive * per_rung[r]
        alive = max(1, alive // eta)
    assert schedule.round_cost(k) == cost


def test_schedule_refuses_slices_below_one_example():
    with pytest.raises(ValueError, match=r"optimizer.fidelity: 4 rungs of eta 3 .*'t' \(20"):
        Schedule(4, 3, {"t": 20}).check()
    Schedule(3, 3, {"t": 20}).check()  # 3, 7, 20


def test_budget_round_size_is_the_largest_round_it_pays_for():
    schedule = Schedule(3, 3, {"a": 90, "b": 90})  # 20, 60, 180 examples a candidate
    budget = Budget("examples", 10_000)
    for left in (0, 259, 260, 300, 1000, 5000):
        k = budget.round_size(schedule, 9, left)
        if k:
            assert schedule.round_cost(k) <= left
        assert k == 9 or schedule.round_cost(k + 1) > left
    assert Budget("candidates", 5).round_size(schedule, 9, 3) == 3


def test_slices_are_cut_per_unit_and_counted_in_examples():
    """An lm_eval task's slice is its limit per lm-eval task (2 of them here): the slice
    passed on is per task, the examples counted are both tasks'."""
    schedule = Schedule(2, 3, {"harness": 30, "rows": 9}, {"harness": 2, "rows": 1})
    assert schedule.limits(0) == {"harness": 10, "rows": 3}
    assert schedule.examples(0) == 10 * 2 + 3
    assert schedule.examples(1) == 30 * 2 + 9
    assert Schedule(1, 3, {"harness": 30}, {"harness": 2}).examples(0) == 60
