"""optimizer.rescore: the search's best few are re-ranked on a larger split (issue 17).

The search split's scores here are built so the re-ranking must change the answer:
a python task returns the weights' squared norm on the search split and its negative
on the rescore split, so the rescore ranks the search's k best in reverse, and the
expected result (the k-th best on the search split) is known without the code.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from evolve_support import family as toy_family
from evolve_support import search_config, write_config

from mergekit_pcb.evolve.config import EvolveConfigError, TaskSpec, load_config
from mergekit_pcb.evolve.report import format_summary
from mergekit_pcb.evolve.search import RunOptions, run_search

NORM = (
    "def score(model, tokenizer, sign=1.0):\n"
    "    return sign * float(sum(p.double().square().sum() for p in model.parameters()))\n"
)


@pytest.fixture(scope="module")
def toy():
    return toy_family()


def _norm_search(toy, tmp_path, *, rescore: int):
    (tmp_path / "norm_scorer.py").write_text(NORM)
    task = {
        "name": "norm",
        "type": "python",
        "function": "norm_scorer:score",
        "rescore_kwargs": {"sign": -1.0},
    }
    optimizer = {"budget": 7, "popsize": 3, "sigma": 0.3, "seed": 0, "rescore": rescore}
    cfg = search_config(toy, optimizer=optimizer, evaluation={"tasks": [task]})
    out = tmp_path / f"out{rescore}"
    yml = write_config(tmp_path / f"rescore{rescore}.yml", cfg)
    report = run_search(load_config(yml), out, RunOptions(progress=False, root=tmp_path))
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    return report, history, yaml.safe_load((out / "best.yml").read_text())


def test_rescore_picks_the_best_finalist_on_the_rescore_split(toy, tmp_path):
    k = 3
    report, history, best_yml = _norm_search(toy, tmp_path, rescore=k)
    assert len(history) == 7  # the rescore does not spend the budget
    finalists = sorted(history, key=lambda e: e["objective"], reverse=True)[:k]
    rows = report["rescore"]["candidates"]
    assert [row["index"] for row in rows] == [e["index"] for e in finalists]
    # Search score = 1 + (norm - default's) / default's = norm / default's; on the rescore
    # split the score is -norm, so 1 + (default's - norm) / default's = 2 - search score.
    for row, entry in zip(rows, finalists, strict=True):
        assert row["search_score"] == entry["objective"]
        assert row["rescore_score"] == pytest.approx(2 - entry["objective"], rel=1e-12)
    assert report["rescore"]["default_score"] == 1.0
    # The rescore split reverses the order: the k-th best on the search split wins.
    chosen = finalists[-1]
    assert finalists[0]["objective"] > chosen["objective"]  # else the test proves nothing
    assert report["best_index"] == chosen["index"] == report["rescore"]["best_index"]
    assert report["best_values"] == chosen["values"]
    assert report["best_score"] == chosen["objective"]
    assert report["best_rescore_score"] == pytest.approx(2 - chosen["objective"], rel=1e-12)
    assert best_yml["parameters"]["lambda"] == pytest.approx(chosen["values"]["lambda"])
    lines = format_summary(report, [], tmp_path).splitlines()
    assert lines[-4] == (
        f"rescore split: default 1, best {2 - chosen['objective']:.6g} "
        f"(candidate #{chosen['index']}, {k} of the {k} best on the search split)"
    )


def test_without_rescore_the_best_on_the_search_split_wins(toy, tmp_path):
    report, history, _ = _norm_search(toy, tmp_path, rescore=0)
    top = max(history, key=lambda e: e["objective"])
    assert report["best_index"] == top["index"] and "rescore" not in report


def test_rescore_split_of_a_data_task_is_the_whole_file(toy):
    """``limit`` cuts the search split only: the rescore reads every line (or rescore_data)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_pcb.evolve.tasks import make_scorer

    model = AutoModelForCausalLM.from_pretrained(toy["base"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy["base"])
    val, test = (str(toy["data"] / f"max_{s}.jsonl") for s in ("val", "test"))

    def score(split, **spec):
        task = TaskSpec(name="t", type="loss", **{"data": val, **spec})
        return make_scorer(task, split, model, tokenizer, None)(model)

    whole = score("search")
    assert score("rescore", limit=8) == whole != score("search", limit=8)
    assert score("rescore", limit=8, rescore_data=test) == score("search", data=test)


@pytest.mark.parametrize(
    "optimizer, task, message",
    [
        (
            {"rescore": 2},
            {"name": "em", "type": "exact_match", "data": "val.jsonl"},
            "optimizer.rescore: task 'em' has no rescore split; give it rescore_data",
        ),
        (
            {"rescore": 2},
            {"name": "py", "type": "python", "function": "m:f"},
            "optimizer.rescore: task 'py' has no rescore split; give it rescore_kwargs",
        ),
        (
            {"rescore": 5, "budget": 4},
            {"name": "em", "type": "exact_match", "data": "val.jsonl", "limit": 1},
            "optimizer.rescore: 5 is more than the budget's 4 candidates",
        ),
        (
            {"rescore": -1},
            {"name": "em", "type": "exact_match", "data": "val.jsonl"},
            "optimizer.rescore",
        ),
        (
            {},
            {"name": "py", "type": "python", "function": "m:f", "rescore_data": "val.jsonl"},
            "'rescore_data' is only for types loss, exact_match, choice",
        ),
        (
            {},
            {"name": "em", "type": "exact_match", "data": "val.jsonl", "rescore_kwargs": {}},
            "'kwargs'/'test_kwargs'/'rescore_kwargs' are only for type python",
        ),
        (
            {},
            {"name": "em", "type": "exact_match", "data": "val.jsonl", "rescore_data": "no.jsonl"},
            "task 'em': rescore_data file 'no.jsonl' does not exist",
        ),
    ],
)
def test_rescore_config_errors_name_the_key(tmp_path, optimizer, task, message):
    (tmp_path / "val.jsonl").write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
    cfg = {
        "base_model": "no/such-base",
        "models": ["no/such-a", "no/such-b"],
        "evaluation": {"tasks": [task]},
        "optimizer": optimizer,
    }
    path = tmp_path / "s.yml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(EvolveConfigError) as info:
        load_config(path)
    assert message in str(info.value) and "\n" not in str(info.value)
