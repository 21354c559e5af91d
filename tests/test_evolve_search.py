"""End to end: the search beats the default, resumes exactly, and its model is reproducible."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
import yaml
from conftest import check, run_tool
from evolve_support import family as toy_family
from evolve_support import search_config, write_config

from mergekit_pcb.evolve.cache import snap_ratio
from mergekit_pcb.evolve.config import EvolveConfigError, TaskSpec, load_config
from mergekit_pcb.evolve.search import RunOptions, run_search


@pytest.fixture(scope="module")
def toy():
    return toy_family()


def _loss(model_dir, tokenizer_dir, path) -> float:
    """Token-weighted next-token loss, computed independently of the search's scorer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for line in open(path):
            text = json.loads(line)["text"]
            ids = torch.tensor([[tok.bos_token_id, *[tok.get_vocab()[c] for c in text]]])
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[1] - 1
            total += float(out.loss) * n
            count += n
    return total / count


def test_cli_search_beats_default_and_writes_outputs(toy, tmp_path):
    cfg = search_config(toy)
    cfg["evaluation"]["tasks"][1].pop("test_data")  # one task without held-out data
    yml = write_config(tmp_path / "search.yml", cfg)
    out = tmp_path / "out"
    result = check(
        run_tool("mergekit-pcb", "evolve", yml, out, "--write-model", "--seed", "1", timeout=400)
    )
    report = json.loads((out / "report.json").read_text())
    assert report["best_score"] > report["default_score"]
    assert report["best_test_score"] is not None and report["default_test_score"] is not None
    assert report["tasks_without_test_data"] == ["cipher"]
    assert "cipher" in report["warning"] and "cipher" in result.stderr
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 12 and history[0]["kind"] == "default"  # budget: 12, exactly
    assert {"values", "scores", "objective", "seconds"} <= set(history[1])
    try:
        import matplotlib  # noqa: F401  (optional extra "plot")
    except ImportError:
        assert not (out / "progress.png").exists()
    else:
        assert (out / "progress.png").stat().st_size > 1000
    best = yaml.safe_load((out / "best.yml").read_text())
    assert best["merge_method"] == "pcb"
    assert best["parameters"]["pcb_ratio"] == report["best_values"]["pcb_ratio"][0]
    # The model mergekit wrote from best.yml scores what the search reported for it.
    loss = _loss(out / "model", toy["base"], toy["data"] / "max_val.jsonl")
    assert loss == pytest.approx(report["tasks"]["max"]["best_search"], rel=1e-5)
    # ... and the default is what it claims: lambda 1, ratio 0.1, weights 1.
    assert history[0]["values"] == {"pcb_ratio": [0.1], "lambda": 1.0, "weight": [1.0, 1.0]}


def _run(toy, out, *, budget, resume=False, seed=3):
    cfg = search_config(
        toy,
        optimizer={"budget": budget, "popsize": 3, "sigma": 0.3, "seed": seed},
        # One on-disk statistics cache for every run: built once, then reused.
        cache={"memory_gb": 0, "dir": str(out.parent / "shared-cache")},
    )
    yml = write_config(out.parent / f"{out.name}.yml", cfg)
    return run_search(load_config(yml), out, RunOptions(resume=resume, progress=False))


def _history(out):
    return [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]


def test_resume_replays_without_rescoring(toy, tmp_path):
    full = tmp_path / "full"
    _run(toy, full, budget=7)
    reference = _history(full)
    assert len(reference) == 7  # the default and two generations of 3

    # Stopped inside generation 0 (budget 3: the default and 2 of 3 members), then
    # resumed with a larger budget: the generation is completed, then told to CMA-ES.
    part = tmp_path / "part"
    _run(toy, part, budget=3)
    first = (part / "history.jsonl").read_text()
    assert len(first.splitlines()) == 3
    report = _run(toy, part, budget=7, resume=True)
    resumed = _history(part)
    assert (part / "history.jsonl").read_text().startswith(first)  # old lines untouched
    assert [e["x"] for e in resumed] == [e["x"] for e in reference]
    assert [e["objective"] for e in resumed] == pytest.approx([e["objective"] for e in reference])
    assert report["best_score"] == pytest.approx(max(e["objective"] for e in reference))

    # Killed in the middle of generation 1: only the two missing members are scored.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    lines = (cut / "history.jsonl").read_text().splitlines(keepends=True)
    (cut / "history.jsonl").write_text("".join(lines[:5]) + lines[5][:20])  # torn last line
    _run(toy, cut, budget=7, resume=True)
    again = _history(cut)
    assert again[:5] == reference[:5]  # same seconds too: not re-evaluated
    assert sorted(e["member"] for e in again if e["generation"] == 1) == [0, 1, 2]
    assert len(again) == 7
    assert [e["x"] for e in again] == [e["x"] for e in reference]


def test_refuses_existing_search_and_changed_config(toy, tmp_path):
    out = tmp_path / "o"
    (out / "run.json").parent.mkdir()
    (out / "history.jsonl").write_text('{"kind": "default"}\n')
    with pytest.raises(EvolveConfigError, match="--resume"):
        _run(toy, out, budget=3)
    (out / "run.json").write_text('{"fingerprint": "0"}')
    with pytest.raises(EvolveConfigError, match="different config"):
        _run(toy, out, budget=3, resume=True, seed=4)


def _python_search(toy, tmp_path, name, base=None, **overrides):
    """A search whose tasks are python functions with kwargs, on a base without tokenizer."""
    bare = tmp_path / "bare-base"
    if not bare.exists():
        shutil.copytree(toy["base"], bare, ignore=shutil.ignore_patterns("*token*", "*.model"))
    (tmp_path / "kw_scorers.py").write_text(
        "import toy\n"
        "from mergekit_pcb.evolve.tasks import loss_scorer\n"
        "SEEN = []\n"
        "def score(model, tokenizer, task, n, shift=0.0):\n"
        "    SEEN.append(tokenizer)\n"
        "    rows = [{'text': e.prompt + e.answer} for e in toy.make_examples(task, n, 11)]\n"
        "    return shift + loss_scorer(rows, toy.toy_tokenizer(), 64)(model)\n"
    )
    fn = "kw_scorers:score"
    cfg = search_config(
        toy,
        base_model=str(base or bare),
        evaluation={
            "tasks": [
                {
                    "name": "a",
                    "type": "python",
                    "function": fn,
                    "higher_is_better": False,
                    "kwargs": {"task": "max", "n": 24},
                },
                {
                    "name": "b",
                    "type": "python",
                    "function": fn,
                    "higher_is_better": False,
                    "kwargs": {"task": "max", "n": 24, "shift": 1.0},
                    "test_function": fn,
                    "test_kwargs": {"task": "max", "n": 24, "shift": 5.0},
                },
            ]
        },
        **overrides,
    )
    yml = write_config(tmp_path / f"{name}.yml", cfg)
    return tmp_path / name, load_config(yml)


def test_python_tasks_take_kwargs_and_need_no_tokenizer(toy, tmp_path, caplog):
    out, cfg = _python_search(
        toy, tmp_path, "py", optimizer={"budget": 3, "popsize": 2, "sigma": 0.3, "seed": 0}
    )
    with caplog.at_level("WARNING", logger="mergekit_pcb.evolve"):
        report = run_search(cfg, out, RunOptions(progress=False, root=tmp_path))
    seen = sys.modules["kw_scorers"].SEEN
    assert seen and all(t is None for t in seen)  # the base has no tokenizer files
    said = [r.getMessage() for r in caplog.records if "tokenizer=None" in r.getMessage()]
    assert len(said) == 1 and "bare-base" in said[0], said  # said once, naming the base
    history = _history(out)
    assert len(history) == 3
    for entry in history:  # the same function; only the kwargs differ
        assert entry["scores"]["b"] == pytest.approx(entry["scores"]["a"] + 1.0, abs=1e-6)
    tasks = report["tasks"]
    assert tasks["b"]["default_test"] == pytest.approx(tasks["b"]["default_search"] + 4.0, abs=1e-6)


def test_python_tasks_get_the_bases_tokenizer_without_the_key(toy, tmp_path, caplog):
    """As before the tokenizer: key existed: a python function may use the base's tokenizer."""
    out, cfg = _python_search(toy, tmp_path, "with-tok", base=toy["base"], optimizer={"budget": 1})
    assert cfg.tokenizer is None
    with caplog.at_level("WARNING", logger="mergekit_pcb.evolve"):
        run_search(cfg, out, RunOptions(progress=False, root=tmp_path))
    seen = sys.modules["kw_scorers"].SEEN[-2:]  # the default's two tasks
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(toy["base"]).get_vocab()
    assert all(t is not None and t.get_vocab() == vocab for t in seen)
    assert not [r for r in caplog.records if "tokenizer" in r.getMessage()]


def test_missing_tokenizer_fails_before_any_work(toy, tmp_path):
    out, cfg = _python_search(toy, tmp_path, "tok", optimizer={"budget": 1})
    loss_task = {"name": "c", "type": "loss", "data": str(toy["data"] / "max_val.jsonl")}
    tasks = [*cfg.evaluation.tasks, TaskSpec.model_validate(loss_task)]
    needs = cfg.model_copy(
        update={"evaluation": cfg.evaluation.model_copy(update={"tasks": tasks})}
    )
    with pytest.raises(EvolveConfigError, match=r"tokenizer: cannot load .*bare-base.*task\(s\) c"):
        run_search(needs, out, RunOptions(progress=False, root=tmp_path))
    assert not out.exists()  # nothing written, no cache built
    # The tokenizer key names where the tokenizer is: the same search then runs.
    named = needs.model_copy(update={"tokenizer": toy["base"]})
    report = run_search(named, out, RunOptions(progress=False, root=tmp_path))
    assert report["candidates"] == 1
    assert sys.modules["kw_scorers"].SEEN[-1] is not None  # python tasks get the named one


def test_start_point_and_sweep_come_first_and_cma_starts_at_their_best(toy, tmp_path):
    optimizer = {
        "budget": 1 + 1 + 4 + 3,
        "popsize": 3,
        "sigma": 1e-4,  # gen 0 stays next to CMA's mean: the best warm-up point
        "seed": 0,
        "start": {"pcb_ratio": 0.3, "lambda": 2.0},
        "sweep": [2, 2],
    }
    # An objective that grows with lambda, so the best warm-up point is not the default.
    (tmp_path / "norm_scorer.py").write_text(
        "def score(model, tokenizer):\n"
        "    return float(sum(p.double().square().sum() for p in model.parameters()))\n"
    )
    task = {"name": "norm", "type": "python", "function": "norm_scorer:score"}
    cfg = search_config(toy, optimizer=optimizer, evaluation={"tasks": [task]})
    yml = write_config(tmp_path / "warm.yml", cfg)
    out = tmp_path / "warm"
    report = run_search(load_config(yml), out, RunOptions(progress=False, root=tmp_path))
    history = _history(out)
    assert [e["kind"] for e in history] == ["default", "start"] + ["sweep"] * 4 + ["search"] * 3
    assert report["candidates"] == 9
    # search_config: lambda [0.5, 2.5], pcb_ratio [0.05, 0.9], weight [0.5, 1.5].
    assert history[1]["values"] == {"pcb_ratio": [0.3], "lambda": 2.0, "weight": [1.0, 1.0]}
    grid = [(e["values"]["lambda"], e["values"]["pcb_ratio"][0]) for e in history[2:6]]
    # pcb_ratio snapped to the cached levels (3 decimals), as every candidate's is.
    expected = [(lam, snap_ratio(r, 0.05, 0.9)) for lam in (1.0, 2.0) for r in (0.2625, 0.6875)]
    assert grid == [pytest.approx(pair) for pair in expected]
    assert all(e["values"]["weight"] == [1.0, 1.0] for e in history[2:6])
    best_warm = max(history[:6], key=lambda e: e["objective"])
    assert best_warm["kind"] != "default"  # else this test could not tell the start apart
    for e in history[6:]:
        assert e["x"] == pytest.approx(best_warm["x"], abs=1e-2)


WITHOUT_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # as if the [plot] extra were not installed
from mergekit_pcb.cli import main
sys.argv = ["mergekit-pcb", "evolve", {yml!r}, {out!r}, "--no-progress"]
main()
"""


def test_cli_without_matplotlib_warns_once_and_prints_the_summary(toy, tmp_path):
    """Issue 14, rows 13 and 14: progress.png went missing silently (only cma's own
    matplotlib warning), and the summary was one cryptic line."""
    from conftest import run_python

    cfg = search_config(toy, optimizer={"budget": 4, "popsize": 3, "sigma": 0.3, "seed": 0})
    yml = write_config(tmp_path / "search.yml", cfg)
    out = tmp_path / "out"
    result = run_python(
        WITHOUT_MATPLOTLIB.format(yml=str(yml), out=str(out)), env={"HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "matplotlib" in line] == [
        "WARNING mergekit_pcb.evolve: progress.png skipped: matplotlib is not installed "
        "(pip install 'mergekit-pcb[plot]')"
    ]
    assert not (out / "progress.png").exists()

    report = json.loads((out / "report.json").read_text())
    lines = result.stdout.splitlines()

    def row(label: str) -> list[str]:
        (line,) = [line for line in lines if line.startswith(label)]
        return line[len(label) :].split()

    def numbers(*values) -> list[str]:
        return [f"{v:.6g}" for v in values]

    assert row("objective (higher is better)") == numbers(
        report["default_score"],
        report["best_score"],
        report["default_test_score"],
        report["best_test_score"],
    )
    for task in ("max", "cipher"):
        scores = report["tasks"][task]
        assert row(f"{task} (loss, lower is better)") == numbers(
            scores["default_search"],
            scores["best_search"],
            scores["default_test"],
            scores["best_test"],
        )
    assert lines[-2] == (
        f"best of 4 candidates (the default included): {out / 'best.yml'}; files in {out}: "
        "best.yml, report.json, history.jsonl"
    )
    assert lines[-3].startswith(
        f"scored 4 candidates on {report['examples_scored']:,} examples (budget: 4 candidates)"
    )
    assert lines[-1] == f"next: mergekit-yaml {out / 'best.yml'} ./merged  (the model it scored)"
