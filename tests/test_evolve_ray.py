"""--ray on a local 2-CPU Ray: actors score a generation in parallel, with the same results."""

from __future__ import annotations

import json

import pytest
from evolve_support import family as toy_family
from evolve_support import search_config, write_config

from mergekit_pcb.evolve.config import load_config
from mergekit_pcb.evolve.search import RunOptions, run_search

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # starts a local Ray


def test_ray_pool_matches_local_search(tmp_path):
    fam = toy_family()
    # Successive halving too: the actors score each rung's slice (4 on 24 rows, 2 on 48).
    optimizer = {
        "budget": 5,
        "popsize": 4,
        "sigma": 0.3,
        "seed": 5,
        "fidelity": {"rungs": 2, "eta": 2},
    }
    cfg = search_config(fam, optimizer=optimizer)
    yml = write_config(tmp_path / "s.yml", cfg)
    local = run_search(load_config(yml), tmp_path / "local", RunOptions(progress=False))
    distributed = run_search(
        load_config(yml),
        tmp_path / "ray",
        RunOptions(progress=False, ray=True, ray_num_cpus=2),
    )
    assert (tmp_path / "ray" / "cache" / "cache.json").exists()  # actors read the disk cache
    a = [json.loads(x) for x in (tmp_path / "local" / "history.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "ray" / "history.jsonl").read_text().splitlines()]

    def key(e):
        return (e["kind"], e["generation"], e["member"], e["rung"])

    assert sorted(map(key, b)) == sorted(map(key, a))
    assert sorted(e["rung"] for e in a if e["kind"] == "search") == [0, 0, 0, 0, 1, 1]
    by_key = {key(e): e for e in a}
    for e in b:
        ref = by_key[key(e)]
        assert e["examples"] == ref["examples"]
        assert e["x"] == ref["x"]
        for task, score in e["scores"].items():  # thread counts differ: float32 rounding only
            assert score == pytest.approx(ref["scores"][task], rel=1e-5)
    assert distributed["best_score"] == pytest.approx(local["best_score"], rel=1e-5)
    assert distributed["best_test_score"] == pytest.approx(local["best_test_score"], rel=1e-5)


def test_ray_actors_score_agreement_as_the_local_search(tmp_path):
    """The label-free task on actors: they read the experts' cached outputs from the
    search's cache folder and score every rung's slice as the local search does."""
    import toy

    fam = toy_family()
    prompts = {}
    for task, expert in zip(("max", "cipher"), fam["experts"], strict=True):
        path = tmp_path / f"{task}.jsonl"
        rows = toy.make_examples(task, 8, 11)
        path.write_text("".join(json.dumps({"text": ex.prompt}) + "\n" for ex in rows))
        prompts[expert] = str(path)
    task = {"name": "agree", "type": "agreement", "prompts": prompts, "top_k": 8}
    optimizer = {"budget": 5, "popsize": 4, "seed": 5, "fidelity": {"rungs": 2, "eta": 2}}
    cfg = search_config(fam, evaluation={"tasks": [task]}, optimizer=optimizer)
    yml = write_config(tmp_path / "s.yml", cfg)
    local = run_search(load_config(yml), tmp_path / "local", RunOptions(progress=False))
    distributed = run_search(
        load_config(yml),
        tmp_path / "ray",
        RunOptions(progress=False, ray=True, ray_num_cpus=2),
    )
    assert (tmp_path / "ray" / "cache" / "agreement").is_dir()
    a = [json.loads(x) for x in (tmp_path / "local" / "history.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "ray" / "history.jsonl").read_text().splitlines()]
    by_key = {(e["kind"], e["generation"], e["member"], e["rung"]): e for e in a}
    assert sorted(by_key) == sorted((e["kind"], e["generation"], e["member"], e["rung"]) for e in b)
    for e in b:
        ref = by_key[(e["kind"], e["generation"], e["member"], e["rung"])]
        assert (e["examples"], e["x"]) == (ref["examples"], ref["x"])
        assert e["scores"]["agree"] == pytest.approx(ref["scores"]["agree"], rel=1e-5)
    assert distributed["best_score"] == pytest.approx(local["best_score"], rel=1e-5)
    assert distributed["cost"]["expert_outputs"]["agree"]["prompts"] == 16
