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
import toy
from _quality_methods import METHODS, Method, configurations, merge, scored
from _quality_report import (
    bootstrap_difference,
    rewrite_report,
    summarize,
    verdicts,
    write_outputs,
)
from _quality_setup import (
    QUICK_REGIMES,
    REGIMES,
    VAL_SEED,
    Regime,
    bench,
    recorded_seconds,
    rescore_split,
)

from mergekit_pcb import chosen_scales
from mergekit_pcb.tiny import save_model

HERE = Path(__file__).resolve().parent
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


def _checkpoints(grid: int, factor: int) -> list[int]:
    """Budgets at which the random search's curve is scored on test: half the grid, then
    k x grid."""
    return sorted({max(1, grid // 2), *(grid * k for k in range(1, factor + 1))})


def grid_size(regime) -> int:
    return len(configurations(METHODS_BY_LABEL["pcb"], regime.scales, regime.densities))


def examples_of(regime, candidates: int, rescored: int) -> int:
    """Validation examples a tuner scores: ``candidates`` on n_val a task, then its
    ``rescored`` finalists again on n_rescore a task."""
    tasks = len(regime.tasks)
    return candidates * tasks * regime.n_val + rescored * tasks * regime.n_rescore


def grid_examples(regime) -> int:
    """The grid's validation examples: every point, then its re-ranked best."""
    grid = grid_size(regime)
    return examples_of(regime, grid, min(regime.rescore_top, grid))


def n_full(regime) -> int:
    """Validation examples a task at the search's last rung: what the grid re-ranks on,
    at most, and small enough that a third of the grid's examples pays for the default
    and the 3 x 3 sweep's round (about 4.1 full scorings) with room to spare."""
    return min(
        regime.n_rescore or regime.n_val, 300, grid_examples(regime) // (13 * len(regime.tasks))
    )


def _chosen(values: dict, candidates: int) -> dict:
    """A search's pick as the table shows it (one layer group)."""
    return {
        "pcb_ratio": round(values["pcb_ratio"][0], 4),
        "lambda": round(values["lambda"], 4),
        "weights": [round(w, 3) for w in values["weight"]],
        "candidates": candidates,
    }


def _random_search(regime, seed, active, tasks, base_state, experts, val_score):
    """The random search's candidates (values + validation score) at its largest budget."""
    factors = [m.budget_factor for m in active if m.via == "random"]
    if not factors:
        return None
    budget = grid_size(regime) * max(factors)
    pcb = METHODS_BY_LABEL["pcb"]
    points = _quality_evolve.random_points(budget, tasks, regime.scales, regime.densities, seed)
    candidates = []
    for values in points:
        state = merge(pcb, base_state, experts, _quality_evolve.params_of(values, tasks))
        candidates.append({"values": values, "val_normalized": val_score(state)[0]})
    return {"grid": grid_size(regime), "candidates": candidates}


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
    searches = {}
    random_run = _random_search(regime, seed, active, tasks, base_state, experts, val_score)
    if random_run is not None:
        searches["random"] = random_run
    n_search = n_full(regime)
    full_split = [  # the search's whole split: the validation stream's first n_search
        ex for task in regime.tasks for ex in toy.make_examples(task, n_search, VAL_SEED)
    ]
    full_score = None
    evolve_specs = [m.search for m in active if m.via == "evolve"]
    runs = {}
    if evolve_specs:
        own_full = {
            task: _mean(evaluate(experts[task], full_split, n_search))[task] for task in experts
        }
        full_score = _ValScore(evaluate, full_split, n_search, own_full)
        runs = _quality_evolve.evolve_runs(
            family.cache_dir / f"evolve-seed{seed}-{regime.name}",
            on_disk,
            tasks,
            own_full,
            evolve_specs,
            n_full=n_search,
            grid_examples=grid_examples(regime),
            scales=regime.scales,
            densities=regime.densities,
            seed=seed,
            val_seed=VAL_SEED,
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

    def values_test(values):
        key = json.dumps(values, sort_keys=True)
        if key not in tested:
            params = _quality_evolve.params_of(values, tasks)
            tested[key] = evaluate(merge(pcb, base_state, experts, params), test, regime.n_test)
        return tested[key]

    for method in active:
        scales: list = []
        if method.via == "random":
            run = searches["random"]
            n = run["grid"] * method.budget_factor
            index = search_pick("random", n)
            cand = run["candidates"][index]
            values = cand["values"]
            best = {
                "params": _chosen(values, n),
                "val_normalized": cand["val_normalized"],
            }
            if regime.rescore_top:
                best["rescore_normalized"] = search_rescore("random", index)
            examples = examples_of(regime, n, min(regime.rescore_top, n))
            sweep = [best]
            hits = values_test(values)
        elif method.via == "evolve":
            run = runs[method.search.key()]
            values = run["values"]
            best = {
                "params": _chosen(values, run["candidates"]),
                # The grid's criterion on the search's last-rung split (label-free: not
                # seen by the search; scored here).
                "val_normalized": full_score(
                    merge(pcb, base_state, experts, _quality_evolve.params_of(values, tasks))
                )[0],
                "search_seconds": run["cost"]["wall_seconds"],
                "scoring_seconds": run["cost"]["scoring_seconds"],
            }
            if run["val_normalized"] is not None:  # the search's merge is mergekit's
                best["val_recheck"] = best["val_normalized"] - run["val_normalized"]
                if abs(best["val_recheck"]) > 1e-9:
                    log(f"seed {seed}: warning: {method.label}'s best scores differently here")
            examples = run["examples_scored"]
            sweep = [best]
            hits = values_test(values)
        else:
            sweep = []
            for params in configurations(method, regime.scales, regime.densities):
                state = merge(method, base_state, experts, params, on_disk)
                norm, acc = val_score(state)
                sweep.append({"params": params, "val_normalized": norm, "val_per_task": acc})
            best = sweep[_quality_evolve.pick(sweep, len(sweep), 0, None)]
            finalists = 0
            if regime.rescore_top:  # the same re-ranking of the finalists as the searches
                order = sorted(range(len(sweep)), key=lambda i: -sweep[i]["val_normalized"])
                finalists = len(order[: regime.rescore_top])
                for i in order[: regime.rescore_top]:
                    state = merge(method, base_state, experts, sweep[i]["params"], on_disk)
                    sweep[i]["rescore_normalized"] = rescore_score(state)[0]
                scores = {i: sweep[i]["rescore_normalized"] for i in order[: regime.rescore_top]}
                top = regime.rescore_top
                best = sweep[_quality_evolve.pick(sweep, len(sweep), top, scores.get)]
            examples = examples_of(regime, len(sweep), finalists) if method.grid else 0
            with chosen_scales.collect() as scales:  # lambda: auto's choices, if any
                chosen = merge(method, base_state, experts, best["params"], on_disk)
            hits = evaluate(chosen, test, regime.n_test)
        acc = _mean(hits)
        result["methods"][method.label] = {
            "chosen": best["params"],
            "val_normalized": best["val_normalized"],
            "test_per_task": acc,
            "test_normalized": _normalized(acc, own_test),
            "examples_scored": examples,
            "hits": hits,
            "sweep": sweep,
        }
        if method.via not in ("evolve", "random") and scales:
            chose = {str(i): value for i, (_, value) in enumerate(scales)}
            result["methods"][method.label]["lambda_auto"] = chosen_scales.spread(chose)
        log(
            f"seed {seed} {method.label:26s} val {best['val_normalized']:.3f} "
            f"test {result['methods'][method.label]['test_normalized']:.3f} "
            f"examples {examples} with {best['params']}"
        )
    # Test score against validation examples scored: the random search after n candidates.
    if "random" in searches:
        run = searches["random"]
        factor = max(m.budget_factor for m in active if m.via == "random")
        curve = []
        for n in _checkpoints(run["grid"], factor):
            i = search_pick("random", n)
            curve.append(
                {
                    "candidates": n,
                    "examples": examples_of(regime, n, min(regime.rescore_top, n)),
                    "val_normalized": run["candidates"][i]["val_normalized"],
                    "test_normalized": _normalized(
                        _mean(values_test(run["candidates"][i]["values"])), own_test
                    ),
                }
            )
        curve[0]["all_val"] = [round(c["val_normalized"], 5) for c in run["candidates"]]
        result["curves"]["pcb + random search"] = curve
    # Every evolve row is a point; the default's budgets make its curve.
    for method in active:
        if method.via != "evolve":
            continue
        row = result["methods"][method.label]
        default_family = method.search.method is None and method.search.rungs is None
        label = "pcb + evolve" if default_family and not method.search.label_free else method.label
        result["curves"].setdefault(label, []).append(
            {
                "candidates": row["chosen"]["candidates"],
                "examples": row["examples_scored"],
                "val_normalized": row["val_normalized"],
                "test_normalized": row["test_normalized"],
            }
        )
    for points in result["curves"].values():
        points.sort(key=lambda p: p["examples"])
    if "pcb" in result["methods"]:
        row = result["methods"]["pcb"]
        result["curves"]["pcb grid"] = [
            {
                "candidates": len(row["sweep"]),
                "examples": row["examples_scored"],
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
    seeds_dir: Path | None = None,
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
    seeds_dir = seeds_dir or out_dir / "per_seed"
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
    # issue 22: untuned pcb, with the paper's lambda and with lambda: auto
    pairs += [("pcb (auto)", "pcb"), ("pcb (auto)", "pcb (defaults)"), ("pcb (defaults)", "pcb")]
    pairs += [("pcb (lambda: auto)", "pcb"), ("pcb (lambda: auto)", "pcb (defaults)")]
    for suffix in ("", " (4x)"):  # each search against the grid, and against each other
        pairs += [(f"pcb + evolve{suffix}", "pcb"), (f"pcb + random search{suffix}", "pcb")]
        pairs += [(f"pcb + evolve{suffix}", f"pcb + random search{suffix}")]
    # issue 23: the search at a third of the grid's examples, label-free, each optimizer
    # and the schedule against the grid; label-free against the labelled search.
    for variant in ("1/3 budget", "label-free", "cmaes", "tpe", "random", "one fidelity"):
        pairs += [(f"pcb + evolve ({variant})", "pcb")]
    pairs += [("pcb + evolve (label-free)", "pcb + evolve")]
    pairs += [("pcb + evolve (tpe)", "pcb + evolve (cmaes)")]
    pairs += [("pcb + evolve (random)", "pcb + evolve (cmaes)")]
    pairs += [("pcb + evolve", "pcb + evolve (one fidelity)")]
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


def _selected(methods: tuple[Method, ...], only: str) -> tuple[Method, ...]:
    labels = [x.strip() for x in only.split(",") if x.strip()]
    known = {m.label for m in methods}
    unknown = [x for x in labels if x not in known]
    if unknown or not labels:
        raise click.BadParameter(
            f"unknown row {unknown[0] if unknown else only!r}; allowed: "
            + ", ".join(repr(m.label) for m in methods),
            param_hint="--methods",
        )
    return tuple(m for m in methods if m.label in labels)


def _merge_rows(result: dict, target: Path, *, plot_png: bool) -> None:
    """Rerun rows into the published results: new rows are added, rows already there must
    come out the same per seed (the check that the rerun is the published benchmark), and
    every comparison and curve the rerun computed is added. The summary records the rerun."""
    published = json.loads((target / "results.json").read_text())
    partial = summarize(result)
    if json.loads(json.dumps(partial["regime"])) != published["regime"]:
        _refuse(partial, target, "the regime's settings differ from the published run's")
    same_seeds = [s["seed"] for s in published["methods"]["pcb"]["chosen"]] == [
        s["seed"] for s in result["per_seed"]
    ]
    if not same_seeds:
        _refuse(partial, target, "the seeds differ from the published run's")
    reproduced = {}
    for label, row in partial["methods"].items():
        old = published["methods"].get(label)
        if old is None:
            continue
        diff = max(
            abs(a - b)
            for a, b in zip(row["per_seed_normalized"], old["per_seed_normalized"], strict=True)
        )
        if diff > 1e-9:
            why = f"row {label!r} does not reproduce (by {100 * diff:.3f} points)"
            _refuse(partial, target, why)
        reproduced[label] = True
    merged = dict(published)
    merged["methods"] = {**published["methods"], **partial["methods"]}
    merged["comparisons"] = {**published["comparisons"], **partial["comparisons"]}
    # A curve is merged point by point (by examples scored): rerunning one row of a
    # several-row curve (e.g. `pcb + evolve` without its 1/3 and 4x rows) keeps the others.
    merged["curves"] = dict(published["curves"])
    for label, points in partial["curves"].items():
        kept = {p["examples"]: p for p in published["curves"].get(label, [])}
        kept.update({p["examples"]: p for p in points})
        merged["curves"][label] = sorted(kept.values(), key=lambda p: p["examples"])
    merged["search_vs_grid"] = {**published["search_vs_grid"], **partial["search_vs_grid"]}
    merged["verdicts"] = verdicts(merged)
    merged["reruns"] = [
        *published.get("reruns", []),
        {
            "command": result["command"],
            "methods": list(partial["methods"]),
            "reproduced_exactly": sorted(reproduced),
            "wall_seconds": round(result["wall_seconds"], 1),
            "machine": result["machine"],
        },
    ]
    (target / "results.json").write_text(json.dumps(merged, indent=1) + "\n")
    rewrite_report(target, plot_png=plot_png)


def _refuse(partial: dict, target: Path, why: str) -> None:
    path = target / "partial-results.json"
    path.write_text(json.dumps(partial, indent=1) + "\n")
    raise click.ClickException(
        f"--methods: {why}; nothing merged into {target / 'results.json'} "
        f"(the rerun's rows are in {path}; rerun the whole regime)"
    )


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
@click.option(
    "--methods",
    "only",
    default=None,
    help="Comma-separated row labels to rerun (e.g. 'pcb,pcb (auto)'); the regime's other rows "
    "stay as OUT/results.json has them. Rows already there must reproduce exactly or nothing "
    "is merged (the new rows then go to OUT/partial-results.json).",
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
    only: str | None,
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
    methods = tuple(m for m in METHODS if m.quick or not quick)
    if only is not None:
        methods = _selected(methods, only)
        if reuse_seeds:
            raise click.UsageError("--methods reruns its rows for every seed: drop --reuse-seeds")
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
        published = target / "results.json"
        if only is not None and not published.exists():
            raise click.UsageError(
                f"--methods merges rows into {published}, which does not exist: "
                "run the whole regime first"
            )
        result = run(
            regime,
            target,
            methods,
            log=lambda msg: click.echo(msg, err=True),
            reuse_seeds=reuse_seeds,
            seeds_dir=target / "per_seed" / "partial" if only is not None else None,
        )
        result["command"] = shlex.join(["python", "benchmarks/quality.py", *sys.argv[1:]])
        if only is None:
            write_outputs(result, target, plot_png=not no_plot)
        else:
            _merge_rows(result, target, plot_png=not no_plot)
        click.echo(
            json.dumps(
                {"regime": name, "out": str(target), "wall_seconds": round(result["wall_seconds"])}
            )
        )
