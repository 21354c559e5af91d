"""Does the label-free ``agreement`` score rank merges as the labelled criterion does?

    python benchmarks/_quality_agreement_probe.py [--regime distilled] [--seed 0]

On one seed of a regime (the benchmark's cached experts and checkpoints: run
``quality.py`` for that regime first), every point of PCB's grid (the regime's scales x
densities, weights 1) is merged and scored with the labelled criterion the searches
use (mean over tasks of validation exact match / the expert's own, on the first
``n_full`` validation examples a task) and with the agreement task's KL in a few
settings (``max_new_tokens`` 32 or 0, ``top_k`` 32 or 4). Prints, per setting, the
Spearman rank correlation of -KL with the criterion over the grid and the criterion of
the grid point the KL picks (against the best). Validation only: nothing here sees test.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy
from _quality_methods import METHODS, configurations, merge
from _quality_run import _mean, _normalized, n_full
from _quality_setup import REGIMES, VAL_SEED, build_family, model_config

from mergekit_pcb.evolve import agreement
from mergekit_pcb.evolve.config import MergeInputs, TaskSpec
from mergekit_pcb.tiny import new_llama

SETTINGS = ({"max_new_tokens": 32, "top_k": 32}, {"max_new_tokens": 0, "top_k": 32})
SETTINGS += ({"max_new_tokens": 32, "top_k": 4},)


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    for r, i in enumerate(order):
        ranks[i] = float(r)
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb)


@click.command()
@click.option("--regime", "name", type=click.Choice(list(REGIMES)), default="distilled")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=1, show_default=True)
def main(name: str, seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    regime = REGIMES[name]
    family = build_family(regime, log=lambda m: None)
    experts, base = family.experts[seed], family.base.state_dict()
    tasks = list(regime.tasks)
    disk = family.cache_dir / f"disk-seed{seed}"
    if not all((disk / t / "config.json").exists() for t in tasks):
        raise click.ClickException(f"{disk}: run benchmarks/quality.py --regime {name} first")
    n = n_full(regime)
    model = new_llama(model_config(regime, family.tokenizer), seed=0).eval()
    val = {t: toy.make_examples(t, n, VAL_SEED) for t in tasks}
    split = [ex for t in tasks for ex in val[t]]

    def criterion(state) -> float:
        model.load_state_dict(state)
        hits = toy.correct(model, family.tokenizer, split)
        per = {t: hits[i * n : (i + 1) * n] for i, t in enumerate(tasks)}
        return _normalized(_mean(per), own)

    own = {}
    for t in tasks:
        model.load_state_dict(experts[t])
        own[t] = float(toy.correct(model, family.tokenizer, val[t]).float().mean())
    pcb = next(m for m in METHODS if m.label == "pcb")
    grid = configurations(pcb, regime.scales, regime.densities)
    states = [merge(pcb, base, experts, params) for params in grid]
    labelled = [criterion(s) for s in states]
    out = {"regime": name, "seed": seed, "n_full": n, "points": len(grid), "settings": []}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = {}
        for t in tasks:
            prompts[str(disk / t)] = str(Path(tmp) / f"{t}.jsonl")
            rows = [json.dumps({"text": ex.prompt}) for ex in val[t]]
            Path(prompts[str(disk / t)]).write_text("\n".join(rows) + "\n")
        inputs = MergeInputs(
            str(disk / "base"), tuple(str(disk / t) for t in tasks), "float32", 1e-4, "cpu",
            False, None,
        )  # fmt: skip
        for setting in SETTINGS:
            spec = TaskSpec(name="agree", type="agreement", prompts=prompts, **setting)
            built = agreement.build([spec], inputs, family.tokenizer, Path(tmp) / "cache")
            score = agreement.scorer_for(spec, built.entries, family.tokenizer, None)
            kls = []
            for state in states:
                model.load_state_dict(state)
                kls.append(score(model)[0])
            pick = min(range(len(grid)), key=lambda i: kls[i])
            out["settings"].append(
                {
                    **setting,
                    "spearman(-kl, criterion)": round(spearman([-k for k in kls], labelled), 3),
                    "criterion_of_kl_pick": round(labelled[pick], 4),
                    "best_criterion": round(max(labelled), 4),
                    "kl_pick": grid[pick],
                    "expert_outputs": {
                        k: built.cost["agree"][k] for k in ("tokens", "bytes", "seconds")
                    },
                }
            )
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
