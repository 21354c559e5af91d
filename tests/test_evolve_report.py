"""What a finished search shows: progress.png and the summary (issue 14, rows 13, 14, 16)."""

from __future__ import annotations

import logging
import sys

import pytest

from mergekit_pcb.evolve.config import TaskSpec
from mergekit_pcb.evolve.report import History, format_summary, progress_figure

# objective of each member, per generation (hand-made; generation -1 is the warm-up)
WARMUP = [0.0, 0.05]  # the default, then a sweep point
GENERATIONS = [[-0.2, 0.01, 0.03, -0.1], [0.02, 0.08, -0.3, 0.0], [0.07, 0.06, 0.01, 0.02]]


def history(tmp_path) -> History:
    h = History(tmp_path / "history.jsonl")
    for member, objective in enumerate(WARMUP):
        kind = "default" if member == 0 else "sweep"
        h.append({"kind": kind, "generation": -1, "member": member, "objective": objective})
    for g, values in enumerate(GENERATIONS):
        for member, objective in enumerate(values):
            h.append({"kind": "search", "generation": g, "member": member, "objective": objective})
    return h


def test_progress_figure_has_title_budget_axis_and_units(tmp_path):
    """Row 16: no title and ticks at 0.5, 1.5 generations before; issue 23: the x axis is
    the budget (candidates here: these entries do not count examples)."""
    pytest.importorskip("matplotlib")
    fig = progress_figure(history(tmp_path))
    ax = fig.axes[0]
    assert ax.get_title() == "mergekit-pcb evolve: 14 candidates, 3 rounds"
    assert ax.get_xlabel() == "candidates scored (the default included)"
    assert ax.get_ylabel() == "objective (1 = the default; higher is better)"
    best, dots, default = ax.get_lines()[:3]
    assert list(best.get_xdata()) == list(range(1, 15))
    objectives = WARMUP + [v for g in GENERATIONS for v in g]
    running = [max(objectives[: i + 1]) for i in range(len(objectives))]  # by hand: 0, .05, ...
    assert list(best.get_ydata()) == running
    assert running[-1] == 0.08 and running[1] == 0.05
    assert list(dots.get_ydata()) == objectives  # every one scored on the whole split
    assert default.get_ydata()[0] == 0.0  # the default's objective


def test_progress_without_matplotlib_is_one_warning(tmp_path, monkeypatch, caplog):
    """Row 13: was silent (an INFO line), next to cma's unrelated matplotlib warning."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as without the [plot] extra
    with caplog.at_level(logging.INFO, logger="mergekit_pcb.evolve"):
        assert progress_figure(history(tmp_path)) is None
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "progress.png skipped: matplotlib is not installed (pip install 'mergekit-pcb[plot]')",
        )
    ]


def test_summary_is_a_table_of_both_splits_and_says_where_the_files_are(tmp_path):
    """Row 14: was 'default 0 -> best 0.0817885 (search); test 0.0 -> 0.186'."""
    for name in ("best.yml", "report.json", "history.jsonl"):
        (tmp_path / name).write_text("")
    tasks = [
        TaskSpec(name="max", type="exact_match", data="x"),
        TaskSpec(name="cipher", type="loss", data="y"),
    ]
    report = {
        "default_score": 1.0,
        "best_score": 1.0817885,
        "default_test_score": 0.97,
        "best_test_score": 1.186,
        "candidates": 13,
        "budget": {"unit": "examples", "limit": 5000, "used": 4321},
        "test_score_covers": ["max"],
        "cost": {
            "search": {"examples": 4321, "seconds": 12.34},
            "test_examples": 96,
            "rescore_examples": None,
            "wall_seconds": 20.0,
            "overhead_share": 0.383,
        },
        "tasks": {
            "max": {
                "default_search": 0.25,
                "best_search": 0.3125,
                "default_test": 0.2,
                "best_test": 0.275,
            },
            "cipher": {
                "default_search": 1.5,
                "best_search": 1.25,
                "default_test": None,
                "best_test": None,
            },
        },
        "tasks_without_test_data": ["cipher"],
    }
    assert format_summary(report, tasks, tmp_path).splitlines() == [
        "                                          search split              test split",
        "                                         default        best      default        best",
        "objective (higher is better)                   1     1.08179         0.97       1.186",
        "max (exact_match, higher is better)         0.25      0.3125          0.2       0.275",
        "cipher (loss, lower is better)               1.5        1.25          n/a         n/a",
        "objective: weighted mean over tasks of 1 + (score - default's) / |default's| on the "
        "search split (losses: 1 - ...): 1 is the default there; on the test split the "
        "default's value is what it really scores, in the same units",
        "n/a: no test_data for cipher; the test objective leaves them out",
        "scored 13 candidates on 4,321 examples (budget: 5,000 examples) in 12.3 s, then 96 "
        "examples on test; wall 20.0 s, of which 38% not scoring (statistics, merges, the "
        "optimizer)",
        f"best of 13 candidates (the default included): {tmp_path / 'best.yml'}; files in "
        f"{tmp_path}: best.yml, report.json, history.jsonl",
        f"next: mergekit-yaml {tmp_path / 'best.yml'} ./merged  (the model it scored)",
    ]
