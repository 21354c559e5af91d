"""The lm_eval task type runs offline on a local task directory (lm-evaluation-harness)."""

from __future__ import annotations

import json

import pytest
import torch
from evolve_support import family as toy_family

from mergekit_pcb.evolve.config import TaskSpec
from mergekit_pcb.evolve.tasks import choice_scorer, lm_eval_scorer

pytest.importorskip("lm_eval")

TASK_YAML = """task: toy_max_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""


def test_lm_eval_local_task_offline(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fam = toy_family()
    rows = []
    for line in (fam["data"] / "max_val_em.jsonl").read_text().splitlines()[:16]:
        r = json.loads(line)
        wrong = str((int(r["answer"]) + 5) % 10)
        label = len(rows) % 2
        choices = [r["answer"], wrong] if label == 0 else [wrong, r["answer"]]
        rows.append({"prompt": r["prompt"], "choices": choices, "label": label})
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy.yaml").write_text(TASK_YAML.format(data=data))
    spec = TaskSpec.model_validate(
        {
            "name": "lm",
            "type": "lm_eval",
            "batch_size": 8,
            "lm_eval_tasks": ["toy_max_choice"],
            "include_path": str(tmp_path / "tasks"),
        }
    )
    scores = {}
    for name, path in (("expert", fam["experts"][0]), ("base", fam["base"])):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path)
        scored = lm_eval_scorer(spec, tok, model, None)(model)
        assert scored.examples == len(rows)  # lm-eval's own count of the documents
        scores[name] = scored.score
        if name == "expert":  # our own log-likelihood chooser agrees
            assert scores[name] == pytest.approx(choice_scorer(rows, tok, 8)(model))
    assert scores["expert"] > scores["base"]
