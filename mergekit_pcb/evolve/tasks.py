"""Step 4 of the search: scoring a loaded model on one task split, or on its first
``limit`` examples (a fidelity slice, :mod:`.fidelity`); data is tokenised once per scorer.

Each scorer is ``scorer(model) -> Scored(score, examples)``: the score on raw scale
(loss in nats per token, accuracy in [0, 1], or whatever a ``python``/``lm_eval``
task returns) and how many examples it took (the search's currency; None where a
``python`` task does not say). The objective decides direction and normalisation
(:mod:`.objective`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from mergekit_pcb.evolve.config import TaskSpec, import_target
from mergekit_pcb.evolve.data import read_jsonl
from mergekit_pcb.evolve.tokens import device_of as _device
from mergekit_pcb.evolve.tokens import greedy
from mergekit_pcb.evolve.tokens import ids as _ids
from mergekit_pcb.evolve.tokens import pad as _pad
from mergekit_pcb.evolve.tokens import pad_id as _pad_id


class Scored(NamedTuple):
    score: float
    examples: int | None


Scorer = Callable[[object], Scored]  # what make_scorer returns


def loss_scorer(rows, tokenizer, batch_size: int) -> Scorer:
    """Mean next-token loss over all tokens of all texts (token-weighted)."""
    encoded = [_ids(tokenizer, r["text"], bos=True) for r in rows]
    encoded = [e for e in encoded if len(e) > 1]
    if not encoded:
        raise ValueError("loss task: every text is a single token; nothing to predict")
    pad = _pad_id(tokenizer)

    @torch.no_grad()
    def score(model) -> float:
        total, count = 0.0, 0
        dev = _device(model)
        for start in range(0, len(encoded), batch_size):
            ids, mask = _pad(encoded[start : start + batch_size], pad)
            ids, mask = ids.to(dev), mask.to(dev)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                target.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(loss)
            count += int((target != -100).sum())
        return total / count

    return score


def exact_match_scorer(rows, tokenizer, batch_size: int, max_new_tokens: int | None) -> Scorer:
    """Share of prompts whose greedy continuation, up to the end token, equals the answer."""
    prompts = [_ids(tokenizer, r["prompt"], bos=True) for r in rows]
    answers = [r["answer"].strip() for r in rows]
    if max_new_tokens is None:
        longest = max(
            len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows
        )
        max_new_tokens = longest + 1  # the answer and the end token decide a match
    pad, eos = _pad_id(tokenizer), tokenizer.eos_token_id

    @torch.no_grad()
    def score(model) -> float:
        hits = 0
        rows = greedy(model, prompts, pad, eos, max_new_tokens, batch_size)
        for row, answer in zip(rows, answers, strict=True):
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            hits += text == answer
        return hits / len(prompts)

    return score


def choice_scorer(rows, tokenizer, batch_size: int) -> Scorer:
    """Accuracy of picking the choice with the highest summed log-likelihood."""
    pairs, spans, labels = [], [], []
    for r in rows:
        prompt = _ids(tokenizer, r["prompt"], bos=True)
        first = len(pairs)
        for choice in r["choices"]:
            cont = list(tokenizer(choice, add_special_tokens=False)["input_ids"])
            pairs.append((prompt + cont, len(prompt)))
        spans.append((first, len(pairs)))
        labels.append(r["label"])
    pad = _pad_id(tokenizer)

    @torch.no_grad()
    def score(model) -> float:
        dev = _device(model)
        ll = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            ids, mask = _pad([p for p, _ in chunk], pad)
            ids, mask = ids.to(dev), mask.to(dev)
            logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            logp = logp.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
            for i, (p, plen) in enumerate(chunk):
                ll.append(float(logp[i, plen - 1 : len(p) - 1].sum()))
        right = sum(
            max(range(a, b), key=lambda k: ll[k]) - a == label
            for (a, b), label in zip(spans, labels, strict=True)
        )
        return right / len(labels)

    return score


def lm_eval_scorer(spec: TaskSpec, tokenizer, model, limit: int | None) -> Scorer:
    """lm-evaluation-harness on the already loaded model (weights change in place)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
    manager = None
    if spec.include_path:
        # Indexing the harness's own task catalogue costs many seconds; skip it when the
        # local directory defines every requested task.
        local = TaskManager(include_path=spec.include_path, include_defaults=False)
        if all(name in local.all_tasks for name in spec.lm_eval_tasks):
            manager = local
    if manager is None:
        manager = TaskManager(include_path=spec.include_path)

    def score(_model) -> Scored:
        output = simple_evaluate(
            model=lm,
            tasks=list(spec.lm_eval_tasks),
            task_manager=manager,
            limit=limit,
            log_samples=False,
            verbosity="ERROR",
        )
        result = output["results"]
        samples = output.get("n-samples", {})
        counted = [samples.get(name, {}).get("effective") for name in spec.lm_eval_tasks]
        examples = sum(counted) if all(isinstance(n, int) for n in counted) else None
        values = []
        for name in spec.lm_eval_tasks:
            metrics = result[name]
            key = spec.metric or next(
                (k for k in ("acc,none", "exact_match,none", "acc_norm,none") if k in metrics),
                None,
            )
            if key not in metrics:
                raise ValueError(
                    f"lm_eval task '{name}' has no metric '{key}'; it reports "
                    f"{', '.join(k for k in metrics if ',' in k)}"
                )
            values.append(float(metrics[key]))
        return Scored(sum(values) / len(values), examples)

    return score


def make_scorer(
    spec: TaskSpec,
    split: str,
    model,
    tokenizer,
    root: Path | None,
    limit: int | None = None,
    outputs: Mapping[str, Sequence[str]] | None = None,
) -> Scorer:
    """The scorer of ``spec`` on ``split``: 'search', 'test' or 'rescore' (``rescore_data``,
    else the whole ``data`` file: ``limit`` applies to the search split only). ``limit``
    (search split only): its first ``limit`` examples, a fidelity slice; a ``python``
    task's function gets it as ``limit=``. ``outputs``: where each ``agreement`` task's
    cached expert outputs are (:func:`.agreement.build`), one folder per expert."""
    if spec.type == "agreement":  # the search split only: it has no test or rescore split
        from mergekit_pcb.evolve.agreement import scorer_for

        scorer = scorer_for(spec, outputs, tokenizer, limit)
        return lambda m: Scored(*scorer(m))
    if spec.type == "python":
        fn = import_target(spec.test_function if split == "test" else spec.function, root)
        kwargs = spec.call_kwargs(split)
        examples = spec.examples if split == "search" else None
        if limit is not None:
            kwargs, examples = {**kwargs, "limit": limit}, limit
        return lambda m: Scored(float(fn(m, tokenizer, **kwargs)), examples)
    if spec.type == "lm_eval":  # limit: documents of each lm-eval task
        if split == "rescore":
            return lm_eval_scorer(spec, tokenizer, model, None)
        return lm_eval_scorer(spec, tokenizer, model, limit or spec.limit)
    if split == "rescore":
        path = spec.rescore_data or spec.data
    else:
        path = spec.data if split == "search" else spec.test_data
    rows = read_jsonl(path, spec.type)
    if spec.limit and split != "rescore":
        rows = rows[: spec.limit]
    if limit is not None:
        rows = rows[:limit]
    if spec.type == "loss":
        scorer = loss_scorer(rows, tokenizer, spec.batch_size)
    elif spec.type == "exact_match":
        scorer = exact_match_scorer(rows, tokenizer, spec.batch_size, spec.max_new_tokens)
    else:
        scorer = choice_scorer(rows, tokenizer, spec.batch_size)
    return lambda m: Scored(scorer(m), len(rows))


def search_size(spec: TaskSpec) -> tuple[int | None, int]:
    """``spec``'s search split before any model loads, as (size, unit): its slices are
    the first ``n <= size`` of it, and each of those ``n`` is ``unit`` examples. Rows of a
    data file (after ``limit``); a python task's ``examples``; an lm_eval task's ``limit``
    for each of its lm-eval tasks (an upper bound: a task may have fewer documents)."""
    if spec.type == "python":
        return spec.examples, 1
    if spec.type == "lm_eval":
        return spec.limit, len(spec.lm_eval_tasks)
    if spec.type == "agreement":  # every expert's prompts, one example each
        from mergekit_pcb.evolve.agreement import search_size as prompts

        return prompts(spec), 1
    rows = read_jsonl(spec.data, spec.type)
    return len(rows[: spec.limit] if spec.limit else rows), 1


def checked(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"task '{name}' returned a non-finite score {value!r}")
    return value
