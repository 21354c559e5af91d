"""Algorithmic toy tasks, a small fine-tuning loop and an exact-match scorer.

The quality benchmark and the evolutionary search's tests need models that are
really good at something measurable, built in seconds on a CPU with no download.
Short digit-string tasks (reverse, sort, add, ...) give exact-match answers, so a
merged model's quality is a number that cannot be argued with.

All tasks share one alphabet (the digits) and one format, ``<s>T:INPUT=ANSWER</s>``,
where ``T`` is a one-letter task tag; that keeps task vectors about the task and
not about new tokens or formats.

Benchmark and test code, not part of the installed package: the quality
benchmark, the search's tests and ``examples/data/make_models.py`` import it from
this folder (``train_lora`` needs ``peft``, which only the benchmark uses).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mergekit_pcb.tiny import char_tokenizer

DIGITS = "0123456789"
# Tags, separators and digits; a subset of tiny.DEFAULT_ALPHABET so ids are stable.
ALPHABET = DIGITS + "abcdefghijklmnopqrstuvwxyz+:="
# A fixed digit permutation for the cipher task (a derangement: no digit maps to itself).
CIPHER = dict(zip(DIGITS, "3827196054", strict=True))
IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair; exact match means every answer character (and the end) is right."""

    task: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    name: str
    tag: str
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (input, answer)
    description: str


def _digits(rng: random.Random, low: int = 5, high: int = 9) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(rng.randint(low, high)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return s, s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return s, "".join(sorted(s))


def _add(rng: random.Random) -> tuple[str, str]:
    # Digit-wise, without carries: carries need right-to-left work that a two-layer
    # model cannot learn in a few hundred steps, and the task should be learnable.
    a = _digits(rng, 3, 5)
    b = "".join(rng.choice(DIGITS) for _ in a)
    return f"{a}+{b}", "".join(str((int(x) + int(y)) % 10) for x, y in zip(a, b, strict=True))


def _cipher(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return s, "".join(CIPHER[c] for c in s)


def _every_second(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng, 6, 10)
    return s, s[::2]


def _max(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return s, max(s)


def _successor(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return s, "".join(str((int(c) + 1) % 10) for c in s)


def _rotate(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return s, s[1:] + s[0]


def _swap_pairs(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    pairs = [s[i : i + 2][::-1] for i in range(0, len(s), 2)]
    return s, "".join(pairs)


_TASK_LIST = (
    Task("reverse", "r", _reverse, "reverse 5-9 digits"),
    Task("sort", "s", _sort, "sort 5-9 digits ascending"),
    Task("add", "a", _add, "digit-wise sum mod 10 of two equal-length 3-5 digit numbers"),
    Task("cipher", "c", _cipher, "substitute each digit by a fixed permutation"),
    Task("every_second", "e", _every_second, "digits at even positions of 6-10 digits"),
    Task("max", "m", _max, "largest digit of 5-9 digits"),
    Task("successor", "n", _successor, "each digit plus one, modulo 10"),
    Task("rotate", "o", _rotate, "move the first of 5-9 digits to the end"),
    Task("swap_pairs", "w", _swap_pairs, "swap each adjacent pair of 5-9 digits"),
)
TASKS: dict[str, Task] = {task.name: task for task in _TASK_LIST}
# Length-preserving tasks (n digits in, n digits out): experts then share the answer
# length and the end-of-answer position, so no task vector has to move that prior.
DEFAULT_TASKS = ("reverse", "sort", "cipher", "successor", "rotate", "swap_pairs")


def toy_tokenizer():
    """The character tokenizer every toy model shares (digits, tags, ``+ : =``)."""
    return char_tokenizer(ALPHABET)


def _task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown toy task {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def make_examples(task: str, n: int, seed: int) -> list[Example]:
    """``n`` examples of ``task``, a pure function of ``(task, n, seed)``.

    Splits are made disjoint by seed, not by deduplication: train, validation and
    test use different seeds, and the input spaces are large (10^5 to 10^10), so
    overlap is rare and harmless for a merge comparison.
    """
    spec = _task(task)
    if n < 0:
        raise ValueError(f"make_examples: n must be >= 0, got {n}")
    # Seed by a string so each task's stream is independent of the others.
    rng = random.Random(f"{task}:{seed}")
    out = []
    for _ in range(n):
        inp, ans = spec.make(rng)
        out.append(Example(task, f"{spec.tag}:{inp}=", ans))
    return out


def make_mixture(tasks: Iterable[str], n_per_task: int, seed: int) -> list[Example]:
    """Equal parts of every task, shuffled deterministically."""
    out = [ex for task in tasks for ex in make_examples(task, n_per_task, seed)]
    random.Random(f"mix:{seed}").shuffle(out)
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor  # (b, L)
    attention_mask: torch.Tensor  # (b, L)
    labels: torch.Tensor  # (b, L): answer + </s> positions, IGNORE elsewhere


def encode(tokenizer, examples: Sequence[Example]) -> Batch:
    """Right-padded ids with labels only on the answer and the end token.

    The loss ignores the prompt: the model is judged only on what it must produce.
    """
    vocab = tokenizer.get_vocab()
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows, labels = [], []
    for ex in examples:
        try:
            prompt = [vocab[c] for c in ex.prompt]
            answer = [vocab[c] for c in ex.answer]
        except KeyError as err:
            raise ValueError(f"example {ex} has character {err} outside the tokenizer") from None
        ids = [bos, *prompt, *answer, eos]
        rows.append(ids)
        labels.append([IGNORE] * (1 + len(prompt)) + answer + [eos])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    label_t = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        label_t[i, : len(lab)] = torch.tensor(lab)
    return Batch(input_ids, mask, label_t)


def _loss(model, batch: Batch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    # Position t predicts token t + 1.
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        batch.labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
    )


def _rows(data: Batch, idx: torch.Tensor) -> Batch:
    """The rows ``idx`` of an encoded set, trimmed to their longest sequence."""
    width = int(data.attention_mask[idx].sum(1).max())
    return Batch(
        data.input_ids[idx, :width], data.attention_mask[idx, :width], data.labels[idx, :width]
    )


def _kl(model, teacher, batch: Batch) -> torch.Tensor:
    """KL(teacher || model) of the next-token distributions at the labelled positions."""
    scored = batch.labels[:, 1:] != IGNORE
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    with torch.no_grad():
        target = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    log_p = torch.log_softmax(logits[:, :-1][scored].float(), -1)
    log_q = torch.log_softmax(target[:, :-1][scored].float(), -1)
    return torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def _select(model, trainable) -> list[torch.nn.Parameter]:
    """Parameters to train: all, those whose name matches a regex, or a predicate."""
    if trainable is None:
        return list(model.parameters())
    if isinstance(trainable, str):
        pattern = re.compile(trainable)
        trainable = lambda name: bool(pattern.search(name))  # noqa: E731
    chosen = [p for name, p in model.named_parameters() if trainable(name)]
    if not chosen:
        raise ValueError(f"train: trainable={trainable!r} selects no parameter of the model")
    return chosen


def train(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    warmup: int = 0,
    trainable: str | Callable[[str], bool] | None = None,
    optimizer: str = "adamw",
    distill: Sequence[Example] = (),
    teacher=None,
    distill_share: float = 0.5,
) -> list[float]:
    """AdamW with linear warmup and cosine decay; returns the loss of every step.

    ``optimizer="sgd"`` (momentum 0.9) moves each weight in proportion to its
    gradient, unlike Adam's sign-like steps that also move weights the task barely
    uses; that keeps task vectors closer to the task. ``trainable`` restricts
    training to matching parameter names (a regex or a predicate), e.g. to
    fine-tune only the MLPs so task vectors stay small and local.
    Batches are sampled with replacement from ``examples`` by a seeded generator, so
    a run is a pure function of its arguments (on one machine and thread count).

    ``distill`` (with ``teacher``) adds Learning-without-Forgetting style
    self-distillation: ``distill_share`` of every batch is drawn from ``distill``
    (prompts followed by the teacher's own answers, see :func:`greedy_answers`) and
    scored by the KL divergence from the teacher's next-token distribution at the
    answer positions, so the model keeps the teacher's behaviour there; the loss is
    ``(1 - share) * cross-entropy + share * KL``. At the start (model = teacher) that
    term and its gradient are zero: it only pulls back what the own task moves.
    """
    if steps < 0 or not examples:
        raise ValueError(f"train: need steps >= 0 and a non-empty example list (steps={steps})")
    if distill and (teacher is None or not 0.0 < distill_share < 1.0):
        raise ValueError("train: distill needs a teacher and 0 < distill_share < 1")
    params = _select(model, trainable)
    wanted = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in wanted]
    saved = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    data = encode(tokenizer, examples)
    generator = torch.Generator().manual_seed(seed)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"train: optimizer={optimizer!r}; allowed: 'adamw', 'sgd'")

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    share = distill_share if distill else 0.0
    own_rows = batch_size - round(batch_size * share)
    replay = encode(tokenizer, distill) if distill else None
    if teacher is not None:
        teacher.eval()
    model.train()
    losses = []
    try:
        for _ in range(steps):
            idx = torch.randint(len(examples), (own_rows,), generator=generator)
            loss = _loss(model, _rows(data, idx))
            if replay is not None:
                ridx = torch.randint(len(distill), (batch_size - own_rows,), generator=generator)
                loss = (1 - share) * loss + share * _kl(model, teacher, _rows(replay, ridx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            scheduler.step()
            losses.append(float(loss.detach()))
    finally:
        for p, flag in zip(frozen, saved, strict=True):
            p.requires_grad_(flag)
        model.eval()
    return losses


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def train_lora(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] = LORA_TARGETS,
    **train_kwargs,
) -> list[float]:
    """Train LoRA adapters (peft) on ``model``, then merge them into its full weights.

    A low-rank update changes the function less away from the task it was fitted
    to than full fine-tuning does, so its task vector carries less forgetting;
    after merging, ``model`` is a plain checkpoint that mergekit can merge.
    ``train_kwargs`` go to :func:`train` (``trainable`` is the adapters).
    """
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"train_lora: rank must be >= 1, got {rank}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or 2 * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
    )
    # The adapters' A matrices start random: seed them like the data order.
    torch.manual_seed(train_kwargs.get("seed", 0))
    peft_model = get_peft_model(model, config)
    losses = train(peft_model, tokenizer, examples, trainable="lora_", **train_kwargs)
    merged = peft_model.merge_and_unload()
    if merged is not model:
        model.load_state_dict(merged.state_dict())
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return losses


@torch.no_grad()
def correct(
    model, tokenizer, examples: Sequence[Example], *, batch_size: int = 512
) -> torch.Tensor:
    """A bool per example: would greedy decoding produce exactly the answer and then stop?

    Greedy decoding reproduces the answer iff, with the right prefix fed in, the
    argmax at every answer position (and at the end token) is the right token; so
    one teacher-forced forward pass decides it, with no generation loop.
    """
    model.eval()
    out = []
    for start in range(0, len(examples), batch_size):
        batch = encode(tokenizer, examples[start : start + batch_size])
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        predicted = logits[:, :-1].argmax(-1)
        target = batch.labels[:, 1:]
        scored = target != IGNORE
        out.append(((predicted == target) | ~scored).all(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def exact_match(model, tokenizer, examples: Sequence[Example]) -> float:
    """Share of examples answered exactly (0.0 for an empty list is refused)."""
    if not examples:
        raise ValueError("exact_match: no examples")
    return float(correct(model, tokenizer, examples).float().mean())


def per_task_accuracy(model, tokenizer, examples: Sequence[Example]) -> dict[str, float]:
    """Exact match per task, in first-seen task order."""
    hits = correct(model, tokenizer, examples)
    tasks = list(dict.fromkeys(ex.task for ex in examples))
    return {
        task: float(hits[[i for i, ex in enumerate(examples) if ex.task == task]].float().mean())
        for task in tasks
    }


@torch.no_grad()
def greedy_answers(
    model, tokenizer, examples: Sequence[Example], *, max_new: int = 16, batch_size: int = 512
) -> list[Example]:
    """The examples with each answer replaced by what ``model`` greedily generates.

    Used to replay a model's own behaviour (self-distillation): an expert fine-tuned on
    its task plus the base's own answers to the other tasks' prompts learns its task
    without moving the base's behaviour elsewhere, right or wrong. Prompts are decoded
    in groups of equal length (no padding); an example whose generation does not end
    with the end token within ``max_new`` tokens, or that produces a token outside the
    task alphabet, is dropped. Output order follows the input order.
    """
    model.eval()
    vocab = tokenizer.get_vocab()
    chars = {vocab[c]: c for c in ALPHABET}
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    by_length: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_length.setdefault(len(ex.prompt), []).append(i)
    answers: dict[int, str] = {}
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            prompt = torch.tensor([[bos, *(vocab[c] for c in examples[i].prompt)] for i in chunk])
            out = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )[:, prompt.shape[1] :].tolist()
            for i, row in zip(chunk, out, strict=True):
                if eos not in row:
                    continue
                body = row[: row.index(eos)]
                if all(t in chars for t in body):
                    answers[i] = "".join(chars[t] for t in body)
    return [
        Example(ex.task, ex.prompt, answers[i]) for i, ex in enumerate(examples) if i in answers
    ]


def to_jsonl(examples: Iterable[Example], path: os.PathLike) -> Path:
    path = Path(path)
    with path.open("w") as fh:
        for ex in examples:
            fh.write(json.dumps(asdict(ex)) + "\n")
    return path


def from_jsonl(path: os.PathLike) -> list[Example]:
    with Path(path).open() as fh:
        return [Example(**json.loads(line)) for line in fh if line.strip()]
