"""Command line and orchestration of the quality benchmark (see ``quality.py``)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import _quality_evolve
import click
import torch
from _quality_methods import METHODS, Method, configurations, merge, scored
from _quality_report import bootstrap_difference, rewrite_report, write_outputs
from _quality_setup import (
    QUICK_REGIMES,
    REGIMES,
    VAL_SEED,
    Regime,
    bench,
    recorded_seconds,
    rescore_split,
)

from mergekit_pcb.tiny import save_model

HERE = Path(__file__).resolve().parent
# The search's warm-up: a 3 x 3 lambda x pcb_ratio sweep (9 of the grid-size budget).
SWEEP = (3, 3)
METHODS_BY_LABEL = {m.label: m for m in METHODS}
SEARCHES = {"evolve": "pcb + evolve", "random": "pcb + random search"}


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


def _checkpoints(grid: int, factor: int) -> list[int]:
    """Budgets at which the search curves are scored on test: half the grid, then k x grid."""
    return sorted({max(1, grid // 2), *(grid * k for k in range(1, factor + 1))})


def _search_curves(
    regime, seed, active, on_disk, tasks, base_state, experts, val_score, rescore_score, cache_dir
):
    """Per search kind, its candidates (values + validation score) at the largest budget,
    and for evolve the index of its own result (``evolve_pick``)."""
    grid = len(configurations(METHODS_BY_LABEL["pcb"], regime.scales, regime.densities))
    out = {}
    for kind in SEARCHES:
        factors = [m.budget_factor for m in active if m.via == kind]
        if not factors:
            continue
        budget = grid * max(factors)
        if kind == "evolve":
            slug = f"evolve-seed{seed}-{regime.name}"
            candidates, evolve_pick = _quality_evolve.evolve(
                cache_dir / slug,
                on_disk,
                tasks,
                val_score.own,
                n_val=regime.n_val,
                val_seed=VAL_SEED,
                budget=budget,
                scales=regime.scales,
                densities=regime.densities,
                seed=seed,
                sweep=_sweep(grid),  # sized for 1x: the 4x run's first candidates are 1x's
                rescore_top=regime.rescore_top,
                n_rescore=regime.n_rescore,
                own_rescore=rescore_score.own if rescore_score else None,
            )
        else:
            pcb = METHODS_BY_LABEL["pcb"]
            points = _quality_evolve.random_points(
                budget, tasks, regime.scales, regime.densities, seed
            )
            candidates = []
            for values in points:
                state = merge(pcb, base_state, experts, _quality_evolve.params_of(values, tasks))
                candidates.append({"values": values, "val_normalized": val_score(state)[0]})
            evolve_pick = None
        out[kind] = {"grid": grid, "candidates": candidates, "evolve_pick": evolve_pick}
    return out


class _ValScore:
    """A merged state's validation criterion: (normalised accuracy, per-task accuracy)."""

    def __init__(self, evaluate, val, n_val, own):
        self.evaluate, self.val, self.n_val, self.own = evaluate, val, n_val, own

    def __call__(self, state):
        acc = _mean(self.evaluate(state, self.val, self.n_val))
        return _normalized(acc, self.own), acc


def _settings_key(regime: Regime, methods) -> str:
    """What a seed's results depend on besides the seed: reused results must match it.

    The merge, tuning and training code is hashed; this file's orchestration and the
    report are not, so --reuse-seeds trusts that an edit here did not change a seed's
    numbers (rerun without it after such an edit).
    """
    fields = regime.describe()
    fields.pop("seeds")
    names = ("_quality_methods.py", "_quality_evolve.py", "_quality_setup.py", "toy.py")
    sources = [HERE / name for name in names]
    blob = json.dumps(
        {
            "regime": fields,
            "methods": [m.label for m in methods],
            "code": [hashlib.sha256(f.read_bytes()).hexdigest() for f in sources],
        },
        sort_keys=True,
        default=list,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _Shared(NamedTuple):
    """What every seed of a regime uses: the trained family, its splits and scorer."""

    family: Any
    model: Any
    base_state: dict
    base_test: dict
    val: Any
    test: Any
    rescore: Any
    evaluate: Callable
    active: list


def _run_seed(regime, seed, shared: _Shared, log) -> dict:
    family, base_state, evaluate = shared.family, shared.base_state, shared.evaluate
    val, test, rescore, active = shared.val, shared.test, shared.rescore, shared.active
    experts = family.experts[seed]
    tasks = list(experts)
    needs_disk = any(m.via not in ("api", "random") for m in active)
    on_disk = (
        _save_checkpoints(
            shared.model,
            family.tokenizer,
            base_state,
            experts,
            family.cache_dir / f"disk-seed{seed}",
        )
        if needs_disk
        else None
    )
    # Every expert on every task: its own accuracy normalises, the rest shows forgetting.
    cross = {task: _mean(evaluate(experts[task], test, regime.n_test)) for task in experts}
    own_test = {task: cross[task][task] for task in experts}
    own_val = {task: _mean(evaluate(experts[task], val, regime.n_val))[task] for task in experts}
    val_score = _ValScore(evaluate, val, regime.n_val, own_val)
    rescore_score = None
    if regime.rescore_top:
        own_rescore = {
            task: _mean(evaluate(experts[task], rescore, regime.n_rescore))[task]
            for task in experts
        }
        rescore_score = _ValScore(evaluate, rescore, regime.n_rescore, own_rescore)
    result = {
        "seed": seed,
        "own_test": own_test,
        "own_val": own_val,
        "cross": cross,
        "base_normalized": _normalized(_mean(shared.base_test), own_test),
        "methods": {},
        "curves": {},
    }
    searches = _search_curves(
        regime,
        seed,
        active,
        on_disk,
        tasks,
        base_state,
        experts,
        val_score,
        rescore_score,
        family.cache_dir,
    )
    pcb = METHODS_BY_LABEL["pcb"]
    tested: dict[tuple[str, int], dict] = {}  # (kind, candidate index) -> test hits
    rescored: dict[tuple[str, int], float] = {}  # (kind, candidate index) -> rescore score

    def search_rescore(kind, index):
        if (kind, index) not in rescored:
            values = searches[kind]["candidates"][index]["values"]
            state = merge(pcb, base_state, experts, _quality_evolve.params_of(values, tasks))
            rescored[kind, index] = rescore_score(state)[0]
        return rescored[kind, index]

    def search_pick(kind, n):
        return _quality_evolve.pick(
            searches[kind]["candidates"],
            n,
            regime.rescore_top,
            lambda i: search_rescore(kind, i),
        )

    def search_test(kind, index):
        if (kind, index) not in tested:
            values = searches[kind]["candidates"][index]["values"]
            params = _quality_evolve.params_of(values, tasks)
            state = merge(pcb, base_state, experts, params)
            tested[kind, index] = evaluate(state, test, regime.n_test)
        return tested[kind, index]

    for method in active:
        if method.via in SEARCHES:
            run = searches[method.via]
            n = run["grid"] * method.budget_factor
            index = search_pick(method.via, n)
            cand = run["candidates"][index]
            values = cand["values"]
            best = {
                "params": {
                    "pcb_ratio": round(values["pcb_ratio"][0], 4),
                    "lambda": round(values["lambda"], 4),
                    "weights": [round(w, 3) for w in values["weight"]],
                    "candidates": n,
                },
                "val_normalized": cand["val_normalized"],
            }
            if regime.rescore_top:
                best["rescore_normalized"] = search_rescore(method.via, index)
            sweep = [best]
            hits = search_test(method.via, index)
        else:
            sweep = []
            for params in configurations(method, regime.scales, regime.densities):
                state = merge(method, base_state, experts, params, on_disk)
                norm, acc = val_score(state)
                sweep.append({"params": params, "val_normalized": norm, "val_per_task": acc})
            best = sweep[_quality_evolve.pick(sweep, len(sweep), 0, None)]
            if regime.rescore_top:  # the same re-ranking of the finalists as the searches
                order = sorted(range(len(sweep)), key=lambda i: -sweep[i]["val_normalized"])
                for i in order[: regime.rescore_top]:
                    state = merge(method, base_state, experts, sweep[i]["params"], on_disk)
                    sweep[i]["rescore_normalized"] = rescore_score(state)[0]
                scores = {i: sweep[i]["rescore_normalized"] for i in order[: regime.rescore_top]}
                top = regime.rescore_top
                best = sweep[_quality_evolve.pick(sweep, len(sweep), top, scores.get)]
            chosen = merge(method, base_state, experts, best["params"], on_disk)
            hits = evaluate(chosen, test, regime.n_test)
        acc = _mean(hits)
        result["methods"][method.label] = {
            "chosen": best["params"],
            "val_normalized": best["val_normalized"],
            "test_per_task": acc,
            "test_normalized": _normalized(acc, own_test),
            "hits": hits,
            "sweep": sweep,
        }
        log(
            f"seed {seed} {method.label:24s} val {best['val_normalized']:.3f} "
            f"test {result['methods'][method.label]['test_normalized']:.3f} "
            f"with {best['params']}"
        )
    if "evolve" in searches:  # the search's own merge and mergekit's agree on its best
        run = searches["evolve"]
        last = len(run["candidates"])
        index = search_pick("evolve", last)
        result["evolve_pick_agrees"] = index == run["evolve_pick"]
        if not result["evolve_pick_agrees"]:
            log(f"seed {seed}: warning: evolve picked #{run['evolve_pick']}, this run #{index}")
        params = _quality_evolve.params_of(run["candidates"][index]["values"], tasks)
        again = val_score(merge(pcb, base_state, experts, params))[0]
        result["evolve_val_recheck"] = again - run["candidates"][index]["val_normalized"]
        if abs(result["evolve_val_recheck"]) > 1e-9:
            log(f"seed {seed}: warning: evolve's best scores {again:.6f} when mergekit merges it")
    # Test score of the best-on-validation candidate after n scored candidates.
    for kind, run in searches.items():
        factor = max(m.budget_factor for m in active if m.via == kind)
        marks = _checkpoints(run["grid"], factor)
        best_at = {n: search_pick(kind, n) for n in marks}
        result["curves"][SEARCHES[kind]] = [
            {
                "candidates": n,
                "val_normalized": run["candidates"][i]["val_normalized"],
                "test_normalized": _normalized(_mean(search_test(kind, i)), own_test),
            }
            for n, i in best_at.items()
        ]
        result["curves"][SEARCHES[kind]][0]["all_val"] = [
            round(c["val_normalized"], 5) for c in run["candidates"]
        ]
    if "pcb" in result["methods"]:
        row = result["methods"]["pcb"]
        result["curves"]["pcb grid"] = [
            {
                "candidates": len(row["sweep"]),
                "val_normalized": row["val_normalized"],
                "test_normalized": row["test_normalized"],
            }
        ]
    return result


def run(
    regime: Regime,
    out_dir: Path,
    methods: tuple[Method, ...],
    log=print,
    *,
    reuse_seeds: bool = False,
) -> dict:
    """Every seed of ``regime``; with ``reuse_seeds``, seeds already in OUT/per_seed are kept."""
    start = time.perf_counter()
    family, model, val, test = bench(regime, log=log)
    rescore = rescore_split(regime)
    tokenizer = family.tokenizer
    base_state = family.base.state_dict()

    def evaluate(state, examples, n):
        return _per_task(scored(model, tokenizer, state, examples), regime, n)

    base_test = evaluate(base_state, test, regime.n_test)
    active = [m for m in methods if m.available()]
    skipped = [m.label for m in methods if not m.available()]
    key = _settings_key(regime, active)
    shared = _Shared(family, model, base_state, base_test, val, test, rescore, evaluate, active)
    seeds_dir = out_dir / "per_seed"
    seeds_dir.mkdir(parents=True, exist_ok=True)
    per_seed, reused = [], []
    for seed in regime.seeds:
        saved = seeds_dir / f"seed{seed}.pt"
        if reuse_seeds and saved.exists():
            record = torch.load(saved, weights_only=False)
            if record["key"] == key:
                log(f"seed {seed}: results reused from {saved}")
                per_seed.append(record["result"])
                reused.append(seed)
                continue
        seed_start = time.perf_counter()
        result = _run_seed(regime, seed, shared, log)
        result["seconds"] = time.perf_counter() - seed_start
        torch.save({"key": key, "result": result}, saved)
        per_seed.append(result)

    comparisons = {}
    labels = {m.label for m in active}
    pairs = [("pcb", "ties"), ("pcb", "task_arithmetic"), ("pcb", "dare_ties")]
    pairs += [("pcb (model scope)", "pcb")]
    for suffix in ("", " (4x)"):  # each search against the grid, and against each other
        pairs += [(f"pcb + evolve{suffix}", "pcb"), (f"pcb + random search{suffix}", "pcb")]
        pairs += [(f"pcb + evolve{suffix}", f"pcb + random search{suffix}")]
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
        "reused_seeds": reused,
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
@click.option(
    "--seeds",
    default=None,
    help="Comma-separated seeds instead of the regime's (e.g. 0,1,2 first, then all five "
    "with --reuse-seeds).",
)
@click.option(
    "--reuse-seeds",
    is_flag=True,
    help="Keep the results of seeds already in OUT/per_seed when they were made with the same "
    "regime, methods and benchmark code; run only the others.",
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
    seeds: str | None,
    reuse_seeds: bool,
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
        if seeds:
            try:
                chosen = tuple(int(x) for x in seeds.split(","))
            except ValueError:
                raise click.BadParameter(
                    f"{seeds!r}: comma-separated integers", param_hint="--seeds"
                ) from None
            regime = replace(regime, seeds=chosen)
        target = _out_for(out_dir, name)
        target.mkdir(parents=True, exist_ok=True)
        result = run(
            regime,
            target,
            METHODS,
            log=lambda msg: click.echo(msg, err=True),
            reuse_seeds=reuse_seeds,
        )
        result["command"] = shlex.join(["python", "benchmarks/quality.py", *sys.argv[1:]])
        write_outputs(result, target, plot_png=not no_plot)
        click.echo(
            json.dumps(
                {"regime": name, "out": str(target), "wall_seconds": round(result["wall_seconds"])}
            )
        )
