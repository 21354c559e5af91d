"""Command line and orchestration of the quality benchmark (see ``quality.py``)."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import _quality_evolve
import click
import torch
from _quality_methods import METHODS, Method, configurations, merge, run_merge_config, scored
from _quality_report import bootstrap_difference, rewrite_report, write_outputs
from _quality_setup import (
    QUICK_REGIMES,
    REGIMES,
    VAL_SEED,
    Regime,
    bench,
    recorded_seconds,
    splits,
)

from mergekit_pcb.tiny import save_model

HERE = Path(__file__).resolve().parent
# The search's warm-up: a 3 x 3 lambda x pcb_ratio sweep (9 of the grid-size budget).
SWEEP = (3, 3)
METHODS_BY_LABEL = {m.label: m for m in METHODS}


def _per_task(hits: torch.Tensor, regime: Regime, n: int) -> dict[str, torch.Tensor]:
    """Split a flat correctness vector (tasks in regime order, n each) by task."""
    return {task: hits[i * n : (i + 1) * n] for i, task in enumerate(regime.tasks)}


def _normalized(acc: dict[str, float], own: dict[str, float]) -> float:
    """Mean over tasks of merged accuracy / the expert's own accuracy on that task."""
    weak = [t for t in own if own[t] == 0]
    if weak:
        raise RuntimeError(
            f"the expert(s) for {', '.join(weak)} answer no example correctly; normalised "
            "accuracy is undefined. Train the experts longer (Regime.expert_steps/expert_lr)."
        )
    return sum(acc[t] / own[t] for t in own) / len(own)


def _mean(hits: dict[str, torch.Tensor]) -> dict[str, float]:
    return {t: float(h.float().mean()) for t, h in hits.items()}


def _save_checkpoints(model, tokenizer, base_state, experts, root: Path) -> dict[str, Path]:
    """Write base and experts as Hugging Face checkpoints for mergekit's full pipeline."""
    paths = {}
    for name, state in {"__base__": base_state, **experts}.items():
        path = root / name.strip("_")
        if not (path / "config.json").exists():
            model.load_state_dict(state)
            save_model(model, path, tokenizer)
        paths[name] = path.resolve()
    return paths


def _sweep(budget: int) -> tuple[int, int]:
    """SWEEP where it leaves CMA-ES at least as many candidates as it takes, else 2 x 2."""
    return SWEEP if budget >= 2 * (1 + SWEEP[0] * SWEEP[1]) else (2, 2)


def _evolve(method, regime, seed, on_disk, tasks, evaluate, own_val, cache_dir):
    """Tune with the search (as many candidates as PCB's grid has points); merge its best."""
    val, _ = splits(regime)
    grid = len(configurations(METHODS_BY_LABEL["pcb"], regime.scales, regime.densities))
    slug = "".join(c if c.isalnum() else "-" for c in method.label)
    config = _quality_evolve.search(
        cache_dir / f"{slug}-seed{seed}-{regime.name}",
        on_disk,
        tasks,
        n_val=regime.n_val,
        val_seed=VAL_SEED,
        budget=grid * method.budget_factor,
        scales=regime.scales,
        densities=regime.densities,
        seed=seed,
        sweep=_sweep(grid * method.budget_factor),
    )
    state = run_merge_config(config)
    acc = _mean(evaluate(state, val, regime.n_val))
    weights = [m["parameters"]["weight"] for m in config["models"]]
    params = {**config["parameters"], "weights": [round(w, 3) for w in weights]}
    params = {k: round(v, 4) if isinstance(v, float) else v for k, v in params.items()}
    best = {"params": params, "val_normalized": _normalized(acc, own_val), "val_per_task": acc}
    return best, state


def run(regime: Regime, out_dir: Path, methods: tuple[Method, ...], log=print) -> dict:
    start = time.perf_counter()
    family, model, val, test = bench(regime, log=log)
    tokenizer = family.tokenizer
    base_state = family.base.state_dict()

    def evaluate(state, examples, n):
        return _per_task(scored(model, tokenizer, state, examples), regime, n)

    base_test = evaluate(base_state, test, regime.n_test)
    active = [m for m in methods if m.available()]
    skipped = [m.label for m in methods if not m.available()]
    per_seed = []
    needs_disk = any(m.via != "api" for m in active)
    for seed in regime.seeds:
        experts = family.experts[seed]
        on_disk = (
            _save_checkpoints(
                model, tokenizer, base_state, experts, family.cache_dir / f"disk-seed{seed}"
            )
            if needs_disk
            else None
        )
        # Every expert on every task: its own accuracy normalises, the rest shows forgetting.
        cross = {task: _mean(evaluate(experts[task], test, regime.n_test)) for task in experts}
        own_test = {task: cross[task][task] for task in experts}
        own_val = {
            task: _mean(evaluate(experts[task], val, regime.n_val))[task] for task in experts
        }
        seed_result = {
            "seed": seed,
            "own_test": own_test,
            "own_val": own_val,
            "cross": cross,
            "base_normalized": _normalized(_mean(base_test), own_test),
            "methods": {},
        }
        for method in active:
            if method.via == "evolve":
                best, chosen = _evolve(
                    method,
                    regime,
                    seed,
                    on_disk,
                    list(experts),
                    evaluate,
                    own_val,
                    family.cache_dir,
                )
                sweep = [best]
            else:
                sweep = []
                for params in configurations(method, regime.scales, regime.densities):
                    state = merge(method, base_state, experts, params, on_disk)
                    acc = _mean(evaluate(state, val, regime.n_val))
                    sweep.append(
                        {
                            "params": params,
                            "val_normalized": _normalized(acc, own_val),
                            "val_per_task": acc,
                        }
                    )
                best = max(sweep, key=lambda row: row["val_normalized"])
                chosen = merge(method, base_state, experts, best["params"], on_disk)
            hits = evaluate(chosen, test, regime.n_test)
            acc = _mean(hits)
            seed_result["methods"][method.label] = {
                "chosen": best["params"],
                "val_normalized": best["val_normalized"],
                "test_per_task": acc,
                "test_normalized": _normalized(acc, own_test),
                "hits": hits,
                "sweep": sweep,
            }
            log(
                f"seed {seed} {method.label:18s} val {best['val_normalized']:.3f} "
                f"test {seed_result['methods'][method.label]['test_normalized']:.3f} "
                f"with {best['params']}"
            )
        per_seed.append(seed_result)

    comparisons = {}
    labels = {m.label for m in active}
    pairs = [("pcb", "ties"), ("pcb", "task_arithmetic"), ("pcb", "dare_ties")]
    pairs += [("pcb (model scope)", "pcb"), ("pcb + evolve", "pcb"), ("pcb + evolve (4x)", "pcb")]
    for a, b in pairs:
        if {a, b} <= labels:
            comparisons[f"{a} - {b}"] = bootstrap_difference(per_seed, a, b, regime.bootstrap)
    return {
        "regime": regime.describe(),
        "cache_dir": str(family.cache_dir),
        "train_seconds": family.train_seconds,
        "recorded_train_seconds": recorded_seconds(family.cache_dir),
        "wall_seconds": time.perf_counter() - start,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "skipped_methods": skipped,
        "base_test_hits": base_test,
        "per_seed": per_seed,
        "comparisons": comparisons,
    }


def _out_for(out_dir: Path, regime_name: str) -> Path:
    """distilled (the first published regime) writes OUT itself; the others OUT/<name>."""
    return out_dir if regime_name == "distilled" else out_dir / regime_name


@click.command()
@click.option("--quick", is_flag=True, help="1 seed, 3 tasks, small grid (what the tests run).")
@click.option(
    "--regime",
    "regime_name",
    type=click.Choice([*REGIMES, "all"]),
    default="distilled",
    show_default=True,
    help="How the experts are trained: distilled (KL replay of the base), replay (50% replay "
    "of the base's mixture), lora (rank-8 LoRA with that replay), or all three. Results of "
    "regimes other than distilled go to OUT/<regime>/.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where results.json, RESULTS.md and quality.png go (default: benchmarks/ for a full "
    "run, required with --quick so a quick run never overwrites the published results).",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="torch threads; the benchmark's numbers do not depend on it beyond rounding.",
)
@click.option("--no-plot", is_flag=True, help="Skip the PNG (matplotlib is an optional extra).")
@click.option(
    "--report-only",
    is_flag=True,
    help="Rebuild RESULTS.md and quality.png from OUT/results.json (after editing the notes).",
)
def main(
    quick: bool,
    regime_name: str,
    out_dir: Path | None,
    threads: int,
    no_plot: bool,
    report_only: bool,
) -> None:
    """Train tiny task experts, merge them with every method, report exact match."""
    if quick and out_dir is None:
        raise click.UsageError("--quick needs --out DIR (the published results stay untouched)")
    out_dir = out_dir or HERE
    names = list(REGIMES) if regime_name == "all" else [regime_name]
    if not no_plot and importlib.util.find_spec("matplotlib") is None:
        click.echo(
            "warning: matplotlib is not installed (pip install 'mergekit-pcb[plot]'); "
            "no plot is drawn",
            err=True,
        )
        no_plot = True
    if report_only:
        for name in names:
            rewrite_report(_out_for(out_dir, name), plot_png=not no_plot)
        return
    torch.set_num_threads(threads)
    for name in names:
        torch.manual_seed(0)
        regime = QUICK_REGIMES[name] if quick else REGIMES[name]
        target = _out_for(out_dir, name)
        target.mkdir(parents=True, exist_ok=True)
        result = run(regime, target, METHODS, log=lambda msg: click.echo(msg, err=True))
        result["command"] = shlex.join(["python", "benchmarks/quality.py", *sys.argv[1:]])
        write_outputs(result, target, plot_png=not no_plot)
        click.echo(
            json.dumps(
                {"regime": name, "out": str(target), "wall_seconds": round(result["wall_seconds"])}
            )
        )
