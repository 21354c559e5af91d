"""What a search leaves behind: history.jsonl, best.yml, report.json, progress.png."""

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
    """Best-so-far (warm-up included) and mean objective per CMA-ES generation; None when
    matplotlib is missing (one WARNING says so) or nothing was searched yet."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        LOG.warning(
            "progress.png skipped: matplotlib is not installed (pip install 'mergekit-pcb[plot]')"
        )
        return None
    gens: dict[int, list[float]] = {}
    for e in history.entries:
        if e["kind"] == "search":
            gens.setdefault(e["generation"], []).append(e["objective"])
    if not gens:
        return None
    xs = sorted(gens)
    best, running = (
        [],
        max(  # CMA-ES starts from the best of the default and any warm-up
            (e["objective"] for e in history.entries if e["kind"] != "search"),
            default=float("-inf"),
        ),
    )
    for g in xs:
        running = max(running, max(gens[g]))
        best.append(running)
    mean = [sum(gens[g]) / len(gens[g]) for g in xs]
    per_generation = max(len(v) for v in gens.values())
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, best, marker="o", label="best so far")
    ax.plot(xs, mean, marker=".", label="generation mean")
    default = history.default()
    if default is not None:
        ax.axhline(default["objective"], color="gray", linestyle="--", label="default config")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(
        f"mergekit-pcb evolve: {len(history.entries)} candidates, {len(xs)} CMA-ES generations"
    )
    ax.set_xlabel(f"generation (of {per_generation} candidates)")
    ax.set_ylabel("objective (task score / default's, weighted mean)")
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
        "objective: weighted mean over tasks of score / |default's score| (losses negated), "
        "so the default's value is fixed by construction; compare best with it"
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
    lines.append(
        f"best of {report['candidates']} candidates: {out / 'best.yml'}; "
        f"files in {out}: {', '.join(found)}"
    )
    if (out / "model").is_dir():
        lines.append(f"next: load the best model from {out / 'model'}")
    else:
        lines.append(f"next: mergekit-yaml {out / 'best.yml'} ./merged  (the model it scored)")
    return "\n".join(lines)
