"""Why PCB does or does not beat TIES here: measurements on the benchmark's cached experts.

    python benchmarks/_quality_probe.py [--seed 0]

Prints, for one seed of the full regime (trained checkpoints come from the cache):
the cosine similarity of the experts' task vectors, the share of entries where the
experts disagree in sign, and PCB's validation score when its clip quantile, kept
ratio or statistics scope change around the values the benchmark chose, and TIES's
validation score beyond the shared grid's largest scale. Only the validation split is
used, so nothing here is tuned on test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy
from _quality_methods import METHODS, merge
from _quality_run import _mean, _normalized, _per_task, _save_checkpoints
from _quality_setup import FULL, build_family, model_config, splits

from mergekit_pcb.tiny import new_llama


@click.command()
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=1, show_default=True)
def main(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    regime = FULL
    family = build_family(regime, log=lambda m: None)
    experts = family.experts[seed]
    tasks = list(regime.tasks)
    base = family.base.state_dict()
    vectors = {
        t: torch.cat([(experts[t][k].float() - base[k].float()).flatten() for k in base])
        for t in tasks
    }
    stacked = torch.stack([vectors[t] for t in tasks])
    unit = stacked / stacked.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    signs = torch.sign(stacked)
    nonzero = (signs != 0).all(0)
    conflict = float(((signs.max(0).values != signs.min(0).values) & nonzero).float().mean())
    out = {
        "seed": seed,
        "task_vector_norms": {t: round(float(vectors[t].norm()), 4) for t in tasks},
        "cosine": {
            a: {b: round(float(cos[i, j]), 3) for j, b in enumerate(tasks)}
            for i, a in enumerate(tasks)
        },
        "sign_conflict_share": round(conflict, 4),
    }

    val, _ = splits(regime)
    model = new_llama(model_config(regime, family.tokenizer), seed=0)
    on_disk = _save_checkpoints(
        model, family.tokenizer, base, experts, family.cache_dir / f"disk-seed{seed}"
    )

    def score(state) -> float:
        model.load_state_dict(state)
        hits = _per_task(toy.correct(model, family.tokenizer, val), regime, regime.n_val)
        return _normalized(_mean(hits), own)

    own = {}
    for t in tasks:
        model.load_state_dict(experts[t])
        own[t] = _mean(_per_task(toy.correct(model, family.tokenizer, val), regime, regime.n_val))[
            t
        ]
    methods = {m.label: m for m in METHODS}
    pcb, scoped = methods["pcb"], methods.get("pcb (model scope)")
    rows = []
    for lam in (1.0, 1.4, 2.0):
        for ratio in (0.05, 0.1, 0.2, 0.4, 0.7, 1.0):
            for clamp in (1e-4, 0.01, 0.05):
                params = {"weight": 1.0, "lambda": lam, "pcb_ratio": ratio, "clamp_ratio": clamp}
                rows.append(
                    {**params, "val_normalized": round(score(merge(pcb, base, experts, params)), 4)}
                )
    if scoped is not None and scoped.available():
        for lam in (1.0, 1.4, 2.0):
            for ratio in (0.2, 0.4, 0.7):
                params = {"weight": 1.0, "lambda": lam, "pcb_ratio": ratio, "pcb_scope": "model"}
                state = merge(scoped, base, experts, params, on_disk)
                rows.append({**params, "val_normalized": round(score(state), 4)})
    out["pcb_val_sweep"] = rows
    # TIES chose the grid's largest scale on every seed: is its optimum beyond the grid?
    ties_rows = []
    for lam in (1.4, 2.0, 2.8, 4.0):
        for density in (0.4, 0.7, 1.0):
            params = {"weight": 1.0, "lambda": lam, "density": density}
            state = merge(methods["ties"], base, experts, params)
            ties_rows.append({**params, "val_normalized": round(score(state), 4)})
    out["ties_val_sweep"] = ties_rows
    click.echo(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
