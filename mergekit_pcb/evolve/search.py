"""The search driver: cache once, score the default, run CMA-ES, write the outputs.

Resume: every scored candidate is a flushed line of ``history.jsonl`` with its
generation, its place in the population and its unit-cube point. ``--resume``
replays the run through CMA-ES's ask/tell with the recorded points and
objectives (so CMA's state is what it was), scores only the members a generation
is still missing, and goes on. The run's fingerprint (``run.json``) must match:
a resumed run may raise ``optimizer.budget`` but change nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from mergekit_pcb.evolve import layout as layout_mod
from mergekit_pcb.evolve.cache import build as build_cache
from mergekit_pcb.evolve.cache import fingerprint as cache_fingerprint
from mergekit_pcb.evolve.candidate import Genome
from mergekit_pcb.evolve.config import EvolveConfig, EvolveConfigError, check_inputs
from mergekit_pcb.evolve.objective import Objective
from mergekit_pcb.evolve.report import (
    HISTORY,
    RUN,
    History,
    plot_progress,
    write_best_yml,
    write_report,
)

LOG = logging.getLogger("mergekit_pcb.evolve")


@dataclass
class RunOptions:
    resume: bool = False
    write_model: bool = False
    ray: bool = False
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    ray_actors: int | None = None
    progress: bool = True
    root: Path | None = None  # directory of SEARCH.yml, for python task imports


def _prepare_out(cfg: EvolveConfig, out: Path, resume: bool) -> History:
    out.mkdir(parents=True, exist_ok=True)
    run_file, history_file = out / RUN, out / HISTORY
    key = cfg.fingerprint()
    if resume:
        if not run_file.exists():
            raise EvolveConfigError(f"--resume: {out} holds no earlier search ({RUN} missing)")
        previous = json.loads(run_file.read_text())
        if previous.get("fingerprint") != key:
            raise EvolveConfigError(
                f"--resume: {out} was searched with a different config (only "
                "optimizer.budget may change); start a new OUT_DIR instead"
            )
    elif history_file.exists() and history_file.stat().st_size > 0:
        raise EvolveConfigError(
            f"{out} already holds a search ({HISTORY}); pass --resume to continue it "
            "or choose another OUT_DIR"
        )
    else:
        history_file.unlink(missing_ok=True)
    run_file.write_text(
        json.dumps(
            {"fingerprint": key, "config": cfg.model_dump(mode="json", by_alias=True)}, indent=2
        )
    )
    return History(history_file)


def _bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        unit="cand",
        dynamic_ncols=True,
    )


def run_search(cfg: EvolveConfig, out: Path, opts: RunOptions) -> dict:
    """Run (or resume) a search and write every output; returns report.json's content."""
    with warnings.catch_warnings():  # cma's own note on a missing matplotlib misleads here
        warnings.filterwarnings("ignore", "Could not import matplotlib", UserWarning)
        import cma

    out = Path(out)
    from mergekit_pcb.evolve.evaluator import load_tokenizer

    # Whatever the user's input or machine can get wrong fails before OUT_DIR is touched.
    check_inputs(cfg, opts.root, device=not opts.ray_address)
    load_tokenizer(cfg)
    layout = layout_mod.build_layout(cfg)
    planned, groups = layout_mod.tensor_groups(cfg, layout)
    genome = Genome.from_config(cfg, layout.groups)
    if genome.dimension == 0:
        raise EvolveConfigError("search: every quantity is fixed; give at least one range")

    history = _prepare_out(cfg, out, opts.resume)
    for task in cfg.evaluation.tasks:
        if not task.has_test:
            LOG.warning(
                "task '%s' has no test_data: its search score is not checked on held-out data",
                task.name,
            )

    cache_dir = Path(cfg.cache.dir) if cfg.cache.dir else out / "cache"
    t0 = time.perf_counter()
    with _bar(len(planned), 0, "statistics", opts.progress) as bar:
        cache = build_cache(
            planned,
            groups,
            cfg,
            cache_dir=cache_dir,
            memory_bytes=cfg.cache.memory_gb * 1e9,
            force_disk=opts.ray,
            progress=bar.update,
        )
    LOG.info("took the statistics of %d tensors in %.1f s", len(planned), time.perf_counter() - t0)
    del planned

    if opts.ray:
        from mergekit_pcb.evolve.ray_pool import RayPool

        pool = RayPool(
            cfg,
            cache_dir,
            cache_fingerprint(cfg, groups),
            opts.root,
            address=opts.ray_address,
            num_cpus=opts.ray_num_cpus,
            actors=opts.ray_actors,
        )
        local = None
    else:
        from mergekit_pcb.evolve.evaluator import Evaluator
        from mergekit_pcb.evolve.pool import LocalPool

        local = Evaluator(cfg, cache, opts.root)
        pool = LocalPool(local)
    try:
        return _optimise(cfg, out, opts, history, layout, groups, cache, genome, pool, cma)
    finally:
        pool.close()


def _warmup(cfg: EvolveConfig, genome: Genome, default_values) -> list[tuple[str, int, object]]:
    """(kind, member, values) scored after the default and before CMA-ES, in order.

    ``optimizer.start`` is one point (unnamed quantities at PCB's defaults);
    ``optimizer.sweep: [a, b]`` is an a x b grid over lambda and pcb_ratio at the
    midpoints of equal bins of each searched range (one point: the start's value),
    with every layer group at one ratio and the weights at the start's values.
    Everything is clipped into the searched ranges.
    """
    from mergekit_pcb.evolve.layout import Values

    opt = cfg.optimizer
    base = default_values
    if opt.start is not None:
        weights = opt.start.weight
        if weights is None:
            weights = base.weights
        elif not isinstance(weights, list):
            weights = (weights,) * len(base.weights)
        base = Values(
            (opt.start.pcb_ratio,) * len(base.pcb_ratio)
            if opt.start.pcb_ratio is not None
            else base.pcb_ratio,
            opt.start.lambda_ if opt.start.lambda_ is not None else base.lambda_,
            tuple(float(w) for w in weights),
        )
    base = genome.decode(genome.encode(base))
    points = [("start", 0, base)] if opt.start is not None else []
    if opt.sweep:

        def axis(name: str, n: int, at: float) -> list[float]:
            low, high = cfg.search.range(name)
            return [at] if n == 1 else [low + (i + 0.5) * (high - low) / n for i in range(n)]

        lambdas = axis("lambda", opt.sweep[0], base.lambda_)
        ratios = axis("pcb_ratio", opt.sweep[1], base.pcb_ratio[0])
        member = 0
        for lam in lambdas:
            for ratio in ratios:
                values = Values((ratio,) * len(base.pcb_ratio), lam, base.weights)
                points.append(("sweep", member, genome.decode(genome.encode(values))))
                member += 1
    return points


def _optimise(cfg, out, opts, history, layout, groups, cache, genome, pool, cma) -> dict:
    tasks = cfg.evaluation.tasks
    default_values = layout_mod.default_values(cfg, layout.groups)
    default = history.default()
    if default is None:
        ((scores, seconds),) = pool.evaluate([default_values])
        default = {
            "index": 0,
            "kind": "default",
            "generation": -1,
            "member": 0,
            "x": genome.encode(default_values),
            "values": default_values.to_json(),
            "scores": scores,
            "seconds": seconds,
        }
        objective = Objective.from_default(tasks, scores)
        default["objective"] = objective(scores)
        history.append(default)
    objective = Objective.from_default(tasks, default["scores"])

    opt = cfg.optimizer
    # ``budget`` counts every candidate: what the warm-up does not use, CMA-ES gets.
    searched = opt.budget - opt.warmup
    done_before = len(history.entries) - 1
    with _bar(opt.budget - 1, min(done_before, opt.budget - 1), "search", opts.progress) as bar:

        def record(kind, generation, member, x, values, result):
            scores, seconds = result
            history.append(
                {
                    "index": len(history.entries),
                    "kind": kind,
                    "generation": generation,
                    "member": member,
                    "x": x,
                    "values": values.to_json(),
                    "scores": scores,
                    "objective": objective(scores),
                    "seconds": seconds,
                }
            )
            bar.update(1)
            bar.set_postfix(best=f"{_best(history)['objective']:.4f}")

        warm = _warmup(cfg, genome, default_values)
        seen = {(e["kind"], e["member"]) for e in history.entries if e["generation"] == -1}
        todo = [(k, m, v) for k, m, v in warm if (k, m) not in seen]
        if todo:
            pool.evaluate(
                [v for _, _, v in todo],
                "search",
                lambda i, result: record(
                    todo[i][0], -1, todo[i][1], genome.encode(todo[i][2]), todo[i][2], result
                ),
            )
        # CMA-ES starts at the best warm-up candidate (the default when there is none).
        start = max(
            (e for e in history.entries if e["generation"] == -1), key=lambda e: e["objective"]
        )
        es = cma.CMAEvolutionStrategy(
            genome.encode(layout_mod.Values.from_json(start["values"])),
            opt.sigma,
            {"bounds": [0, 1], "popsize": opt.popsize, "seed": opt.seed + 1, "verbose": -9},
        )
        g = 0
        while g * opt.popsize < searched:
            # The last generation may be partial (budget is exact); CMA-ES is not told it.
            size = min(opt.popsize, searched - g * opt.popsize)
            xs = [list(map(float, x)) for x in es.ask()]
            recorded = history.generation(g)
            for member, entry in recorded.items():
                xs[member] = entry["x"]  # replay: CMA is told exactly what was scored
            missing = [m for m in range(size) if m not in recorded]
            batch = [genome.decode(xs[m]) for m in missing]
            if batch:
                pool.evaluate(
                    batch,
                    "search",
                    lambda i, result, g=g, missing=missing, batch=batch, xs=xs: record(
                        "search", g, missing[i], xs[missing[i]], batch[i], result
                    ),
                )
            if size == opt.popsize:
                fitness = {e["member"]: e["objective"] for e in history.generation(g).values()}
                es.tell(list(xs), [-fitness[m] for m in range(opt.popsize)])
            g += 1
    return _finish(cfg, out, opts, history, layout, groups, cache, objective, default, pool)


def _best(history: History) -> dict:
    """The highest objective among all scored candidates, the default included."""
    return max(history.entries, key=lambda e: e["objective"])


def _rescore(cfg, history: History, default: dict, pool) -> tuple[dict, dict | None]:
    """The result of the search: the best candidate, or with ``optimizer.rescore: k`` the
    best on the rescore split of the search's k best (ties: the better on the search).

    The search keeps the best of many noisy scores, so its winner's search score is
    biased up (winner's curse); scoring a few finalists on more examples ranks them by
    a score their selection did not use. The default is scored there too, for the scale.
    """
    from mergekit_pcb.evolve.layout import Values

    k = cfg.optimizer.rescore
    if not k:
        return _best(history), None
    ranked = sorted(history.entries, key=lambda e: e["objective"], reverse=True)[:k]
    batch = [default] + [e for e in ranked if e is not default]
    results = pool.evaluate([Values.from_json(e["values"]) for e in batch], "rescore")
    scores = {e["index"]: result[0] for e, result in zip(batch, results, strict=True)}
    objective = Objective.from_default(cfg.evaluation.tasks, scores[default["index"]])
    rows = [
        {
            "index": e["index"],
            "search_score": e["objective"],
            "rescore_score": objective(scores[e["index"]]),
            "scores": scores[e["index"]],
        }
        for e in ranked
    ]
    chosen = max(rows, key=lambda row: row["rescore_score"])  # first (best searched) on ties
    LOG.info(
        "rescored the %d best candidates: #%d is best there (%.6g; search score %.6g)",
        len(rows),
        chosen["index"],
        chosen["rescore_score"],
        chosen["search_score"],
    )
    info = {
        "top": k,
        "default_score": objective(scores[default["index"]]),
        "default_scores": scores[default["index"]],
        "candidates": rows,
        "best_index": chosen["index"],
    }
    return next(e for e in history.entries if e["index"] == chosen["index"]), info


def _finish(cfg, out, opts, history, layout, groups, cache, objective, default, pool) -> dict:
    from mergekit_pcb.evolve.layout import Values, check_reproduces, merge_config

    best, rescored = _rescore(cfg, history, default, pool)
    best_values = Values.from_json(best["values"])
    default_values = Values.from_json(default["values"])
    tasks = cfg.evaluation.tasks
    with_test = [t for t in tasks if t.has_test]
    without_test = [t.name for t in tasks if not t.has_test]

    test_default, test_best = None, None
    default_test_score = best_test_score = None
    if with_test:
        (test_default, _), (test_best, _) = pool.evaluate([default_values, best_values], "test")
        test_objective = Objective.from_default(with_test, test_default)
        default_test_score = test_objective(test_default)
        best_test_score = test_objective(test_best)

    merge_dict = merge_config(cfg, best_values, layout)
    check_reproduces(cfg, merge_dict, best_values, groups, cache.names)
    write_best_yml(
        out / "best.yml",
        merge_dict,
        f"mergekit-pcb evolve: best of {len(history.entries)} candidates, "
        f"objective {best['objective']:.6g} (default {default['objective']:.6g})",
    )
    report = {
        "default_score": default["objective"],
        "best_score": best["objective"],
        "default_test_score": default_test_score,
        "best_test_score": best_test_score,
        "objective": "weighted mean over tasks of sign * score / max(|default score|, floor);"
        " loss enters negated; higher is better",
        "best_values": best["values"],
        "best_index": best["index"],
        "candidates": len(history.entries),
        "tasks": {
            t.name: {
                "type": t.type,
                "weight": t.weight,
                "default_search": default["scores"][t.name],
                "best_search": best["scores"][t.name],
                "default_test": test_default.get(t.name) if test_default else None,
                "best_test": test_best.get(t.name) if test_best else None,
                "has_test_data": t.has_test,
            }
            for t in tasks
        },
        "tasks_without_test_data": without_test,
        "test_score_covers": [t.name for t in with_test],
    }
    if rescored is not None:
        report["best_rescore_score"] = next(
            row["rescore_score"]
            for row in rescored["candidates"]
            if row["index"] == rescored["best_index"]
        )
        report["rescore"] = rescored
    if without_test:
        report["warning"] = (
            f"task(s) {', '.join(without_test)} have no test_data: their search scores are "
            "not checked on held-out data and the test scores leave them out"
        )
        LOG.warning(report["warning"])
    write_report(out / "report.json", report)
    plot_progress(out / "progress.png", history)
    LOG.info(
        "default %.6g -> best %.6g on the search split; test: %s -> %s",
        report["default_score"],
        report["best_score"],
        _fmt(default_test_score),
        _fmt(best_test_score),
    )
    if opts.write_model:
        write_model(out / "best.yml", out / "model", cfg)
    return report


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}"


def write_model(best_yml: Path, model_dir: Path, cfg: EvolveConfig) -> None:
    """The best model, written by mergekit itself from best.yml (not from our cache)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_pcb

    mergekit_pcb.register()
    merge = MergeConfiguration.model_validate(yaml.safe_load(best_yml.read_text()))
    run_merge(
        merge,
        str(model_dir),
        MergeOptions(trust_remote_code=cfg.trust_remote_code, quiet=True, copy_tokenizer=True),
    )
