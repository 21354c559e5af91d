"""Model-based samplers from optuna (``pip install 'mergekit-pcb[optuna]'``): TPE and
a Gaussian process, driven through optuna's ask/tell interface.

Every scored candidate is a trial over ``x0 .. x{d-1}`` in [0, 1]. A candidate that
reached the last rung is a finished trial with its objective there; one dropped
earlier is a pruned trial with its objective on each rung it reached (optuna's TPE
orders pruned trials by the step they reached, then their value there: the same
ranking as :func:`..fidelity.ranking`; the GP sampler learns from finished trials
only). The warm-up points are told as trials before the first ask.
"""

from __future__ import annotations

from collections.abc import Sequence

from mergekit_pcb.evolve.optimizers import Observation, Point


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError(
            "optimizer.method tpe/gp needs optuna: pip install 'mergekit-pcb[optuna]'"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class _Sampler:
    def __init__(self, dimension: int, *, seed: int, popsize: int, rungs: int, sigma):
        optuna = _optuna()
        self.optuna, self.rungs = optuna, rungs
        dist = optuna.distributions.FloatDistribution(0.0, 1.0)
        self.names = [f"x{i}" for i in range(dimension)]
        self.space = dict.fromkeys(self.names, dist)
        self.study = optuna.create_study(direction="maximize", sampler=self.sampler(seed))
        self.pending: list = []

    def sampler(self, seed: int):
        raise NotImplementedError

    def _record(self, x: Point, observation: Observation):
        optuna = self.optuna
        done = len(observation) == self.rungs
        return optuna.trial.create_trial(
            params={n: float(v) for n, v in zip(self.names, x, strict=True)},
            distributions=self.space,
            value=float(observation[-1]) if done else None,
            intermediate_values={r: float(v) for r, v in enumerate(observation) if v is not None},
            state=optuna.trial.TrialState.COMPLETE if done else optuna.trial.TrialState.PRUNED,
        )

    def start(self, x0: Point, warmup: Sequence[tuple[Point, Observation]]) -> None:
        for x, observation in warmup:
            self.study.add_trial(self._record(x, observation))

    def ask(self, n: int) -> list[Point]:
        self.pending = [self.study.ask(self.space) for _ in range(n)]
        return [[float(t.params[name]) for name in self.names] for t in self.pending]

    def tell(self, xs: Sequence[Point], observations: Sequence[Observation]) -> None:
        states = self.optuna.trial.TrialState
        for trial, observation in zip(self.pending, observations, strict=True):
            for rung, value in enumerate(observation):
                trial.report(float(value), rung)
            if len(observation) == self.rungs:
                self.study.tell(trial, float(observation[-1]))
            else:
                self.study.tell(trial, state=states.PRUNED)
        self.pending = []


class TPE(_Sampler):
    def sampler(self, seed: int):
        return self.optuna.samplers.TPESampler(seed=seed + 1, multivariate=True)


class GP(_Sampler):
    def sampler(self, seed: int):
        return self.optuna.samplers.GPSampler(seed=seed + 1)
