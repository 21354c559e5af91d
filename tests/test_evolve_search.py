"""End to end: the search beats the default, resumes exactly, and its model is reproducible."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import check, run_tool
from evolve_support import family as toy_family
from evolve_support import search_config, write_config

from mergekit_pcb.evolve.config import EvolveConfigError, load_config
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
    assert len(history) == 1 + 12 and history[0]["kind"] == "default"
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
        # One on-disk T~/B cache for every run: built once, then reused.
        cache={"memory_gb": 0, "dir": str(out.parent / "shared-cache")},
    )
    yml = write_config(out.parent / f"{out.name}.yml", cfg)
    return run_search(load_config(yml), out, RunOptions(resume=resume, progress=False))


def _history(out):
    return [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]


def test_resume_replays_without_rescoring(toy, tmp_path):
    full = tmp_path / "full"
    _run(toy, full, budget=6)
    reference = _history(full)
    assert len(reference) == 7

    # Stopped after one generation, then resumed with a larger budget.
    part = tmp_path / "part"
    _run(toy, part, budget=3)
    first = (part / "history.jsonl").read_text()
    report = _run(toy, part, budget=6, resume=True)
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
    _run(toy, cut, budget=6, resume=True)
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
