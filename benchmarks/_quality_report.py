"""Statistics and outputs of the quality benchmark: results.json, RESULTS.md, quality.png."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
NOTES = HERE / "_quality_notes.md"


def bootstrap_difference(per_seed: list[dict], a: str, b: str, resamples: int) -> dict:
    """Paired bootstrap of normalised accuracy (a − b) in points, over test examples.

    Both methods are scored on the same examples, so resampling examples (within
    each task, the same draw for every seed and both methods) keeps the pairing and
    measures how much of the gap the finite test set alone could produce.
    """
    generator = torch.Generator().manual_seed(12345)
    tasks = list(per_seed[0]["own_test"])
    n = len(per_seed[0]["methods"][a]["hits"][tasks[0]])
    total = torch.zeros(resamples, dtype=torch.float64)
    point = 0.0
    for task in tasks:
        idx = torch.randint(n, (resamples, n), generator=generator)
        for seed in per_seed:
            own = seed["own_test"][task]
            diff = (
                seed["methods"][a]["hits"][task].double()
                - seed["methods"][b]["hits"][task].double()
            ) / own
            total += diff[idx].mean(1)
            point += float(diff.mean())
    scale = 100.0 / (len(tasks) * len(per_seed))
    total *= scale
    lo, hi = torch.quantile(total, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"points": point * scale, "ci95": [lo, hi], "resamples": resamples}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(result: dict) -> dict:
    """The machine-readable results: no per-example data, everything a reader needs."""
    seeds = result["per_seed"]
    tasks = list(seeds[0]["own_test"])
    base_acc = {t: float(h.float().mean()) for t, h in result["base_test_hits"].items()}
    base_norm = [s["base_normalized"] for s in seeds]
    summary = {
        "command": result.get("command"),
        "regime": result["regime"],
        "machine": result["machine"],
        "wall_seconds": round(result["wall_seconds"], 1),
        "train_seconds": round(result["train_seconds"], 1),
        "recorded_train_seconds": result.get("recorded_train_seconds"),
        "cache_dir": result["cache_dir"],
        "tasks": tasks,
        "skipped_methods": result["skipped_methods"],
        "reused_seeds": result.get("reused_seeds", []),
        "seed_seconds": {s["seed"]: round(s["seconds"], 1) for s in seeds if "seconds" in s},
        "base": {
            "normalized_mean": _mean_std(base_norm)[0],
            "normalized_std": _mean_std(base_norm)[1],
            "per_task": base_acc,
        },
        "experts": {
            "normalized_mean": 1.0,
            "normalized_std": 0.0,
            "per_task": {t: statistics.fmean(s["own_test"][t] for s in seeds) for t in tasks},
            "per_task_std": {t: _mean_std([s["own_test"][t] for s in seeds])[1] for t in tasks},
            # Seed 0's experts on every task: the forgetting inside each task vector.
            "cross_seed0": seeds[0]["cross"],
        },
        "methods": {},
        "comparisons": result["comparisons"],
    }
    base_mean = summary["base"]["normalized_mean"]
    for label in seeds[0]["methods"]:
        rows = [s["methods"][label] for s in seeds]
        norm_mean, norm_std = _mean_std([r["test_normalized"] for r in rows])
        summary["methods"][label] = {
            "normalized_mean": norm_mean,
            "normalized_std": norm_std,
            "per_seed_normalized": [r["test_normalized"] for r in rows],
            "per_task": {t: statistics.fmean(r["test_per_task"][t] for r in rows) for t in tasks},
            "chosen": [{"seed": s["seed"], **s["methods"][label]["chosen"]} for s in seeds],
            "val_normalized": [r["val_normalized"] for r in rows],
            # Validation examples the tuner scored (grid: every point, then its re-ranked
            # best; search: everything it scored), per seed.
            "examples_scored": [r.get("examples_scored") for r in rows],
            # lambda: auto's per-tensor scales (min / median / max), per seed.
            **(
                {"lambda_auto": [r["lambda_auto"] for r in rows]}
                if all("lambda_auto" in r for r in rows)
                else {}
            ),
            # Share of the experts' gain over the base that the merge keeps.
            "gain_kept": (norm_mean - base_mean) / (1.0 - base_mean) if base_mean < 1 else None,
            "sweep_seed0": [
                {
                    **row["params"],
                    "val_normalized": round(row["val_normalized"], 4),
                    **(
                        {"rescore_normalized": round(row["rescore_normalized"], 4)}
                        if "rescore_normalized" in row
                        else {}
                    ),
                }
                for row in rows[0]["sweep"]
            ],
        }
    # mergekit-pcb evolve's own result is the one this benchmark's selection rule picks.
    agrees = [s["evolve_pick_agrees"] for s in seeds if "evolve_pick_agrees" in s]
    if agrees:
        summary["evolve_pick_agrees"] = agrees
    summary["curves"] = _curves(seeds)
    summary["search_vs_grid"] = _search_vs_grid(seeds)
    summary["verdicts"] = verdicts(summary)
    return summary


def _curves(seeds: list[dict]) -> dict:
    """Per search (and the grid): test score of its pick against validation examples
    scored (and candidates)."""
    out = {}
    for label in seeds[0].get("curves", {}):
        points = []
        for i, point in enumerate(seeds[0]["curves"][label]):
            tests = [100 * s["curves"][label][i]["test_normalized"] for s in seeds]
            vals = [100 * s["curves"][label][i]["val_normalized"] for s in seeds]
            examples = [s["curves"][label][i].get("examples") for s in seeds]
            mean, std = _mean_std(tests)
            points.append(
                {
                    "candidates": point["candidates"],
                    "examples": None if None in examples else statistics.fmean(examples),
                    "test_mean": mean,
                    "test_std": std,
                    "val_mean": statistics.fmean(vals),
                    "test_per_seed": tests,
                }
            )
        out[label] = points
    return out


def _search_vs_grid(seeds: list[dict]) -> dict:
    """Each search row minus grid-tuned PCB, per seed (points of normalised test accuracy).

    "Seed noise" is the standard error of the mean per-seed difference; a search is worse
    than the grid beyond it when the mean difference is below minus twice that.
    """
    out = {}
    for label in seeds[0]["methods"]:
        if not label.startswith(("pcb + evolve", "pcb + random search")):
            continue
        if label not in seeds[0]["methods"]:
            continue
        if "pcb" not in seeds[0]["methods"]:
            continue
        diffs = [
            100 * (s["methods"][label]["test_normalized"] - s["methods"]["pcb"]["test_normalized"])
            for s in seeds
        ]
        mean, std = _mean_std(diffs)
        se = std / len(diffs) ** 0.5
        out[label] = {
            "per_seed_points": diffs,
            "mean_points": mean,
            "std_points": std,
            "seed_noise_points": se,
            "seeds_won": sum(d > 0 for d in diffs),
            "seeds_lost": sum(d < 0 for d in diffs),
            "worse_beyond_seed_noise": len(diffs) > 1 and mean < -2 * se,
        }
    return out


def _seconds(x: float | None) -> str:
    return "not recorded" if x is None else f"{x:.0f} s"


def _reused(summary: dict) -> str:
    """Seeds taken from an earlier invocation (--reuse-seeds) are not in the wall time."""
    reused = summary.get("reused_seeds") or []
    if not reused:
        return ""
    timed = summary.get("seed_seconds") or {}
    known = ", ".join(f"seed {k}: {v:.0f} s" for k, v in timed.items())
    return (
        f"; seed(s) {', '.join(map(str, reused))} reused from an earlier invocation "
        f"(--reuse-seeds), so not in this wall time" + (f" (recorded: {known})" if known else "")
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _tuned(chosen: list[dict]) -> str:
    keys = [k for k in chosen[0] if k not in ("seed", "weight", "normalize")]
    if not keys:
        return "none (plain average)"
    return "; ".join(
        ", ".join(f"{k}={c[k]:g}" if isinstance(c[k], float) else f"{k}={c[k]}" for k in keys)
        for c in chosen
    )


def _scored(per_seed: list | None) -> str:
    """Mean validation examples a row scored per seed ('-' where not recorded)."""
    known = [n for n in per_seed or [] if n is not None]
    return f"{statistics.fmean(known):,.0f}" if known else "-"


def summary_table(summary: dict) -> str:
    """The table both RESULTS.md and the README show."""
    tasks = summary["tasks"]
    head = (
        "| model | normalised acc. (mean ± std) | validation examples scored | "
        + " | ".join(tasks)
        + " | chosen (per seed) |"
    )
    rule = "|" + "---|" * (len(tasks) + 4)
    lines = [head, rule]
    b = summary["base"]
    lines.append(
        f"| base | {_pct(b['normalized_mean'])} ± {_pct(b['normalized_std'])} | 0 | "
        + " | ".join(_pct(b["per_task"][t]) for t in tasks)
        + " | - |"
    )
    e = summary["experts"]
    lines.append(
        "| experts (each on its own task) | 100.0 | - | "
        + " | ".join(_pct(e["per_task"][t]) for t in tasks)
        + " | - |"
    )
    for label, m in sorted(summary["methods"].items(), key=lambda kv: -kv[1]["normalized_mean"]):
        lines.append(
            f"| {label} | {_pct(m['normalized_mean'])} ± {_pct(m['normalized_std'])} | "
            f"{_scored(m.get('examples_scored'))} | "
            + " | ".join(_pct(m["per_task"][t]) for t in tasks)
            + f" | {_tuned(m['chosen'])} |"
        )
    return "\n".join(lines)


def comparison_lines(summary: dict) -> str:
    out = []
    for name, c in summary["comparisons"].items():
        lo, hi = c["ci95"]
        out.append(
            f"- {name}: {c['points']:+.2f} points of normalised accuracy, paired bootstrap 95% "
            f"interval [{lo:+.2f}, {hi:+.2f}] ({c['resamples']} resamples of the test examples)"
        )
    return "\n".join(out)


def _replay_line(r: dict) -> str:
    share = r.get("expert_replay", 0.0)
    if not share:
        return "No replay of the other tasks."
    source = r.get("replay_source", "base")
    what = {
        "kl": "distilled from the base (KL divergence to the base's next-token distributions "
        "along the base's own greedy answers), so each expert keeps the base's behaviour on "
        "the other tasks without being taught them",
        "base": "answered by the base's own greedy answers (hard labels)",
        "data": "answered correctly (the experts then also learn the other tasks)",
    }[source]
    return (
        f"{100 * share:g}% of every expert batch replays the other tasks' prompts, {what} "
        f"(`expert_replay={share:g}`, `replay_source={source}`)."
    )


def _trainable(r: dict) -> str:
    rank = r.get("expert_lora_rank", 0)
    if rank:
        return (
            f"LoRA rank {rank} on every attention and MLP projection (peft), merged into the "
            "dense weights"
        )
    return r["expert_trainable"] or "all"


def verdicts(summary: dict) -> dict:
    """The issue's two questions per regime: does merging work here, and PCB >= TIES + 2?"""
    methods, comps = summary["methods"], summary["comparisons"]
    out = {}
    ta = methods.get("task_arithmetic", {}).get("gain_kept")
    if ta is not None:
        out["task_arithmetic_gain_kept"] = ta
        out["merging_works"] = ta >= 0.5
    if "pcb - ties" in comps:
        out["pcb_minus_ties_points"] = comps["pcb - ties"]["points"]
        out["pcb_ge_ties_plus_2"] = comps["pcb - ties"]["points"] >= 2.0
    versus = summary.get("search_vs_grid", {})
    if "pcb + evolve (4x)" in versus:
        out["search_4x_minus_grid_points"] = versus["pcb + evolve (4x)"]["mean_points"]
        out["search_4x_ge_grid_plus_0_5"] = versus["pcb + evolve (4x)"]["mean_points"] >= 0.5
    if "pcb + evolve" in versus:
        out["search_1x_minus_grid_points"] = versus["pcb + evolve"]["mean_points"]
        out["search_1x_worse_beyond_seed_noise"] = versus["pcb + evolve"]["worse_beyond_seed_noise"]
        out["search_1x_ge_grid_plus_0_5"] = versus["pcb + evolve"]["mean_points"] >= 0.5
    if "pcb + evolve (1/3 budget)" in versus:
        third = versus["pcb + evolve (1/3 budget)"]["mean_points"]
        out["search_third_minus_grid_points"] = third
        out["search_third_ge_grid_minus_0_2"] = third >= -0.2
    if "pcb + evolve (label-free)" in versus and "pcb + evolve" in versus:
        free = versus["pcb + evolve (label-free)"]["mean_points"]
        out["label_free_minus_grid_points"] = free
        out["label_free_minus_search_points"] = free - versus["pcb + evolve"]["mean_points"]
        out["label_free_ge_search_minus_0_5"] = out["label_free_minus_search_points"] >= -0.5
        out["label_free_ge_grid_minus_0_5"] = free >= -0.5
    return out


def verdict_lines(summary: dict) -> str:
    v = summary.get("verdicts") or verdicts(summary)
    out = []
    if "merging_works" in v:
        out.append(
            f"- Merging works here (Task Arithmetic keeps >= 50% of the experts' gain): "
            f"{'yes' if v['merging_works'] else 'no'}, it keeps "
            f"{_pct(v['task_arithmetic_gain_kept'])}%."
        )
    if "pcb_ge_ties_plus_2" in v:
        out.append(
            f"- PCB >= TIES + 2 points (the paper's margin on ViT-B/32 was +3.9): "
            f"{'yes' if v['pcb_ge_ties_plus_2'] else 'no'} ({v['pcb_minus_ties_points']:+.2f})."
        )
    if "search_4x_ge_grid_plus_0_5" in v:
        out.append(
            "- The search at 4x the grid's budget >= grid-tuned PCB + 0.5 points: "
            f"{'yes' if v['search_4x_ge_grid_plus_0_5'] else 'no'} "
            f"({v['search_4x_minus_grid_points']:+.2f})."
        )
    if "search_1x_ge_grid_plus_0_5" in v:
        out.append(
            "- The search at the grid's examples >= grid-tuned PCB + 0.5 points: "
            f"{'yes' if v['search_1x_ge_grid_plus_0_5'] else 'no'} "
            f"({v['search_1x_minus_grid_points']:+.2f})."
        )
    if "search_third_ge_grid_minus_0_2" in v:
        out.append(
            "- The search at a third of the grid's examples >= grid-tuned PCB - 0.2 points: "
            f"{'yes' if v['search_third_ge_grid_minus_0_2'] else 'no'} "
            f"({v['search_third_minus_grid_points']:+.2f})."
        )
    if "label_free_ge_search_minus_0_5" in v:
        out.append(
            "- The label-free search >= the labelled search - 0.5 points: "
            f"{'yes' if v['label_free_ge_search_minus_0_5'] else 'no'} "
            f"({v['label_free_minus_search_points']:+.2f}); >= grid-tuned PCB - 0.5: "
            f"{'yes' if v['label_free_ge_grid_minus_0_5'] else 'no'} "
            f"({v['label_free_minus_grid_points']:+.2f})."
        )
    if "search_1x_worse_beyond_seed_noise" in v:
        out.append(
            "- The search at the grid's budget worse than the grid beyond seed noise (mean "
            "per-seed difference below minus twice its standard error): "
            f"{'yes' if v['search_1x_worse_beyond_seed_noise'] else 'no'} "
            f"({v['search_1x_minus_grid_points']:+.2f})."
        )
    return "\n".join(out)


def _examples(point: dict) -> str:
    return "?" if point.get("examples") is None else f"{point['examples']:,.0f}"


def search_lines(summary: dict) -> str:
    """The budget curves and the per-seed search - grid differences, as markdown."""
    curves, versus = summary.get("curves", {}), summary.get("search_vs_grid", {})
    if not curves:
        return ""
    lines = [
        "## The search against the grid",
        "",
        "Test normalised accuracy (%) of each tuner's pick against the validation examples "
        "it scored (mean over seeds; candidates in brackets), mean ± std over seeds. "
        "`pcb + evolve` is `mergekit-pcb evolve` with its budget in examples "
        "(`budget_examples`: a third, one and four times the grid's), successive halving "
        "over 3 rungs (eta 3), a 3 x 3 lambda x pcb_ratio sweep first, 9 candidates a round; "
        "the rows in brackets change one thing (the optimizer, one fidelity, label-free). "
        "The random search draws uniformly from the same box (pcb_ratio and lambda over the "
        "grid's ranges, one weight per expert in [0.7, 1.3]) and, like the grid (PCB's "
        "lambda x pcb_ratio grid, weights 1), ranks candidates on the validation split"
        + (
            f" and re-ranks its {summary['regime']['rescore_top']} best on "
            f"{summary['regime']['n_rescore']} validation examples a task."
            if summary["regime"].get("rescore_top")
            else "."
        ),
        "",
        "| tuner | examples scored (candidates): test % |",
        "|---|---|",
    ]
    for label, points in curves.items():
        cells = [
            f"{_examples(p)} ({p['candidates']:.0f}): {p['test_mean']:.1f} ± {p['test_std']:.1f}"
            for p in points
        ]
        lines.append(f"| {label} | " + "; ".join(cells) + " |")
    if versus:
        lines += ["", "Each search row minus grid-tuned PCB, per seed (points):", ""]
        for label, d in versus.items():
            per = ", ".join(f"{x:+.2f}" for x in d["per_seed_points"])
            lines.append(
                f"- {label}: {d['mean_points']:+.2f} (std {d['std_points']:.2f}, standard error "
                f"{d['seed_noise_points']:.2f}; won {d['seeds_won']}, lost {d['seeds_lost']} of "
                f"{len(d['per_seed_points'])} seeds: {per})"
            )
    lines += ["", "![test score vs examples scored](search.png)", ""]
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    r = summary["regime"]
    m = summary["machine"]
    cross = summary["experts"]["cross_seed0"]
    tasks = summary["tasks"]
    cross_rows = [
        "| expert \\ task | " + " | ".join(tasks) + " |",
        "|" + "---|" * (len(tasks) + 1),
        *(f"| {e} | " + " | ".join(_pct(cross[e][t]) for t in tasks) + " |" for e in tasks),
    ]
    gains = "\n".join(
        f"- {label}: {_pct(v['gain_kept'])}% of the experts' gain over the base"
        for label, v in summary["methods"].items()
        if v["gain_kept"] is not None
    )
    parts = [
        "# Merge quality: PCB against mergekit's methods on tiny algorithmic experts",
        "",
        "Generated by `benchmarks/quality.py`; edit `benchmarks/_quality_notes.md` for the prose "
        "at the end, not this file.",
        "",
        f"Command: `{summary['command']}`  ",
        f"Wall time: {summary['wall_seconds']:.0f} s, of which training "
        f"{summary['train_seconds']:.0f} s (0 when the checkpoints came from the cache; "
        "recorded cost of the cached training: "
        f"{_seconds(summary.get('recorded_train_seconds'))})" + _reused(summary) + "  ",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} with "
        f"{m['torch_threads']} thread(s), Python {m['python']}",
        "",
        f"Regime: `{r['name']}`"
        + (
            " (the other regimes: `replay/RESULTS.md`, `lora/RESULTS.md`)."
            if r["name"] == "distilled"
            else " (the `distilled` regime and the regimes tried: `../RESULTS.md`)."
        ),
        "",
        "## Result (test split, exact match in %)",
        "",
        f"Normalised accuracy = merged accuracy / the expert's own accuracy, per task, averaged "
        f"over {len(tasks)} tasks; mean ± std over {len(r['seeds'])} seed(s) of experts. "
        f"{r['n_test']} test examples per task; values chosen on {r['n_val']} validation "
        "examples per task"
        + (
            f", every tuner's {r['rescore_top']} best there re-ranked on {r['n_rescore']} "
            f"(those {r['n_val']} and {r['n_rescore'] - r['n_val']} more)."
            if r.get("rescore_top")
            else "."
        ),
        "",
        summary_table(summary),
        "",
        comparison_lines(summary),
        "",
        "Share of the experts' gain over the base kept by each merge "
        "((merged − base) / (experts − base), normalised):",
        "",
        gains,
        "",
        verdict_lines(summary),
        "",
        search_lines(summary),
        "## Setup",
        "",
        f"- Tasks: {', '.join(tasks)} (see `benchmarks/toy.py`); one format `T:DIGITS=ANSWER`.",
        f"- Model: Llama, hidden {r['hidden_size']}, {r['num_layers']} layers, "
        f"{r['num_heads']} heads, random init, character tokenizer.",
        f"- Base: {r['base_steps']} AdamW steps at lr {r['base_lr']:g} on an equal mixture of "
        "all tasks (batch {0}).".format(r["batch_size"]),
        f"- Experts: {r['expert_steps']} steps at lr {r['expert_lr']:g} on one task each, "
        f"trainable parameters: {_trainable(r)}; seeds {list(r['seeds'])} "
        "change the experts' data and order. " + _replay_line(r),
        f"- Tuning grid, the same for every method: scale (`lambda`) in {list(r['scales'])}; "
        f"kept fraction (TIES/DARE `density`, PCB `pcb_ratio`) in {list(r['densities'])}. "
        "`linear` is the plain average of the experts (nothing to tune). PCB's `clamp_ratio` "
        "stays at its default.",
        "- Skipped (not available in this checkout): "
        + (", ".join(summary["skipped_methods"]) or "none"),
        "",
        "## Each expert on every task (seed 0, test exact match in %)",
        "",
        *cross_rows,
        "",
        "![normalised accuracy](quality.png)",
        "",
    ]
    if NOTES.exists() and r["name"] in ("full", "distilled"):  # the notes are about it
        parts += [NOTES.read_text().rstrip(), ""]
    return "\n".join(parts)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("base", summary["base"]["normalized_mean"], summary["base"]["normalized_std"])]
    rows += sorted(
        ((k, v["normalized_mean"], v["normalized_std"]) for k, v in summary["methods"].items()),
        key=lambda row: row[1],
    )
    rows.append(("experts", 1.0, 0.0))
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r[0] for r in rows]
    colors = [
        "tab:red" if n.startswith("pcb") else "tab:gray" if n in ("base", "experts") else "tab:blue"
        for n in names
    ]
    values = [100 * r[1] for r in rows]
    bars = ax.bar(names, values, yerr=[100 * r[2] for r in rows], color=colors, capsize=4)
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=2, fontsize=8)
    # The methods differ by a point or less: a zero-based axis would hide that.
    low = max(0.0, 5 * (min(values) // 5) - 5)
    ax.set_ylabel(f"normalised exact match (%), axis from {low:g}")
    ax.set_title(
        f"Merging {len(summary['tasks'])} tiny experts "
        f"({len(summary['regime']['seeds'])} seed(s), test split, mean ± std)"
    )
    ax.set_ylim(low, 101.5)
    plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_search(summary: dict, path: Path) -> None:
    """Test score vs validation examples scored: each search and the grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = summary.get("curves", {})
    if not curves:
        return
    n_seeds = len(summary["regime"]["seeds"])
    fig, ax = plt.subplots(figsize=(7, 4))
    style = {
        "pcb + evolve": ("tab:red", "o-"),
        "pcb + random search": ("tab:blue", "s--"),
        "pcb grid": ("black", "D"),
    }
    others = iter(("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive"))
    for label, points in curves.items():
        color, marker = style.get(label) or (next(others, "tab:gray"), "^-")
        if any(p.get("examples") is None for p in points):
            continue
        xs = [p["examples"] for p in points]
        ys = [p["test_mean"] for p in points]
        errs = [p["test_std"] / n_seeds**0.5 for p in points]
        ax.errorbar(xs, ys, yerr=errs, fmt=marker, color=color, capsize=3, label=label)
    ax.set_xlabel("validation examples scored")
    ax.set_xscale("log")
    ax.set_ylabel("test normalised exact match (%)")
    ax.set_title(
        f"{summary['regime']['name']}: each tuner's pick vs validation examples "
        f"(mean ± s.e., {n_seeds} seed(s))"
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: dict, out_dir: Path, *, plot_png: bool = True) -> dict:
    summary = summarize(result)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / "RESULTS.md").write_text(markdown(summary))
    if plot_png:
        plot(summary, out_dir / "quality.png")
        plot_search(summary, out_dir / "search.png")
    return summary


def rewrite_report(out_dir: Path, *, plot_png: bool = True) -> None:
    path = out_dir / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"--report-only: {path} does not exist; run the benchmark first")
    summary = json.loads(path.read_text())
    (out_dir / "RESULTS.md").write_text(markdown(summary))
    if plot_png:
        plot(summary, out_dir / "quality.png")
        plot_search(summary, out_dir / "search.png")
