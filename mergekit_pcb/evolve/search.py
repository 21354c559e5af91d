"""The search driver: the six steps of :mod:`mergekit_pcb.evolve`, in order.

Resume: every scoring of a candidate (one rung of one round) is a flushed line of
``history.jsonl`` with its round (``generation``), its place in the round
(``member``), its rung and its unit-cube point. ``--resume`` replays the run
through the optimizer's ask/tell with the recorded points and observations (so its
state is what it was), scores only what a round is still missing (promotions are a
pure function of the recorded scores), and goes on. The run's fingerprint
(``run.json``) must match: a resumed run may raise the budget but change nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_pcb.evolve import agreement, auto_start, optimizers
from mergekit_pcb.evolve import layout as layout_mod
from mergekit_pcb.evolve.cache import build as build_cache
from mergekit_pcb.evolve.cache import fingerprint as cache_fingerprint
from mergekit_pcb.evolve.cache import ratio_levels
from mergekit_pcb.evolve.candidate import Genome
from mergekit_pcb.evolve.config import (
    EvolveConfig,
    EvolveConfigError,
    Optimizer,
    SearchSpace,
    check_inputs,
)
from mergekit_pcb.evolve.fidelity import Budget, Schedule, promote, rank_key
from mergekit_pcb.evolve.layout import Values
from mergekit_pcb.evolve.objective import Objective
from mergekit_pcb.evolve.report import (
    HISTORY,
    RUN,
    History,
    plot_progress,
    write_best_yml,
    write_report,
)
from mergekit_pcb.evolve.tasks import search_size
from mergekit_pcb.output_folder import previous_run

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


@dataclass
class Clock:
    """Where a search's wall time goes: the statistics, scoring, merging, the rest."""

    start: float = field(default_factory=time.perf_counter)
    statistics: float = 0.0
    expert_outputs: float = 0.0  # agreement tasks: the experts' forward passes (.agreement)
    scoring: float = 0.0
    merging: float = 0.0

    def add(self, result) -> None:
        self.scoring += result.seconds
        self.merging += result.merge_seconds

    def summary(self) -> dict:
        wall = time.perf_counter() - self.start
        return {
            "wall_seconds": wall,
            "statistics_seconds": self.statistics,
            "expert_outputs_seconds": self.expert_outputs,
            "scoring_seconds": self.scoring,
            "merge_seconds": self.merging,
            "overhead_seconds": wall - self.scoring,
            "overhead_share": (wall - self.scoring) / wall if wall > 0 else 0.0,
        }


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
                "optimizer.budget or optimizer.budget_examples may change); start a new "
                "OUT_DIR instead"
            )
    elif history_file.exists() and history_file.stat().st_size > 0:
        raise EvolveConfigError(
            previous_run(
                out,
                "a search",
                [HISTORY],
                "a new search would write over its history",
                "--resume (continues that search) or another folder",
            )
        )
    else:
        history_file.unlink(missing_ok=True)
    run_file.write_text(
        json.dumps(
            {"fingerprint": key, "config": cfg.model_dump(mode="json", by_alias=True)}, indent=2
        )
    )
    return History(history_file)


def _bar(total: int, initial: int, desc: str, enabled: bool, unit: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        unit=unit,
        dynamic_ncols=True,
    )


def plan_budget(opt: Optimizer, schedule: Schedule) -> Budget:
    """Step 1: the budget, checked against what the search scores before the optimizer
    (one line naming the key when it cannot pay for it)."""
    if opt.candidates is not None:
        return Budget("candidates", opt.candidates)
    full = schedule.examples(schedule.top)
    warm = opt.warmup - 1
    need = full + (schedule.round_cost(warm) if warm else 0) + schedule.examples(0)
    if opt.budget_examples < need:
        parts = f"the default on the whole search split ({full})"
        if warm:
            parts += f", the start and sweep points ({schedule.round_cost(warm)})"
        raise EvolveConfigError(
            f"optimizer.budget_examples: {opt.budget_examples} is less than the {need} "
            f"examples of {parts} and one candidate on the smallest slice "
            f"({schedule.examples(0)}); raise it to at least {need}"
        )
    return Budget("examples", opt.budget_examples)


def run_search(cfg: EvolveConfig, out: Path, opts: RunOptions) -> dict:
    """Run (or resume) a search and write every output; returns report.json's content."""
    clock = Clock()
    out = Path(out)
    from mergekit_pcb.evolve.evaluator import load_tokenizer

    # 1. Plan. Whatever the user's input or machine can get wrong fails before OUT_DIR
    # is touched.
    check_inputs(cfg, opts.root, device=not opts.ray_address)
    inputs, tasks, opt = cfg.inputs, tuple(cfg.evaluation.tasks), cfg.optimizer
    tokenizer = load_tokenizer(inputs, tasks)
    agreement.check_plan(tasks, inputs, tokenizer)
    layout = layout_mod.build_layout(inputs, cfg.search.layer_groups)
    planned, groups = layout_mod.tensor_groups(inputs, layout)
    genome = Genome.of(cfg.search, len(inputs.models), layout.groups)
    if genome.dimension == 0:
        raise EvolveConfigError("search: every quantity is fixed; give at least one range")
    sizes = {t.name: search_size(t) for t in tasks}
    schedule = Schedule(
        opt.fidelity.rungs,
        opt.fidelity.eta,
        {name: size for name, (size, _) in sizes.items()},
        {name: unit for name, (_, unit) in sizes.items()},
    )
    try:
        schedule.check()
    except ValueError as exc:
        raise EvolveConfigError(str(exc)) from None
    budget = plan_budget(opt, schedule)

    history = _prepare_out(cfg, out, opts.resume)
    for task in tasks:
        if not task.has_test:
            LOG.warning(
                "task '%s' has no test_data: its search score is not checked on held-out data",
                task.name,
            )

    # 2. Cache: the statistics every candidate's merge needs, once.
    cache_dir = Path(cfg.cache.dir) if cfg.cache.dir else out / "cache"
    levels = ratio_levels(cfg.search)
    t0 = time.perf_counter()
    with _bar(len(planned), 0, "statistics", opts.progress, "tensor") as bar:
        cache = build_cache(
            planned,
            groups,
            inputs,
            levels,
            cache_dir=cache_dir,
            memory_bytes=cfg.cache.memory_gb * 1e9,
            force_disk=opts.ray,
            progress=bar.update,
        )
    clock.statistics = time.perf_counter() - t0
    LOG.info("took the statistics of %d tensors in %.1f s", len(planned), clock.statistics)
    del planned
    # Agreement tasks: each expert's outputs on its prompts, once (reused when cached).
    prompts = agreement.total_prompts(tasks)  # no bar without an agreement task
    with _bar(prompts, 0, "expert outputs", opts.progress and prompts > 0, "prompt") as bar:
        outputs = agreement.build(tasks, inputs, tokenizer, cache_dir, bar.update)
    clock.expert_outputs = outputs.seconds

    if opts.ray:
        from mergekit_pcb.evolve.ray_pool import RayPool

        pool = RayPool(
            inputs,
            tasks,
            cfg.cache.gpu_memory_gb,
            cache_dir,
            cache_fingerprint(inputs, levels, groups),
            opts.root,
            address=opts.ray_address,
            num_cpus=opts.ray_num_cpus,
            actors=opts.ray_actors,
            outputs=outputs.entries,
        )
    else:
        from mergekit_pcb.evolve.evaluator import Evaluator
        from mergekit_pcb.evolve.pool import LocalPool

        pool = LocalPool(
            Evaluator(inputs, tasks, cache, opts.root, cfg.cache.gpu_memory_gb, outputs.entries)
        )
    try:
        default = layout_mod.default_values(inputs, layout.groups)
        opt = auto_start.resolve(opt, cfg.search, cache, start_values(opt, default))
        search = _Search(opt, cfg.search, tasks, genome, schedule, budget, history, pool, clock)
        search.run(default, opts.progress)
        # 6. Report.
        return _finish(cfg, out, opts, search, layout, groups, cache.names, outputs.cost)
    finally:
        pool.close()


def start_values(opt: Optimizer, default: Values) -> Values:
    """``optimizer.start`` as values, unnamed quantities at ``default``."""
    if opt.start is None:
        return default
    weights = opt.start.weight
    if weights is None:
        weights = default.weights
    elif not isinstance(weights, list):
        weights = (weights,) * len(default.weights)
    return Values(
        (opt.start.pcb_ratio,) * len(default.pcb_ratio)
        if opt.start.pcb_ratio is not None
        else default.pcb_ratio,
        opt.start.lambda_ if opt.start.lambda_ is not None else default.lambda_,
        tuple(float(w) for w in weights),
    )


def warmup_points(opt: Optimizer, search: SearchSpace, genome: Genome, default: Values):
    """(kind, member, values) scored after the default and before the optimizer, in order.

    ``optimizer.start`` is one point (unnamed quantities at PCB's defaults);
    ``optimizer.sweep: [a, b]`` is an a x b grid over lambda and pcb_ratio at the
    midpoints of equal bins of each searched range (one point: the start's value),
    with every layer group at one ratio and the weights at the start's values.
    Everything is clipped into the searched ranges.
    """
    base = genome.decode(genome.encode(start_values(opt, default)))
    points = [("start", 0, base)] if opt.start is not None else []
    if opt.sweep:

        def axis(name: str, n: int, at: float) -> list[float]:
            low, high = search.range(name)
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


class _Search:
    """Steps 3-5: propose a round, score it on the rungs' slices, promote; until the
    budget is spent. Holds the history, so it can resume anywhere in a round."""

    def __init__(self, opt, space, tasks, genome, schedule, budget, history, pool, clock):
        self.opt, self.space, self.tasks, self.genome = opt, space, tasks, genome
        self.schedule, self.budget, self.history, self.pool = schedule, budget, history, pool
        self.clock = clock
        self.objective: Objective | None = None
        self.bar = None

    # -- bookkeeping ---------------------------------------------------------------
    @property
    def candidates(self) -> int:
        return len({_identity(e) for e in self.history.entries})

    @property
    def examples(self) -> int:
        return sum(e.get("examples") or 0 for e in self.history.entries)

    def _used(self) -> int:
        return self.candidates if self.budget.unit == "candidates" else self.examples

    def best(self) -> dict:
        """The best candidate on the whole search split (the last rung), the default
        included."""
        return best_of(self.history.entries, self.schedule.top)

    def _record(self, kind, generation, member, rung, x, values, result, round_size) -> dict:
        new = _identity({"kind": kind, "generation": generation, "member": member}) not in {
            _identity(e) for e in self.history.entries
        }
        entry = {
            "index": len(self.history.entries),
            "kind": kind,
            "generation": generation,
            "member": member,
            "rung": rung,
            "round_size": round_size,
            "x": x,
            "values": values.to_json(),
            "scores": result.scores,
            "examples": result.examples,
            "objective": self.objective(result.scores) if self.objective else None,
            "seconds": result.seconds,
            "merge_seconds": result.merge_seconds,
        }
        if entry["objective"] is None:  # the default sets the objective's reference
            self.objective = Objective.from_default(self.tasks, result.scores)
            entry["objective"] = self.objective(result.scores)
        self.history.append(entry)
        self.clock.add(result)
        if self.bar is not None:
            self.bar.update(1 if self.budget.unit == "candidates" and new else 0)
            if self.budget.unit == "examples":
                self.bar.update(result.examples or 0)
            other = (
                f"{self.examples} ex"
                if self.budget.unit == "candidates"
                else f"{self.candidates} cand"
            )
            self.bar.set_postfix_str(f"{other}, best {self.best()['objective']:.4f}")
        return entry

    # -- steps 4 and 5: one round through the rungs ---------------------------------
    def score_round(self, generation: int, members: list[tuple[str, int, list, Values]]):
        """Score ``members`` ((kind, member, x, values)) on rung 0, promote the best to
        the next rung, and so on; return each member's objective per rung reached."""
        recorded = {
            (e["kind"], e["member"], e.get("rung", self.schedule.top)): e
            for e in self.history.entries
            if e["generation"] == generation and e["kind"] != "default"
        }
        k = len(members)
        counts = self.schedule.survivors(k)
        observations: list[list[float]] = [[] for _ in members]
        alive = list(range(k))
        for rung in range(self.schedule.rungs):
            if rung:
                alive = sorted(promote([(i, observations[i][-1]) for i in alive], counts[rung]))
            todo = []
            for i in alive:
                kind, member, _, _ = members[i]
                entry = recorded.get((kind, member, rung))
                if entry is not None:
                    observations[i].append(entry["objective"])
                else:
                    todo.append(i)
            if not todo:
                continue

            def done(j, result, todo=todo, rung=rung):
                kind, member, x, values = members[todo[j]]
                entry = self._record(kind, generation, member, rung, x, values, result, k)
                observations[todo[j]].append(entry["objective"])

            self.pool.evaluate(
                [members[i][3] for i in todo], "search", done, self.schedule.limits(rung)
            )
        return observations

    def _round_size(self, generation: int) -> int:
        """A round's size: what the budget left pays for, or, for a round that began
        before a resume with a larger budget, the size it was planned with (its
        promotions were decided among those members)."""
        if self.schedule.rungs > 1:
            sizes = {
                e["round_size"]
                for e in self.history.entries
                if e["generation"] == generation and e["kind"] == "search" and "round_size" in e
            }
            if sizes:
                return sizes.pop()
        # What the budget left before this round (a resumed round already used some).
        mine = [
            e
            for e in self.history.entries
            if e["kind"] == "search" and e["generation"] == generation
        ]
        left = self.budget.remaining(self.candidates, self.examples)
        if self.budget.unit == "candidates":
            left += len({e["member"] for e in mine})
        else:
            left += sum(e.get("examples") or 0 for e in mine)
        return self.budget.round_size(self.schedule, self.opt.popsize, left)

    # -- the whole search ------------------------------------------------------------
    def run(self, default_values: Values, progress: bool) -> None:
        top, genome = self.schedule.top, self.genome
        total = self.budget.limit
        with _bar(
            total, min(self._used(), total), "search", progress, _UNITS[self.budget.unit]
        ) as bar:
            default = self.history.default()
            if default is None:
                # The reference: PCB's defaults on the whole search split.
                (result,) = self.pool.evaluate(
                    [default_values], "search", None, self.schedule.limits(top)
                )
                self.bar = bar
                x0 = genome.encode(default_values)
                default = self._record("default", -1, 0, top, x0, default_values, result, 1)
            else:
                self.objective = Objective.from_default(self.tasks, default["scores"])
                self.bar = bar
            bar.set_postfix_str(f"best {self.best()['objective']:.4f}")

            warm = warmup_points(self.opt, self.space, genome, default_values)
            members = [(k, m, genome.encode(v), v) for k, m, v in warm]
            observed = self.score_round(-1, members) if members else []
            # The optimizer starts at the best point so far: the default or a warm-up one.
            default_obs = [None] * top + [default["objective"]]
            scored = [(default["x"], default_obs)]
            scored += [(x, o) for (_, _, x, _), o in zip(members, observed, strict=True)]
            x0 = max(scored, key=lambda pair: rank_key(pair[1]))[0]
            self.optimizer = optimizers.make(
                self.opt.method,
                genome.dimension,
                seed=self.opt.seed,
                popsize=self.opt.popsize,
                rungs=self.schedule.rungs,
                sigma=self.opt.sigma,
            )
            self.optimizer.start(x0, scored)
            g = 0
            while (k := self._round_size(g)) >= 1:
                xs = self.optimizer.ask(k)
                for e in self.history.entries:
                    if e["kind"] == "search" and e["generation"] == g and e["member"] < k:
                        xs[e["member"]] = e["x"]  # replay: told exactly what was scored
                members = [("search", m, xs[m], genome.decode(xs[m])) for m in range(k)]
                observed = self.score_round(g, members)
                if k == self.opt.popsize:  # a partial round is never told
                    self.optimizer.tell(xs, observed)
                g += 1
            self.bar = None


_UNITS = {"candidates": "cand", "examples": "ex"}


def _identity(entry: dict) -> tuple:
    return (entry["kind"], entry["generation"], entry["member"])


def best_of(entries: list[dict], top: int) -> dict:
    """The highest objective among candidates scored on the last rung (the whole search
    split), the default included; the first on ties."""
    full = [e for e in entries if e.get("rung", top) == top]
    return max(full, key=lambda e: e["objective"])


def _rescore(cfg, search: _Search, default: dict) -> tuple[dict, dict | None]:
    """The result of the search: the best candidate, or with ``optimizer.rescore: k`` the
    best on the rescore split of the search's k best (ties: the better on the search).

    The search keeps the best of many noisy scores, so its winner's search score is
    biased up (winner's curse); scoring a few finalists on more examples ranks them by
    a score their selection did not use. The default is scored there too, for the scale.
    """
    k = cfg.optimizer.rescore
    if not k:
        return search.best(), None
    top = search.schedule.top
    full = [e for e in search.history.entries if e.get("rung", top) == top]
    ranked = sorted(full, key=lambda e: e["objective"], reverse=True)[:k]
    batch = [default] + [e for e in ranked if e is not default]
    results = search.pool.evaluate([Values.from_json(e["values"]) for e in batch], "rescore")
    for result in results:
        search.clock.add(result)
    scores = {e["index"]: result.scores for e, result in zip(batch, results, strict=True)}
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
        "examples": _total([r.examples for r in results]),
    }
    return next(e for e in search.history.entries if e["index"] == chosen["index"]), info


def _total(counts) -> int | None:
    counts = list(counts)
    return None if any(c is None for c in counts) else sum(counts)


def cost_of(history: History, top: int) -> dict:
    """What the search scored: candidates (the default included), scorings (one per rung
    a candidate reached), examples and seconds, in total and per candidate."""
    per: dict[tuple, dict] = {}
    for e in history.entries:
        row = per.setdefault(
            _identity(e),
            {"index": e["index"], "kind": e["kind"], "rungs": 0, "examples": 0, "seconds": 0.0},
        )
        row["rungs"] += 1
        row["index"] = e["index"]  # its scoring on the highest rung it reached
        row["examples"] = (
            None
            if row["examples"] is None or e.get("examples") is None
            else (row["examples"] + e["examples"])
        )
        row["seconds"] += e["seconds"]
        row["reached"] = e.get("rung", top)
    rows = list(per.values())
    return {
        "candidates": len(rows),
        "scorings": len(history.entries),
        "examples": _total(r["examples"] for r in rows),
        "seconds": sum(r["seconds"] for r in rows),
        "per_candidate": rows,
    }


def _finish(cfg, out, opts, search: _Search, layout, groups, names, expert_outputs) -> dict:
    from mergekit_pcb.evolve.layout import check_reproduces, merge_config

    history, top = search.history, search.schedule.top
    default = history.default()
    best, rescored = _rescore(cfg, search, default)
    best_values = Values.from_json(best["values"])
    default_values = Values.from_json(default["values"])
    tasks = cfg.evaluation.tasks
    with_test = [t for t in tasks if t.has_test]
    without_test = [t.name for t in tasks if not t.has_test]

    test_default, test_best, test_examples = None, None, None
    default_test_score = best_test_score = None
    if with_test:
        results = search.pool.evaluate([default_values, best_values], "test")
        for result in results:
            search.clock.add(result)
        (test_default, test_best) = (r.scores for r in results)
        test_examples = _total(r.examples for r in results)
        # The search split's reference: the default's test value is a real number.
        test_objective = Objective.from_default(with_test, default["scores"])
        default_test_score = test_objective(test_default)
        best_test_score = test_objective(test_best)

    merge_dict = merge_config(cfg.inputs, best_values, layout)
    check_reproduces(cfg.inputs, merge_dict, best_values, groups, names)
    cost = cost_of(history, top)
    write_best_yml(
        out / "best.yml",
        merge_dict,
        f"mergekit-pcb evolve: best of {cost['candidates']} candidates (the default included), "
        f"objective {best['objective']:.6g} (default {default['objective']:.6g})",
    )
    report = {
        "default_score": default["objective"],
        "best_score": best["objective"],
        "default_test_score": default_test_score,
        "best_test_score": best_test_score,
        "objective": "weighted mean over tasks of 1 + sign * (score - default's score on the "
        "search split) / max(|default's score|, floor); sign -1 for losses and "
        "higher_is_better: false; 1 = the default on the search split; higher is better",
        "best_values": best["values"],
        "best_index": best["index"],
        "candidates": cost["candidates"],
        "examples_scored": cost["examples"],
        "budget": {
            "unit": search.budget.unit,
            "limit": search.budget.limit,
            "used": cost["candidates"] if search.budget.unit == "candidates" else cost["examples"],
        },
        "optimizer": cfg.optimizer.method,
        "fidelity": {
            "rungs": search.schedule.rungs,
            "eta": search.schedule.eta,
            "examples_per_candidate": [search.schedule.examples(r) for r in range(top + 1)],
        },
        "cost": {
            "search": {k: v for k, v in cost.items() if k != "per_candidate"},
            "rescore_examples": rescored["examples"] if rescored else None,
            "test_examples": test_examples,
            # agreement tasks: the experts' outputs (computed once, or reused from the cache)
            "expert_outputs": expert_outputs,
            **search.clock.summary(),
        },
        "per_candidate": cost["per_candidate"],
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
    plot_progress(out / "progress.png", history)
    LOG.info(
        "default %.6g -> best %.6g on the search split; test: %s -> %s",
        report["default_score"],
        report["best_score"],
        _fmt(default_test_score),
        _fmt(best_test_score),
    )
    if opts.write_model:
        write_model(out / "best.yml", out / "model", cfg.inputs)
    report["cost"].update(search.clock.summary())  # the whole run, the report's own work too
    write_report(out / "report.json", report)
    return report


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}"


def write_model(best_yml: Path, model_dir: Path, inputs) -> None:
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
        MergeOptions(trust_remote_code=inputs.trust_remote_code, quiet=True, copy_tokenizer=True),
    )
