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


def test_progress_figure_has_title_integer_generations_and_units(tmp_path):
    """Row 16: no title and ticks at 0.5, 1.5 generations before."""
    pytest.importorskip("matplotlib")
    fig = progress_figure(history(tmp_path))
    ax = fig.axes[0]
    assert ax.get_title() == "mergekit-pcb evolve: 14 candidates, 3 CMA-ES generations"
    assert ax.get_xlabel() == "generation (of 4 candidates)"
    assert ax.get_ylabel() == "objective (task score / default's, weighted mean)"
    fig.canvas.draw()
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks == [0.0, 1.0, 2.0]
    best, mean = ax.get_lines()[:2]
    # best so far starts from the warm-up's 0.05 (CMA-ES starts there), then 0.08, 0.08
    assert list(best.get_ydata()) == [0.05, 0.08, 0.08]
    assert list(mean.get_ydata()) == pytest.approx([-0.065, -0.05, 0.04])
    assert ax.get_lines()[2].get_ydata()[0] == 0.0  # the default's objective


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
        "default_score": 0.0,
        "best_score": 0.0817885,
        "default_test_score": 0.0,
        "best_test_score": 0.186,
        "candidates": 13,
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
        "objective (higher is better)                   0   0.0817885            0       0.186",
        "max (exact_match, higher is better)         0.25      0.3125          0.2       0.275",
        "cipher (loss, lower is better)               1.5        1.25          n/a         n/a",
        "objective: weighted mean over tasks of score / |default's score| (losses negated), "
        "so the default's value is fixed by construction; compare best with it",
        "n/a: no test_data for cipher; the test objective leaves them out",
        f"best of 13 candidates: {tmp_path / 'best.yml'}; files in {tmp_path}: best.yml, "
        "report.json, history.jsonl",
        f"next: mergekit-yaml {tmp_path / 'best.yml'} ./merged  (the model it scored)",
    ]
