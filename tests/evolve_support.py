"""Shared, built-once material for the evolve tests (no tests of its own).

Experts are really fine-tuned (a few seconds each) from one random base on two
toy tasks, so the merged model's scores move with pcb_ratio, lambda and weights.
Built once per process (``lru_cache``) and shared by every evolve test module.
"""

from __future__ import annotations

import copy
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
import yaml

TASKS = ("max", "cipher")


@lru_cache(maxsize=1)
def family() -> dict:
    import toy

    from mergekit_pcb.tiny import new_llama, save_model, tiny_llama_config

    root = Path(tempfile.mkdtemp(prefix="evolve-family-"))
    tokenizer = toy.toy_tokenizer()
    config = tiny_llama_config(
        len(tokenizer), hidden_size=48, num_layers=2, max_position_embeddings=32
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = new_llama(config, seed=0)
        save_model(base, root / "base", tokenizer)
        experts = []
        for i, task in enumerate(TASKS):
            expert = copy.deepcopy(base)
            toy.train(
                expert,
                tokenizer,
                toy.make_examples(task, 400, 1),
                steps=120,
                lr=3e-3,
                batch_size=32,
                seed=i,
            )
            experts.append(str(save_model(expert, root / task, tokenizer)))
    finally:
        torch.set_num_threads(threads)
    data = root / "data"
    data.mkdir()
    for task in TASKS:
        for split, seed, n in (("val", 11, 48), ("test", 12, 48)):
            rows = toy.make_examples(task, n, seed)
            with (data / f"{task}_{split}.jsonl").open("w") as fh:
                for ex in rows:
                    fh.write(json.dumps({"text": ex.prompt + ex.answer}) + "\n")
            with (data / f"{task}_{split}_em.jsonl").open("w") as fh:
                for ex in rows:
                    fh.write(json.dumps({"prompt": ex.prompt, "answer": ex.answer}) + "\n")
    return {"root": root, "base": str(root / "base"), "experts": experts, "data": data}


def search_config(fam: dict, **overrides) -> dict:
    data = fam["data"]
    cfg = {
        "base_model": fam["base"],
        "models": list(fam["experts"]),
        "search": {
            "pcb_ratio": [0.05, 0.9],
            "lambda": [0.5, 2.5],
            "weight": [0.5, 1.5],
            "layer_groups": 1,
        },
        "parameters": {"clamp_ratio": 0.001},
        "evaluation": {
            "tasks": [
                {
                    "name": task,
                    "type": "loss",
                    "data": str(data / f"{task}_val.jsonl"),
                    "test_data": str(data / f"{task}_test.jsonl"),
                }
                for task in TASKS
            ]
        },
        "optimizer": {"budget": 12, "popsize": 6, "sigma": 0.3, "seed": 0},
        "dtype": "float32",
        "device": "cpu",
    }
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def loss_search_config(family, tmp_path: Path, **overrides):
    """A validated search over ``family`` (a conftest Family) with one tiny loss task:
    for tests of the cache and the candidates, where the score does not matter."""
    from mergekit_pcb.evolve.config import EvolveConfig

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "abc"}) + "\n")
    raw = {
        "base_model": str(family.base),
        "models": [str(p) for p in family.experts],
        "evaluation": {"tasks": [{"name": "t", "type": "loss", "data": str(data)}]},
    }
    raw.update(overrides)
    return EvolveConfig.model_validate(raw)


def planned_cache(cfg, **build):
    """(layout, planned tensors, their groups, the statistics cache) of a validated search
    config, as the search's steps 1 and 2 make them (``build``: cache.build's options;
    memory_bytes 0 by default)."""
    from mergekit_pcb.evolve import cache as cache_mod
    from mergekit_pcb.evolve import layout as layout_mod

    layout = layout_mod.build_layout(cfg.inputs, cfg.search.layer_groups)
    planned, groups = layout_mod.tensor_groups(cfg.inputs, layout)
    options = {"cache_dir": None, "memory_bytes": 0, **build}
    levels = cache_mod.ratio_levels(cfg.search)
    cache = cache_mod.build(planned, groups, cfg.inputs, levels, **options)
    return layout, planned, groups, cache
