"""Task scorers against independent computations; the objective by hand and by property."""

from __future__ import annotations

import json
import math

import pytest
import torch
import toy
from evolve_support import family as toy_family
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_pcb.evolve.config import TaskSpec
from mergekit_pcb.evolve.objective import Objective
from mergekit_pcb.evolve.tasks import choice_scorer, exact_match_scorer, loss_scorer


@pytest.fixture(scope="module")
def expert():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = toy_family()
    path = fam["experts"][0]  # fine-tuned on max
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path), fam


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_exact_match_generation_agrees_with_teacher_forcing(expert):
    """Greedy generation (ours) vs one teacher-forced pass (toy.correct): same verdicts."""
    model, tok, fam = expert
    total = 0.0
    for task in ("max", "cipher"):
        rows = _rows(fam["data"] / f"{task}_val_em.jsonl")
        ours = exact_match_scorer(rows, tok, batch_size=16, max_new_tokens=None)(model)
        examples = [toy.Example(task, r["prompt"], r["answer"]) for r in rows]
        assert ours == pytest.approx(toy.exact_match(model, tok, examples), abs=1e-9)
        total += ours
    assert total > 0  # the fine-tuned expert gets some answers right


def test_loss_matches_transformers_loss(expert):
    model, tok, fam = expert
    rows = _rows(fam["data"] / "max_val.jsonl")[:10]
    ours = loss_scorer(rows, tok, batch_size=4)(model)
    total, count = 0.0, 0
    for r in rows:
        ids = torch.tensor([[tok.bos_token_id, *tok(r["text"])["input_ids"]]])
        total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert ours == pytest.approx(total / count, rel=1e-5)


def test_choice_picks_highest_likelihood(expert):
    model, tok, _ = expert
    rows = [
        {"prompt": "r:1234=", "choices": ["4321", "1234", "9"], "label": 0},
        {"prompt": "r:5678=", "choices": ["5678", "8765"], "label": 1},
        {"prompt": "r:9012=", "choices": ["2109", "0000"], "label": 1},
    ]
    ours = choice_scorer(rows, tok, batch_size=3)(model)
    right = 0
    for r in rows:
        scores = []
        for c in r["choices"]:
            ids = [tok.bos_token_id, *tok(r["prompt"] + c)["input_ids"]]
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            start = 1 + len(r["prompt"])
            scores.append(sum(float(logp[i - 1, ids[i]]) for i in range(start, len(ids))))
        right += max(range(len(scores)), key=scores.__getitem__) == r["label"]
    assert ours == pytest.approx(right / len(rows))


def _task(name, kind, weight=1.0, **kw):
    data = {"data": "x"} if kind in ("loss", "exact_match", "choice") else {}
    if kind == "python":
        data["function"] = "m:f"
    return TaskSpec.model_validate({"name": name, "type": kind, "weight": weight, **data, **kw})


def test_objective_hand_worked():
    tasks = [_task("l", "loss", 1.0), _task("a", "exact_match", 3.0)]
    obj = Objective.from_default(tasks, {"l": 2.0, "a": 0.01})
    # scales: |2.0| and max(0.01, floor 0.05) = 0.05; the default is 1 on every task
    assert obj({"l": 2.0, "a": 0.01}) == 1.0
    # loss: 1 - (1.0 - 2.0) / 2 = 1.5; accuracy: 1 + (0.06 - 0.01) / 0.05 = 2.0
    assert obj({"l": 1.0, "a": 0.06}) == pytest.approx((1.5 + 3 * 2.0) / 4)


@settings(max_examples=60, deadline=None)
@given(
    defaults=st.lists(st.floats(-5, 5, allow_nan=False), min_size=3, max_size=3),
    scores=st.lists(st.floats(-5, 5, allow_nan=False), min_size=3, max_size=3),
    weights=st.lists(st.floats(0.1, 10), min_size=3, max_size=3),
    which=st.integers(0, 2),
    step=st.floats(1e-3, 3),
)
def test_objective_rewards_any_improvement(defaults, scores, weights, which, step):
    """Improving one task in its own direction, others fixed, raises the objective."""
    tasks = [
        _task("l", "loss", weights[0]),
        _task("e", "exact_match", weights[1]),
        _task("p", "python", weights[2], higher_is_better=False),
    ]
    names = [t.name for t in tasks]
    obj = Objective.from_default(tasks, dict(zip(names, defaults, strict=True)))
    before = dict(zip(names, scores, strict=True))
    after = dict(before)
    after[names[which]] += step * tasks[which].sign
    assert obj(after) > obj(before)
    assert math.isfinite(obj(after))
