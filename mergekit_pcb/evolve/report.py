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


def plot_progress(path: Path, history: History) -> bool:
    """Best-so-far and mean objective per generation; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        LOG.info("matplotlib is not installed (pip install 'mergekit-pcb[plot]'): no progress.png")
        return False
    gens: dict[int, list[float]] = {}
    for e in history.entries:
        if e["kind"] == "search":
            gens.setdefault(e["generation"], []).append(e["objective"])
    if not gens:
        return False
    xs = sorted(gens)
    best, running = [], float("-inf")
    for g in xs:
        running = max(running, max(gens[g]))
        best.append(running)
    mean = [sum(gens[g]) / len(gens[g]) for g in xs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, best, label="best so far")
    ax.plot(xs, mean, label="generation mean")
    default = history.default()
    if default is not None:
        ax.axhline(default["objective"], color="gray", linestyle="--", label="default")
    ax.set_xlabel("generation")
    ax.set_ylabel("objective (higher is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
