"""The quality benchmark's ``--quick`` mode, end to end, so the benchmark cannot rot.

It trains a real tiny base and experts, merges them through mergekit's registered
methods and checks the outputs for things that could be wrong: structure, ranges,
experts beating the base on their own task, normalisation arithmetic that agrees
with the per-task numbers, the tuned values coming from the declared grid, and the
bootstrap interval containing its own point estimate.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # the quality benchmark run end to end
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("quality")
    env = {**os.environ, "MERGEKIT_PCB_BENCH_CACHE": str(out / "cache")}
    args = [sys.executable, str(SCRIPT), "--quick", "--out", str(out / "report")]
    has_plot = importlib.util.find_spec("matplotlib") is not None
    if not has_plot:
        args.append("--no-plot")
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out / "report"
    return report, json.loads((report / "results.json").read_text())


def test_structure(quick):
    report, res = quick
    assert (report / "RESULTS.md").read_text().startswith("# Merge quality")
    if importlib.util.find_spec("matplotlib") is not None:
        assert (report / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["tasks"] == list(res["regime"]["tasks"])
    for label in ("linear", "task_arithmetic", "ties", "dare_ties", "pcb"):
        row = res["methods"][label]
        assert {"normalized_mean", "normalized_std", "per_task", "chosen"} <= set(row)
        assert set(row["per_task"]) == set(res["tasks"])
    assert {"pcb - ties", "pcb - task_arithmetic", "pcb - dare_ties"} <= set(res["comparisons"])
    verdicts = res["verdicts"]
    ta_kept = res["methods"]["task_arithmetic"]["gain_kept"]
    assert verdicts["task_arithmetic_gain_kept"] == ta_kept
    assert verdicts["merging_works"] == (ta_kept >= 0.5)
    gap = res["comparisons"]["pcb - ties"]["points"]
    assert verdicts["pcb_ge_ties_plus_2"] == (gap >= 2.0)


def test_accuracies_are_rates_and_experts_beat_base(quick):
    _, res = quick
    n_test = res["regime"]["n_test"]
    for task in res["tasks"]:
        own = res["experts"]["per_task"][task]
        base = res["base"]["per_task"][task]
        # Exact match over n_test examples: a multiple of 1/n_test in [0, 1].
        for acc in [own, base, *(m["per_task"][task] for m in res["methods"].values())]:
            assert 0.0 <= acc <= 1.0
            assert abs(acc * n_test - round(acc * n_test)) < 1e-3
        assert own > base + 0.01, (task, own, base)
        assert own >= 0.8, (task, own)
        # Seed 0's expert on its own task is the same number as its own accuracy.
        assert res["experts"]["cross_seed0"][task][task] == pytest.approx(own)
    gains = [res["experts"]["per_task"][t] - res["base"]["per_task"][t] for t in res["tasks"]]
    assert sum(gains) / len(gains) > 0.05, gains


def test_normalisation_matches_per_task_numbers(quick):
    _, res = quick
    own = res["experts"]["per_task"]  # one seed in quick mode: the per-seed values
    base_norm = sum(res["base"]["per_task"][t] / own[t] for t in own) / len(own)
    assert res["base"]["normalized_mean"] == pytest.approx(base_norm, rel=1e-9)
    assert res["base"]["normalized_mean"] < 0.97  # room for a merge to gain anything
    for label, row in res["methods"].items():
        expected = sum(row["per_task"][t] / own[t] for t in own) / len(own)
        assert row["normalized_mean"] == pytest.approx(expected, rel=1e-9), label
        assert row["normalized_std"] == 0.0  # one seed
        gain = (row["normalized_mean"] - base_norm) / (1 - base_norm)
        assert row["gain_kept"] == pytest.approx(gain, rel=1e-9)


def test_tuning_stays_on_the_declared_grid(quick):
    _, res = quick
    scales = set(res["regime"]["scales"])
    densities = set(res["regime"]["densities"])
    for label, row in res["methods"].items():
        if label.startswith(("pcb + evolve", "pcb + random search")):  # checked below
            continue
        sweep = row["sweep_seed0"]
        (chosen,) = row["chosen"]
        if label in UNTUNED:  # nothing chosen on validation: the fixed values, no examples
            assert {k: v for k, v in chosen.items() if k != "seed"} == UNTUNED[label], label
            assert row["examples_scored"] == [0] and len(sweep) == 1
            continue
        if "lambda" in chosen:
            assert chosen["lambda"] in scales
        for key in ("density", "pcb_ratio"):
            if key in chosen:
                assert chosen[key] in densities
        # The chosen values are the validation optimum of the sweep, never a test pick;
        # with rescore_top k, the best on the larger validation split of the k best.
        top = res["regime"]["rescore_top"]
        finalists = [r for r in sweep if "rescore_normalized" in r]
        if top and len(sweep) > 1:
            vals = sorted((r["val_normalized"] for r in sweep), reverse=True)
            assert len(finalists) == min(top, len(sweep)), label
            assert sorted(r["val_normalized"] for r in finalists) == vals[:top][::-1]
            best = max(finalists, key=lambda r: r["rescore_normalized"])
            params = {k: v for k, v in best.items() if not k.endswith("_normalized")}
            assert params == {k: v for k, v in chosen.items() if k != "seed"}, label
        else:
            best = max(sweep, key=lambda r: r["val_normalized"])
        assert row["val_normalized"][0] == pytest.approx(best["val_normalized"], abs=1e-4)
        if label == "ties":
            assert len(sweep) == len(scales) * len(densities)
        if label == "task_arithmetic":
            assert len(sweep) == len(scales)


def test_untuned_rows_and_autos_scales(quick):
    """pcb (defaults) and pcb (auto) are there; auto's per-tensor spread is recorded and
    its row differs from the defaults' (it scaled something)."""
    _, res = quick
    rows = res["methods"]
    assert {"pcb (defaults)", "pcb (lambda: auto)", "pcb (auto)"} <= set(rows)
    ((spread,),) = [rows["pcb (auto)"]["lambda_auto"]]
    assert 0 <= spread["min"] <= spread["median"] <= spread["max"]
    assert "lambda_auto" not in rows["pcb (defaults)"]
    assert (
        rows["pcb (auto)"]["per_seed_normalized"] != rows["pcb (defaults)"]["per_seed_normalized"]
    )
    assert "pcb (auto) - pcb (defaults)" in res["comparisons"]


UNTUNED = {
    "linear": {"weight": 1.0, "normalize": True},
    "pcb (defaults)": {"weight": 1.0, "pcb_ratio": 0.1, "lambda": 1.0},
    "pcb (lambda: auto)": {"weight": 1.0, "pcb_ratio": 0.1, "lambda": "auto"},
    "pcb (auto)": {"weight": 1.0, "pcb_ratio": "auto", "lambda": "auto"},
}
SEARCH_ROWS = (
    "pcb + evolve",
    "pcb + evolve (1/3 budget)",
    "pcb + random search",
    "pcb + random search (4x)",
)


def _grid_examples(res) -> int:
    """The grid's validation examples, by hand: every point on n_val a task, then its
    rescore_top best on n_rescore a task."""
    r = res["regime"]
    grid = len(r["scales"]) * len(r["densities"])
    tasks = len(res["tasks"])
    return grid * tasks * r["n_val"] + min(r["rescore_top"], grid) * tasks * r["n_rescore"]


def test_search_rows_stay_in_the_searched_ranges_and_budgets(quick):
    _, res = quick
    rows = [res["methods"].get(label) for label in SEARCH_ROWS]
    if None in rows:
        pytest.skip("mergekit_pcb.evolve is not in this checkout")
    grid = len(res["methods"]["pcb"]["sweep_seed0"])
    assert res["methods"]["pcb"]["examples_scored"] == [_grid_examples(res)]
    for label, row in zip(SEARCH_ROWS, rows, strict=True):
        (chosen,) = row["chosen"]
        (examples,) = row["examples_scored"]
        if "evolve" in label:  # a budget in examples: at most the grid's (or a third)
            budget = round(_grid_examples(res) / (3 if "1/3" in label else 1))
            assert budget * 0.8 <= examples <= budget, label
        else:
            assert chosen["candidates"] == grid * (4 if "4x" in label else 1)
        scales, densities = res["regime"]["scales"], res["regime"]["densities"]
        assert min(scales) - 1e-6 <= chosen["lambda"] <= max(scales) + 1e-6
        assert min(densities) - 1e-6 <= chosen["pcb_ratio"] <= max(densities) + 1e-6
        assert len(chosen["weights"]) == len(res["tasks"])
        assert all(0.7 - 1e-6 <= w <= 1.3 + 1e-6 for w in chosen["weights"])


def test_search_curves_count_examples(quick):
    """Test score against validation examples: the grid's point, the random search's
    budgets, and the search's rows (a third and all of the grid's examples)."""
    _, res = quick
    curves = res["curves"]
    if "pcb + evolve" not in curves:
        pytest.skip("mergekit_pcb.evolve is not in this checkout")
    grid = len(res["methods"]["pcb"]["sweep_seed0"])
    assert [p["examples"] for p in curves["pcb grid"]] == [_grid_examples(res)]
    r, tasks = res["regime"], len(res["tasks"])
    random = {p["candidates"]: p for p in curves["pcb + random search"]}
    assert sorted(random) == [grid // 2, grid, 2 * grid, 3 * grid, 4 * grid]
    for n, point in random.items():
        rescored = min(r["rescore_top"], n)
        assert point["examples"] == n * tasks * r["n_val"] + rescored * tasks * r["n_rescore"]
    search = curves["pcb + evolve"]
    assert len(search) == 2 and search[0]["examples"] < search[1]["examples"]
    for point, label in zip(search, ("pcb + evolve (1/3 budget)", "pcb + evolve"), strict=True):
        row = res["methods"][label]
        assert 100 * row["normalized_mean"] == pytest.approx(point["test_mean"], abs=1e-9)
        assert point["examples"] == row["examples_scored"][0]
    gap = res["search_vs_grid"]["pcb + evolve"]["mean_points"]
    expected = (
        res["methods"]["pcb + evolve"]["normalized_mean"] - res["methods"]["pcb"]["normalized_mean"]
    )
    assert gap == pytest.approx(100 * expected, abs=1e-9)
    assert res["verdicts"]["search_1x_ge_grid_plus_0_5"] == (gap >= 0.5)


def test_bootstrap_interval_brackets_the_gap(quick):
    _, res = quick
    for name, comp in res["comparisons"].items():
        first, other = name.split(" - ")
        gap = 100 * (
            res["methods"][first]["normalized_mean"] - res["methods"][other]["normalized_mean"]
        )
        assert comp["points"] == pytest.approx(gap, abs=1e-4), name  # float32 means
        lo, hi = comp["ci95"]
        assert lo <= comp["points"] <= hi
        assert hi - lo < 20  # 500 examples a task: a wide interval means a broken resampler


def test_toy_tasks_match_hand_worked_answers():
    import toy

    cases = {
        "reverse": ("12345", "54321"),
        "sort": ("31415", "11345"),
        "cipher": ("0123456789", "3827196054"),
        "successor": ("09190", "10201"),
        "rotate": ("12345", "23451"),
        "swap_pairs": ("12345", "21435"),
        "every_second": ("123456", "135"),
        "max": ("30721", "7"),
    }
    for task, (inp, ans) in cases.items():
        examples = toy.make_examples(task, 200, 3)
        tag = toy.TASKS[task].tag
        assert all(ex.prompt.startswith(f"{tag}:") and ex.prompt.endswith("=") for ex in examples)
        # Re-derive every generated answer with the hand rule checked on the worked case.
        rule = {
            "reverse": lambda s: s[::-1],
            "sort": lambda s: "".join(sorted(s)),
            "cipher": lambda s: "".join("3827196054"[int(c)] for c in s),
            "successor": lambda s: "".join(str((int(c) + 1) % 10) for c in s),
            "rotate": lambda s: s[1:] + s[0],
            "swap_pairs": lambda s: "".join(s[i : i + 2][::-1] for i in range(0, len(s), 2)),
            "every_second": lambda s: s[::2],
            "max": lambda s: max(s),
        }[task]
        assert rule(inp) == ans
        assert all(rule(ex.prompt[2:-1]) == ex.answer for ex in examples), task
    # Deterministic, and different seeds give different data.
    assert toy.make_examples("sort", 50, 1) == toy.make_examples("sort", 50, 1)
    assert toy.make_examples("sort", 50, 1) != toy.make_examples("sort", 50, 2)
    with pytest.raises(ValueError, match="unknown toy task 'nope'"):
        toy.make_examples("nope", 1, 0)


def test_greedy_answers_and_distillation_start_at_the_teacher():
    """The replayed answers are the model's own; the distillation term is zero at the start."""
    import copy

    import toy

    from mergekit_pcb.tiny import new_llama, tiny_llama_config

    torch.manual_seed(0)
    tokenizer = toy.toy_tokenizer()
    model = new_llama(tiny_llama_config(len(tokenizer), hidden_size=32, num_layers=1), seed=0)
    examples = toy.make_examples("sort", 40, 5) + toy.make_examples("reverse", 40, 5)
    toy.train(model, tokenizer, examples, steps=40, lr=3e-3, batch_size=32)  # learns the format
    replayed = toy.greedy_answers(model, tokenizer, examples)
    assert replayed  # some generations end with the end token within max_new
    kept = {ex.prompt for ex in replayed}
    assert [ex.prompt for ex in replayed] == [ex.prompt for ex in examples if ex.prompt in kept]
    # Teacher-forced argmax reproduces every greedy answer and its end token.
    assert bool(toy.correct(model, tokenizer, replayed).all())
    teacher = copy.deepcopy(model)
    batch = toy.encode(tokenizer, replayed[:8])
    assert float(toy._kl(model, teacher, batch)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="distill needs a teacher"):
        toy.train(model, tokenizer, examples, steps=1, distill=replayed)


def test_in_memory_merges_equal_mergekits_full_pipeline(quick, monkeypatch):
    """The grid rows merge in memory; the same config through run_merge gives the same weights."""
    report, res = quick
    sys.path.insert(0, str(ROOT / "benchmarks"))
    monkeypatch.setenv("MERGEKIT_PCB_BENCH_CACHE", str(report.parent / "cache"))
    from _quality_methods import METHODS, merge
    from _quality_run import _save_checkpoints
    from _quality_setup import QUICK, build_family, model_config

    from mergekit_pcb.tiny import new_llama

    family = build_family(QUICK, log=lambda _: None)
    assert family.train_seconds == 0.0  # everything came from the run's cache
    experts = family.experts[0]
    base = family.base.state_dict()
    model = new_llama(model_config(QUICK, family.tokenizer))
    on_disk = _save_checkpoints(model, family.tokenizer, base, experts, report / "disk")
    by_label = {m.label: m for m in METHODS}
    for label, params in (
        ("pcb", {"weight": 1.0, "lambda": 0.5, "pcb_ratio": 0.2}),
        ("ties", {"weight": 1.0, "lambda": 0.7, "density": 0.4}),
        # The search rows' test merges: one weight per expert, as in best.yml.
        (
            "pcb",
            {
                "weight": dict(zip(experts, (0.8, 1.1, 1.25), strict=True)),
                "lambda": 1.3,
                "pcb_ratio": 0.3,
            },
        ),
    ):
        method = by_label[label]
        in_memory = merge(method, base, experts, params)
        full = merge(dataclasses.replace(method, via="run_merge"), base, experts, params, on_disk)
        assert set(in_memory) == set(full)
        for name in in_memory:
            assert torch.equal(in_memory[name], full[name]), (label, name)
        changed = sum(not torch.equal(in_memory[n], base[n]) for n in base)
        assert changed > 0, label


def _rerun(quick, tmp_path, labels: str, edit=None):
    """`--methods` on a copy of the quick report: (process, the copy, the copy's json before)."""
    report, _ = quick
    copy = tmp_path / "report"
    shutil.copytree(report, copy)
    before = json.loads((copy / "results.json").read_text())
    if edit is not None:
        edit(before)
        (copy / "results.json").write_text(json.dumps(before))
    env = {**os.environ, "MERGEKIT_PCB_BENCH_CACHE": str(report.parent / "cache")}
    args = [sys.executable, str(SCRIPT), "--quick", "--out", str(copy), "--methods", labels]
    args += ["--no-plot"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    return proc, copy, before


def test_methods_rerun_adds_rows_and_checks_the_published_ones(quick, tmp_path):
    """A row missing from results.json comes back equal to the full run's, beside the kept
    rows; the overlapping row (pcb) is checked and the rerun recorded."""
    _, full = quick

    def drop(res):
        del res["methods"]["task_arithmetic"]
        del res["comparisons"]["pcb - task_arithmetic"]

    proc, copy, _ = _rerun(quick, tmp_path, "pcb, task_arithmetic", drop)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((copy / "results.json").read_text())
    assert set(merged["methods"]) == set(full["methods"])
    for label in ("task_arithmetic", "ties", "pcb"):
        assert merged["methods"][label]["per_seed_normalized"] == pytest.approx(
            full["methods"][label]["per_seed_normalized"], abs=1e-12
        )
    gap = merged["comparisons"]["pcb - task_arithmetic"]
    assert gap["points"] == pytest.approx(full["comparisons"]["pcb - task_arithmetic"]["points"])
    (rerun,) = merged["reruns"]
    assert rerun["methods"] == ["task_arithmetic", "pcb"]
    assert rerun["reproduced_exactly"] == ["pcb"]
    assert "--methods" in rerun["command"]


def test_methods_rerun_refuses_a_row_that_does_not_reproduce(quick, tmp_path):
    def tamper(res):
        res["methods"]["pcb"]["per_seed_normalized"][0] += 0.01

    proc, copy, before = _rerun(quick, tmp_path, "pcb", tamper)
    assert proc.returncode != 0
    assert "row 'pcb' does not reproduce (by 1.000 points)" in proc.stderr
    assert json.loads((copy / "results.json").read_text()) == before
    partial = json.loads((copy / "partial-results.json").read_text())
    assert list(partial["methods"]) == ["pcb"]


def test_methods_names_an_unknown_row(quick, tmp_path):
    proc, _, _ = _rerun(quick, tmp_path, "pcb,pbc")
    assert proc.returncode == 2
    assert "--methods" in proc.stderr and "unknown row 'pbc'" in proc.stderr
    assert "'pcb (model scope)'" in proc.stderr
