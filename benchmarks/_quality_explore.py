"""Cheap regime exploration for the quality benchmark: one seed, validation split only.

    python benchmarks/_quality_explore.py                      # every regime below
    python benchmarks/_quality_explore.py -r r8 -r kl50-100    # some of them

For each regime (a variation of regime 8 of ``_quality_notes.md``, trained and cached
by the benchmark's own ``build_family``) it prints one Markdown row: the base's and
the experts' validation accuracy, how much each expert moves the *other* tasks
(forgetting if negative), the geometry of the task vectors, and the best validation
score of Task Arithmetic, TIES and PCB over a small grid, with the share of the
experts' gain over the base that Task Arithmetic keeps (the issue's bar: at least
50%). Everything is on the validation split and the best grid value is picked on that
same split, so the merge columns are optimistic and are not test numbers; the
benchmark itself reports test. The rows of ``_quality_notes.md`` from regime 15 on
come from this script (``--threads 1``).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _quality_methods import METHODS, configurations, merge, scored
from _quality_run import _mean, _normalized, _per_task
from _quality_setup import FULL, bench

# Regime 8 of _quality_notes.md (published before replay): the reference the rows vary.
R8 = dataclasses.replace(
    FULL,
    seeds=(0,),
    n_val=300,
    base_steps=400,
    expert_steps=60,
    expert_lr=1e-4,
    expert_replay=0.0,
    replay_source="base",
)


def _r8(**changes):
    return dataclasses.replace(R8, **changes)


KL = dict(replay_source="kl")
# name -> regime, in the order they were tried; seed 0 only. "kl50-w300-200" has the
# training fields of FULL (the published regime), so it reuses the benchmark's cache.
REGIMES = {
    "r8": R8,
    "replay50": _r8(expert_replay=0.5),
    "replay50-100": _r8(expert_replay=0.5, expert_steps=100),
    "w250-replay50": _r8(base_steps=250, expert_replay=0.5, expert_steps=100),
    "w200-replay50": _r8(base_steps=200, expert_replay=0.5, expert_steps=150, expert_lr=2e-4),
    "replay50-data": _r8(expert_replay=0.5, replay_source="data"),
    "kl50": _r8(expert_replay=0.5, **KL),
    "kl50-100": _r8(expert_replay=0.5, expert_steps=100, **KL),
    "kl50-w250": _r8(base_steps=250, expert_replay=0.5, expert_steps=150, expert_lr=2e-4, **KL),
    "kl50-150": _r8(expert_replay=0.5, expert_steps=150, **KL),
    "kl75-100": _r8(expert_replay=0.75, expert_steps=100, expert_lr=2e-4, **KL),
    "kl50-w300": _r8(base_steps=300, expert_replay=0.5, expert_steps=150, expert_lr=2e-4, **KL),
    "kl50-w300-200": _r8(base_steps=300, expert_replay=0.5, expert_steps=200, expert_lr=2e-4, **KL),
    "kl75-w300": _r8(base_steps=300, expert_replay=0.75, expert_steps=150, expert_lr=3e-4, **KL),
}
# A small grid, the same for the three methods' scale; TIES and PCB also tune density.
SCALES = (0.25, 0.5, 0.7, 1.0, 1.4)
DENSITIES = (0.2, 0.4, 0.7)


def explore(name: str, regime, log) -> str:
    start = time.perf_counter()
    family, model, val, _ = bench(regime, log=log)
    tokenizer = family.tokenizer
    base = family.base.state_dict()
    experts = family.experts[0]
    n = regime.n_val

    def evaluate(state) -> dict[str, float]:
        return _mean(_per_task(scored(model, tokenizer, state, val), regime, n))

    base_acc = evaluate(base)
    cross = {task: evaluate(experts[task]) for task in experts}
    own = {task: cross[task][task] for task in experts}
    base_norm = _normalized(base_acc, own)
    # How an expert moves the tasks it was not trained on, in points (mean over pairs).
    others = statistics.fmean(cross[e][t] - base_acc[t] for e in experts for t in experts if t != e)
    worst_other = min(cross[e][t] - base_acc[t] for e in experts for t in experts if t != e)
    # Geometry: the share of the task vectors' squared norm that lies in their mean (a
    # direction every expert moves along, which a sum adds up n times), and their cosines.
    vectors = torch.stack(
        [torch.cat([(experts[t][k] - base[k]).flatten() for k in base]) for t in experts]
    )
    common = float(vectors.mean(0).norm() ** 2 / vectors.norm(dim=1).pow(2).mean())
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T)[~torch.eye(len(experts), dtype=torch.bool)]
    by_label = {m.label: m for m in METHODS}
    best = {}
    for label in ("task_arithmetic", "ties", "pcb"):
        method = by_label[label]
        rows = []
        for params in configurations(method, SCALES, DENSITIES):
            acc = evaluate(merge(method, base, experts, params))
            rows.append((_normalized(acc, own), params))
        best[label] = max(rows, key=lambda r: r[0])

    def cell(label: str) -> str:
        value, params = best[label]
        tuned = ", ".join(f"{v:g}" for k, v in params.items() if k != "weight")
        return f"{100 * value:.1f} ({tuned})"

    kept = (best["task_arithmetic"][0] - base_norm) / (1 - base_norm)
    r = regime
    return (
        f"| {name} | {r.base_steps} | {r.expert_steps} @ {r.expert_lr:g}, replay "
        f"{r.expert_replay:g} ({r.replay_source}) | "
        + " ".join(f"{100 * base_acc[t]:.0f}" for t in r.tasks)
        + " | "
        + " ".join(f"{100 * own[t]:.0f}" for t in r.tasks)
        + f" | {100 * base_norm:.1f} | {100 * others:+.1f} (worst {100 * worst_other:+.0f}) | "
        f"{100 * common:.0f}% ({float(cos.min()):.2f}..{float(cos.max()):.2f}) | "
        f"{cell('task_arithmetic')} | {cell('ties')} | {cell('pcb')} | {100 * kept:.0f}% | "
        f"{time.perf_counter() - start:.0f} s |"
    )


@click.command()
@click.option("-r", "--regime", "names", multiple=True, type=click.Choice(list(REGIMES)))
@click.option("--threads", default=1, show_default=True)
def main(names: tuple[str, ...], threads: int) -> None:
    torch.set_num_threads(threads)
    click.echo(
        "| regime | base steps | experts | base val % (per task) | experts val % | base norm. "
        "| other tasks (pts) | common share (cos) | best TA | best TIES | best PCB "
        "| TA gain kept | time |"
    )
    click.echo("|" + "---|" * 13)
    for name in names or REGIMES:
        click.echo(explore(name, REGIMES[name], log=lambda m: click.echo(m, err=True)))


if __name__ == "__main__":
    main()
