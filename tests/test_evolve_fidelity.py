"""Successive halving inside a real search: who goes on, what a slice's score is, resume
after SIGKILL mid-halving, budgets in examples, and the counts the user sees."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import check, run_tool
from evolve_support import family as toy_family
from evolve_support import search_config, write_config

from mergekit_pcb.evolve.config import load_config
from mergekit_pcb.evolve.search import RunOptions, run_search, write_model

ROOT = Path(__file__).resolve().parents[1]
ROWS = 48  # lines of each evolve_support data file
# A loss task as a python function with a fidelity slice (limit=n: its first n rows);
# the call numbered STOP_AT (counted in COUNTER) waits, so a test can kill it there.
SCORER = """
import json, os, pathlib, time
from mergekit_pcb.evolve.tasks import loss_scorer

def score(model, tokenizer, data, counter, limit):
    path = pathlib.Path(counter)
    calls = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(calls))
    if calls == int(os.environ.get("STOP_AT", "0")):
        time.sleep(300)
    rows = [json.loads(line) for line in open(data)][:limit]
    return loss_scorer(rows, tokenizer, 16)(model)
"""


@pytest.fixture(scope="module")
def toy():
    return toy_family()


def _config(toy, folder: Path, name: str, **optimizer) -> Path:
    (folder / "slice_scorer.py").write_text(SCORER)
    task = {
        "name": "max",
        "type": "python",
        "function": "slice_scorer:score",
        "higher_is_better": False,
        "examples": ROWS,
        "kwargs": {"data": str(toy["data"] / "max_val.jsonl"), "counter": str(folder / name)},
    }
    settings = {"popsize": 6, "seed": 2, "fidelity": {"rungs": 3, "eta": 2}, **optimizer}
    cfg = search_config(
        toy,
        evaluation={"tasks": [task]},
        optimizer=settings,
        cache={"dir": str(folder / "shared-cache")},
    )
    return write_config(folder / f"{name}.yml", cfg)


def _history(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]


# default 48 examples; a round of 6: 6 x 12 + 3 x 24 + 1 x 48 = 192; two rounds.
BUDGET = 48 + 2 * 192


@pytest.fixture(scope="module")
def uninterrupted(toy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sh")
    yml = _config(toy, folder, "whole", budget_examples=BUDGET)
    out = folder / "out"
    report = run_search(load_config(yml), out, RunOptions(progress=False, root=folder))
    return folder, out, report


def test_rungs_promote_the_best_of_each_slice_and_count_examples(uninterrupted):
    _, out, report = uninterrupted
    history = _history(out)
    rounds = sorted({e["generation"] for e in history if e["kind"] == "search"})
    assert rounds == [0, 1]
    for g in rounds:
        entries = [e for e in history if e["kind"] == "search" and e["generation"] == g]
        by_rung = [{e["member"]: e for e in entries if e["rung"] == r} for r in range(3)]
        assert [len(r) for r in by_rung] == [6, 3, 1]  # eta 2: 6 -> 3 -> 1
        assert [sorted({e["examples"] for e in r.values()}) for r in by_rung] == [[12], [24], [48]]
        for lower, upper in zip(by_rung, by_rung[1:], strict=False):
            dropped = set(lower) - set(upper)
            for m in upper:  # no promoted member scored lower on that slice than a dropped one
                assert all(lower[m]["objective"] >= lower[d]["objective"] for d in dropped)
            assert all(upper[m]["x"] == lower[m]["x"] for m in upper)
    assert report["examples_scored"] == sum(e["examples"] for e in history) == BUDGET
    assert report["candidates"] == 1 + 12 and report["budget"] == {
        "unit": "examples",
        "limit": BUDGET,
        "used": BUDGET,
    }
    # The result is the best of the candidates scored on the whole split (never a slice).
    whole = [e for e in history if e["rung"] == 2]
    assert report["best_index"] == max(whole, key=lambda e: e["objective"])["index"]
    per = {row["index"]: row for row in report["per_candidate"]}
    assert sum(row["examples"] for row in per.values()) == BUDGET
    assert per[report["best_index"]]["reached"] == 2


def _loss(model_dir: Path, rows: list[dict]) -> float:
    """Token-weighted next-token loss, computed apart from the search's scorers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([[tok.bos_token_id, *[tok.get_vocab()[c] for c in row["text"]]]])
            n = ids.shape[1] - 1
            total += float(model(input_ids=ids, labels=ids).loss) * n
            count += n
    return total / count


def test_a_slice_score_is_a_one_shot_score_on_those_examples(toy, uninterrupted):
    """A candidate's score on a rung equals scoring mergekit's merge of it on exactly that
    rung's examples (the first 12, or all 48 on the last rung)."""
    import yaml

    from mergekit_pcb.evolve import layout as layout_mod

    folder, out, report = uninterrupted
    rows = [json.loads(line) for line in (toy["data"] / "max_val.jsonl").open()]
    history = _history(out)
    dropped = next(e for e in history if e["kind"] == "search" and e["rung"] == 0)
    best = next(e for e in history if e["index"] == report["best_index"])
    cfg = load_config(folder / "whole.yml")
    layout = layout_mod.build_layout(cfg.inputs, 1)
    for entry, n in ((dropped, 12), (best, ROWS)):
        values = layout_mod.Values.from_json(entry["values"])
        yml = folder / f"cand{entry['index']}.yml"
        yml.write_text(yaml.safe_dump(layout_mod.merge_config(cfg.inputs, values, layout)))
        write_model(yml, folder / f"model{entry['index']}", cfg.inputs)
        one_shot = _loss(folder / f"model{entry['index']}", rows[:n])
        assert entry["scores"]["max"] == pytest.approx(one_shot, rel=1e-5)
        assert entry["examples"] == n


def test_resume_after_sigkill_mid_halving_ends_with_the_same_best(toy, uninterrupted, tmp_path):
    _, _, reference = uninterrupted
    yml = _config(toy, tmp_path, "killed", budget_examples=BUDGET)
    out = tmp_path / "out"
    # Call 9: round 0, rung 1, its second member (1 default + 6 on rung 0 + 1 before it).
    env = {**os.environ, "STOP_AT": "9", "HF_HUB_OFFLINE": "1"}
    cli = Path(sys.executable).parent / "mergekit-pcb"
    proc = subprocess.Popen(
        [str(cli), "evolve", str(yml), str(out), "--no-progress"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    counter = tmp_path / "killed"
    deadline = time.monotonic() + 240
    while not (counter.exists() and counter.read_text() == "9"):
        assert proc.poll() is None and time.monotonic() < deadline, "the search never got there"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _history(out)
    assert [(e["generation"], e["rung"]) for e in before][-2:] == [(0, 0), (0, 1)]
    report = run_search(
        load_config(yml), out, RunOptions(resume=True, progress=False, root=tmp_path)
    )
    after = _history(out)
    assert after[: len(before)] == before  # nothing scored twice
    whole = _history(uninterrupted[1])
    assert [(e["generation"], e["member"], e["rung"], e["x"]) for e in after] == [
        (e["generation"], e["member"], e["rung"], e["x"]) for e in whole
    ]
    assert report["best_values"] == reference["best_values"]
    assert report["best_score"] == pytest.approx(reference["best_score"], rel=1e-6)
    assert report["examples_scored"] == reference["examples_scored"]


def test_budget_below_one_slice_is_one_line_naming_the_key(toy, tmp_path):
    # 48 (the default on the whole split) + 12 (one candidate's smallest slice) = 60
    yml = _config(toy, tmp_path, "bad", budget_examples=50)
    result = run_tool("mergekit-pcb", "evolve", yml, tmp_path / "o", "--no-progress")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "optimizer.budget_examples: 50 is less than the 60 examples" in lines[0]
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"budget": 10, "budget_examples": 400},
            "optimizer.budget_examples: give the budget in candidates (budget) or in examples",
        ),
        ({"budget": 10, "method": "tpe", "sigma": 0.3}, "optimizer.sigma: only method cmaes"),
        (
            {"budget": 10, "fidelity": {"rungs": 7, "eta": 2}},
            "optimizer.fidelity: 7 rungs of eta 2",
        ),
        (
            {"budget": 5, "examples": None},
            "optimizer.fidelity: task 'max' (python) has no 'examples",
        ),
    ],
)
def test_bad_combinations_name_the_key(toy, tmp_path, change, message):
    import yaml

    from mergekit_pcb.evolve.config import EvolveConfigError

    optimizer = {k: v for k, v in change.items() if k != "examples"}
    yml = _config(toy, tmp_path, "bad", **optimizer)
    if "examples" in change:
        data = yaml.safe_load(yml.read_text())
        data["evaluation"]["tasks"][0].pop("examples")
        yml.write_text(yaml.safe_dump(data))
    with pytest.raises(EvolveConfigError, match=re.escape(message)):
        run_search(load_config(yml), tmp_path / "o", RunOptions(progress=False, root=tmp_path))
    assert not (tmp_path / "o").exists()


def _bar_end(stderr: str) -> str:
    """The search bar's last state, as tqdm redraws it (carriage returns)."""
    states = [s for s in re.split(r"[\r\n]", stderr) if s.startswith("search:")]
    return states[-1]


@pytest.mark.parametrize("budget", [{"budget": 9}, {"budget_examples": 300}])
def test_bar_summary_and_report_count_the_same(toy, tmp_path, budget):
    """Issue 25, item 5: the bar ended at 31/31 while the summary said 32 candidates."""
    yml = _config(toy, tmp_path, "count", **budget)
    out = tmp_path / "out"
    result = check(run_tool("mergekit-pcb", "evolve", yml, out, timeout=400))
    report = json.loads((out / "report.json").read_text())
    bar = _bar_end(result.stderr)
    candidates, examples = report["candidates"], report["examples_scored"]
    if "budget" in budget:
        assert f" {candidates}/9 " in bar and candidates == 9
        assert f"{examples} ex" in bar
    else:
        assert f" {examples}/300 " in bar and examples <= 300
        assert f"{candidates} cand" in bar
    assert len(_history(out)) == report["cost"]["search"]["scorings"]
    summary = result.stdout
    assert f"scored {candidates} candidates on {examples:,} examples" in summary
    assert f"best of {candidates} candidates (the default included)" in summary
    # The default's objective is a real value: 1 on the search split, not "0 / 0".
    assert report["default_score"] == 1.0
    assert re.search(r"objective \(higher is better\)\s+1\s", summary)
