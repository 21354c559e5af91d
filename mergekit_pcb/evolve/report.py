"""Step 6 of the search: what it leaves behind (history.jsonl, best.yml, report.json,
progress.png) and the summary it prints."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

LOG = logging.getLogger("mergekit_pcb.evolve")

HISTORY = "history.jsonl"
RUN = "run.json"


class History:
    """Append-only candidate log; each line is flushed so an interrupted run can resume."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: list[dict] = []
        torn = False
        if path.exists():
            with path.open() as fh:
                for number, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        self.entries.append(json.loads(line))
                    except json.JSONDecodeError:
                        # A line cut by a kill mid-write: everything before it is valid.
                        LOG.warning(
                            "%s:%d is incomplete; it and later lines are dropped", path, number
                        )
                        torn = True
                        break
        if torn:
            self.rewrite()  # appends must not continue a torn line

    def append(self, entry: dict) -> None:
        self.entries.append(entry)
        with self.path.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()

    def rewrite(self) -> None:
        with self.path.open("w") as fh:
            for e in self.entries:
                fh.write(json.dumps(e) + "\n")

    def default(self) -> dict | None:
        return next((e for e in self.entries if e["kind"] == "default"), None)

    def generation(self, g: int) -> dict[int, dict]:
        return {
            e["member"]: e for e in self.entries if e["kind"] == "search" and e["generation"] == g
        }


def write_best_yml(path: Path, merge_dict: dict, header: str) -> None:
    text = yaml.safe_dump(merge_dict, sort_keys=False)
    path.write_text(f"# {header}\n{text}")


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def progress_figure(history: History):
    """The best objective on the whole search split so far (the default and warm-up
    included) against the examples scored (candidates where a task does not count its
    examples), with every full-split score as a dot; None when matplotlib is missing
    (one WARNING says so) or nothing was searched yet."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        LOG.warning(
            "progress.png skipped: matplotlib is not installed (pip install 'mergekit-pcb[plot]')"
        )
        return None
    entries = history.entries
    if not any(e["kind"] == "search" for e in entries):
        return None
    top = max(e.get("rung", 0) for e in entries)
    by_examples = all(e.get("examples") is not None for e in entries)
    xs, best, dots, used, running = [], [], [], 0, float("-inf")
    seen = set()
    for e in entries:
        identity = (e["kind"], e["generation"], e["member"])
        if by_examples:
            used += e["examples"]
        elif identity not in seen:
            used += 1
        seen.add(identity)
        if e.get("rung", top) == top:
            running = max(running, e["objective"])
            dots.append((used, e["objective"]))
        if running > float("-inf"):
            xs.append(used)
            best.append(running)
    rounds = len({e["generation"] for e in entries if e["kind"] == "search"})
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step(xs, best, where="post", label="best so far (whole search split)")
    ax.plot(*zip(*dots, strict=True), ".", alpha=0.5, label="scored on the whole split")
    default = history.default()
    if default is not None:
        ax.axhline(default["objective"], color="gray", linestyle="--", label="default config")
    unit = "examples scored" if by_examples else "candidates scored"
    ax.set_title(f"mergekit-pcb evolve: {len(seen)} candidates, {rounds} rounds")
    ax.set_xlabel(f"{unit} (the default included)")
    ax.set_ylabel("objective (1 = the default; higher is better)")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_progress(path: Path, history: History) -> bool:
    """progress.png; False when it could not be drawn (see :func:`progress_figure`)."""
    fig = progress_figure(history)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _count(n: int | None) -> str:
    return "an unknown number of" if n is None else f"{n:,}"


def _cost_line(report: dict) -> str:
    """Examples and seconds scored, and the search's own share of its wall time."""
    cost, budget = report["cost"], report["budget"]
    search = cost["search"]
    limit = f" (budget: {budget['limit']:,} {budget['unit']})"
    line = (
        f"scored {report['candidates']} candidates on {_count(search['examples'])} examples"
        f"{limit} in {search['seconds']:.1f} s"
    )
    extra = [
        f"{_count(cost[key])} examples {what}"
        for key, what in (("rescore_examples", "to rescore"), ("test_examples", "on test"))
        if report.get("rescore" if key == "rescore_examples" else "test_score_covers")
    ]
    if extra:
        line += f", then {' and '.join(extra)}"
    return (
        f"{line}; wall {cost['wall_seconds']:.1f} s, of which {cost['overhead_share']:.0%} "
        "not scoring (statistics, merges, the optimizer)"
    )


def _expert_lines(report: dict) -> list[str]:
    """Per agreement task, what its experts' outputs cost: computed now, or reused."""
    lines = []
    for name, cost in (report["cost"].get("expert_outputs") or {}).items():
        if cost["status"] == "reused":
            how = f"reused from the cache (computed in {cost['computed_seconds']:.1f} s)"
        else:
            how = f"{cost['status']} in {cost['seconds']:.1f} s"
        lines.append(
            f"expert outputs ({name}): {cost['prompts']:,} prompts, {cost['tokens']:,} tokens, "
            f"{cost['bytes'] / 1e6:.1f} MB, {how}"
        )
    return lines


def _number(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.6g}"


def format_summary(report: dict, tasks: list, out: Path) -> str:
    """The lines a finished search prints: default vs best on both splits, per task raw
    scores, what the objective means, and where the files are."""
    rows = [
        (
            "objective (higher is better)",
            report["default_score"],
            report["best_score"],
            report["default_test_score"],
            report["best_test_score"],
        )
    ]
    for task in tasks:
        scores = report["tasks"][task.name]
        better = "higher" if task.sign > 0 else "lower"
        rows.append(
            (
                f"{task.name} ({task.type}, {better} is better)",
                scores["default_search"],
                scores["best_search"],
                scores["default_test"],
                scores["best_test"],
            )
        )
    width = max(len(row[0]) for row in rows)
    lines = [
        f"{'':<{width}}  {'search split':^23}  {'test split':^23}".rstrip(),
        f"{'':<{width}}  {'default':>11} {'best':>11}  {'default':>11} {'best':>11}",
    ]
    for label, *values in rows:
        a, b, c, d = (_number(v) for v in values)
        lines.append(f"{label:<{width}}  {a:>11} {b:>11}  {c:>11} {d:>11}")
    lines.append(
        "objective: weighted mean over tasks of 1 + (score - default's) / |default's| on the "
        "search split (losses: 1 - ...): 1 is the default there; on the test split the "
        "default's value is what it really scores, in the same units"
    )
    if report.get("tasks_without_test_data"):
        lines.append(
            f"n/a: no test_data for {', '.join(report['tasks_without_test_data'])}; the test "
            "objective leaves them out"
        )
    rescored = report.get("rescore")
    if rescored:
        rows = rescored["candidates"]
        place = [row["index"] for row in rows].index(rescored["best_index"]) + 1
        lines.append(
            f"rescore split: default {_number(rescored['default_score'])}, best "
            f"{_number(report['best_rescore_score'])} (candidate #{rescored['best_index']}, "
            f"{place} of the {len(rows)} best on the search split)"
        )
    names = ["best.yml", "report.json", "history.jsonl", "progress.png", "model"]
    found = [name + ("/" if name == "model" else "") for name in names if (out / name).exists()]
    lines.append(_cost_line(report))
    lines += _expert_lines(report)
    lines.append(
        f"best of {report['candidates']} candidates (the default included): "
        f"{out / 'best.yml'}; files in {out}: {', '.join(found)}"
    )
    if (out / "model").is_dir():
        lines.append(f"next: load the best model from {out / 'model'}")
    else:
        lines.append(f"next: mergekit-yaml {out / 'best.yml'} ./merged  (the model it scored)")
    return "\n".join(lines)
