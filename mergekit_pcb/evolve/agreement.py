"""The label-free task type ``agreement``: how closely a candidate reproduces each expert
on that expert's own prompts (issue 23, item 3).

Labels are what a merge's user often lacks; the experts themselves are not. So the
score of a candidate is, per expert, the mean over the expert's scored tokens of
``KL(expert || candidate)`` between next-token distributions, then the mean over
experts (each counts once, whatever its number of tokens). Lower is better: the
objective flips it as it flips a loss (:attr:`.config.TaskSpec.sign`), in units of
the default's KL. The anchors: AdaMerging minimises the merged model's own prediction
entropy on unlabelled inputs (no expert in the loop: confident is not the same as
right); AdaMMS scores generation consistency across candidate merges (the coefficient
whose generations differ least from its neighbours'). Here the expert's own behaviour is
the target, the closest label-free stand-in for "as good as each expert on its task". On
the quality benchmark this ranks PCB's grid with Spearman +0.76 against the labelled
criterion, and the search it drives lands within seed noise of the labelled search in
all three regimes (docs/search.md).

**Which tokens.** Each expert first continues each of its prompts greedily for up to
``max_new_tokens`` tokens (default :data:`DEFAULT_MAX_NEW_TOKENS`; the end token
stops it and is itself scored), and the KL is taken at the positions that predict that
continuation, with the candidate teacher-forced on the same tokens: the expert's
answer is where its skill shows, and teacher forcing makes one forward pass score a
candidate (no generation per candidate). ``max_new_tokens: 0`` scores the prompt's
own tokens instead (every next-token prediction within the text, as a ``loss`` task):
measured, that ranks merges the wrong way where prompts are inputs an expert predicts no
better than the base (Spearman -0.71 on the benchmark's digit prompts).

**Top-k and a tail bucket.** The cache keeps, per scored token, the expert's ``top_k``
log-probabilities and token ids and the log of the mass outside them; the KL is
between the ``k + 1``-bucket distributions (the expert's top-k tokens, the rest), so it
is a proper divergence, zero only where the candidate matches the expert on every
bucket, and at most the full KL (merging outcomes coarsens a distribution). ``top_k``
defaults to :data:`DEFAULT_TOP_K` = 32: a full distribution of a 128k vocabulary is
512 KB a token in float32; 32 values and ids are 256 bytes, and a trained LM's top 32
tokens hold nearly all of its mass, which the tail bucket accounts for anyway. Where
the vocabulary has at most ``top_k`` tokens the KL is the exact full one.

**The cache.** The experts' outputs are computed once per expert and kept on disk in
``<cache dir>/agreement/<key>/`` (the search's ``cache.dir``, default
``OUT_DIR/cache``), keyed by what they depend on: the expert (its config and small
files by content, its weight files by name, size and modification time, as the
statistics cache keys them: hashing a 7B expert's 14 GB at every start would cost more
than the forward passes it saves), the token ids of its prompts (so the prompts and the
tokenizer), ``top_k``, ``max_new_tokens``, the cached values' dtype and the models'
dtype. An expert whose weights or config change gets a new key; its old entry is
deleted. ``cache_max_gb`` bounds the whole task's outputs: the size is predicted from
the tokenised prompts before anything is written (tokens x (top_k x (value + 4 bytes
of id) + value) plus the token ids) and a search that would exceed it stops with one
line naming the key; nothing is ever truncated. Ray actors read the same files.

**Slices.** A task's search split is its prompts in round-robin order over the experts
(``models:`` order: the first prompt of each expert, then the second, ...), one example
a prompt; a fidelity slice is the first ``n`` of that order, so even a small slice
covers every expert.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from mergekit_pcb.evolve.config import EvolveConfigError, MergeInputs, TaskSpec
from mergekit_pcb.evolve.data import read_jsonl
from mergekit_pcb.evolve.tokens import device_of as _device
from mergekit_pcb.evolve.tokens import greedy
from mergekit_pcb.evolve.tokens import ids as _ids
from mergekit_pcb.evolve.tokens import pad as pad_rows
from mergekit_pcb.evolve.tokens import pad_id as _pad_id

DEFAULT_TOP_K = 32
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_CACHE_MAX_GB = 4.0
FOLDER = "agreement"
FORMAT = 1
META = "meta.json"
ARRAYS = "outputs.safetensors"
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_CONTENT_LIMIT = 64 * 2**20  # files below this are keyed by content, larger by size + mtime


@dataclass(frozen=True)
class Settings:
    """An agreement task's settings with their defaults filled in."""

    top_k: int
    max_new_tokens: int
    cache_dtype: str
    cache_max_gb: float
    batch_size: int

    @classmethod
    def of(cls, spec: TaskSpec) -> Settings:
        return cls(
            spec.top_k or DEFAULT_TOP_K,
            DEFAULT_MAX_NEW_TOKENS if spec.max_new_tokens is None else spec.max_new_tokens,
            spec.cache_dtype or "float32",
            DEFAULT_CACHE_MAX_GB if spec.cache_max_gb is None else spec.cache_max_gb,
            spec.batch_size,
        )

    @property
    def value_bytes(self) -> int:
        return _DTYPES[self.cache_dtype].itemsize


def prompts_of(spec: TaskSpec, models: Sequence[str]) -> list[tuple[str, ...]]:
    """Each model's prompt texts, in ``models`` order (the config checked the keys)."""
    return [tuple(row["text"] for row in read_jsonl(spec.prompts[m], "agreement")) for m in models]


def interleave(counts: Sequence[int], limit: int | None = None) -> list[int]:
    """How many prompts of each expert the first ``limit`` of the round-robin order
    over the experts holds (all of them when ``limit`` is None)."""
    taken = [0] * len(counts)
    left = sum(counts) if limit is None else min(limit, sum(counts))
    while left:
        for e, n in enumerate(counts):
            if left and taken[e] < n:
                taken[e] += 1
                left -= 1
    return taken


def search_size(spec: TaskSpec) -> int:
    """Examples of the search split: every prompt of every expert."""
    return sum(len(read_jsonl(path, "agreement")) for path in spec.prompts.values())


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids as every task gets them (BOS in front), at least two tokens each where
    the prompt's own tokens are scored."""

    return [_ids(tokenizer, text, bos=True) for text in texts]


def predicted_bytes(ids: Sequence[Sequence[int]], settings: Settings) -> int:
    """The largest the cached outputs of these prompts can be: per scored token, top_k
    values and int32 ids and one tail value; per sequence, its int32 token ids."""
    per_token = settings.top_k * (settings.value_bytes + 4) + settings.value_bytes
    total = 0
    for seq in ids:
        scored = settings.max_new_tokens if settings.max_new_tokens else len(seq) - 1
        total += scored * per_token + (len(seq) + settings.max_new_tokens) * 4 + 24
    return total


def check_plan(tasks: Sequence[TaskSpec], inputs: MergeInputs, tokenizer) -> None:
    """Before anything is written: every prompt is scorable and the outputs fit
    ``cache_max_gb`` (one line naming the key otherwise)."""
    for spec in tasks:
        if spec.type != "agreement":
            continue
        settings = Settings.of(spec)
        total = 0
        for model, texts in zip(inputs.models, prompts_of(spec, inputs.models), strict=True):
            ids = encode(tokenizer, texts)
            if not settings.max_new_tokens:
                short = next((i for i, seq in enumerate(ids) if len(seq) < 2), None)
                if short is not None:
                    raise EvolveConfigError(
                        f"task '{spec.name}': prompts['{model}']: prompt {short + 1} is one "
                        "token; with max_new_tokens: 0 the prompt's own tokens are scored, so "
                        "each needs two (or set max_new_tokens)"
                    )
            total += predicted_bytes(ids, settings)
        if total > settings.cache_max_gb * 1e9:
            raise EvolveConfigError(
                f"task '{spec.name}': cache_max_gb: the experts' outputs need up to "
                f"{total / 1e9:.3g} GB (scored tokens x (top_k {settings.top_k} x "
                f"({settings.value_bytes} + 4) + {settings.value_bytes}) bytes), more than "
                f"cache_max_gb {settings.cache_max_gb:g}; raise it, or lower top_k or "
                "max_new_tokens, or give fewer prompts"
            )


# -- the key of an expert's entry ---------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_stamp(path: str) -> list:
    """What identifies an expert's weights and config: small files by content, large
    ones (weight shards) by name, size and modification time."""
    p = Path(path)
    if not p.is_dir():
        return [path]  # a hub id: its revision is what mergekit loads
    stamp = []
    for f in sorted(x for x in p.iterdir() if x.is_file()):
        st = f.stat()
        if st.st_size < _CONTENT_LIMIT:
            stamp.append([f.name, _sha(f.read_bytes())])
        else:
            stamp.append([f.name, st.st_size, st.st_mtime_ns])
    return stamp


def entry_key(
    model: str, stamp: list, ids: Sequence[Sequence[int]], settings: Settings, dtype: str
) -> str:
    """The entry's folder name: a hash of everything the outputs depend on."""
    data = {
        "format": FORMAT,
        "model": model,
        "stamp": stamp,
        "ids": _sha(json.dumps([list(s) for s in ids]).encode()),
        "top_k": settings.top_k,
        "max_new_tokens": settings.max_new_tokens,
        "cache_dtype": settings.cache_dtype,
        "dtype": dtype,
    }
    return _sha(json.dumps(data, sort_keys=True).encode())[:24]


# -- computing an expert's outputs --------------------------------------------------------


def _pad(rows: Sequence[Sequence[int]], pad: int, *, left: bool = False):
    return pad_rows([list(r) for r in rows], pad, left=left)


@torch.no_grad()
def continue_greedily(model, tokenizer, ids, max_new_tokens: int, batch_size: int):
    """Each prompt followed by the model's greedy continuation, cut after its end token."""
    pad, eos = _pad_id(tokenizer), tokenizer.eos_token_id
    generated = greedy(model, ids, pad, eos, max_new_tokens, batch_size)
    return [[*prompt, *new] for prompt, new in zip(ids, generated, strict=True)]


def scored_positions(sequences, starts) -> list[tuple[int, int]]:
    """(first, stop) positions of each sequence whose next-token prediction is scored."""
    return [(s, len(seq) - 1) for seq, s in zip(sequences, starts, strict=True)]


def log_probs(model, sequences, starts, batch_size: int, pad: int):
    """Yields, per batch of sequences, the float32 log-probabilities at their scored
    positions, concatenated in order ([scored tokens of the batch, vocabulary])."""

    dev = _device(model)
    for first in range(0, len(sequences), batch_size):
        chunk = sequences[first : first + batch_size]
        ids, mask = _pad(chunk, pad)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        rows = [
            logits[i, a:b]
            for i, (a, b) in enumerate(scored_positions(chunk, starts[first : first + batch_size]))
        ]
        yield torch.cat(rows).float().log_softmax(-1)


def top_k_outputs(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An expert's top-``k`` log-probabilities, their ids and the log mass outside them."""
    k = min(k, logp.shape[-1])
    values, indices = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, indices, float("-inf")).logsumexp(-1)
    return values, indices, tail


def kl_top_k(
    values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor, logq: torch.Tensor
) -> torch.Tensor:
    """KL(expert || candidate) per token over the ``k + 1`` buckets: the expert's top-k
    tokens (``values``: its log-probabilities, ``indices``: the ids) and the rest
    (``tail``: the expert's log mass there); ``logq`` the candidate's log-probabilities
    over the whole vocabulary. In float32, on ``logq``'s device."""
    values, tail = values.to(logq.device).float(), tail.to(logq.device).float()
    indices = indices.to(logq.device).long()
    q_top = logq.gather(-1, indices)
    q_tail = logq.scatter(-1, indices, float("-inf")).logsumexp(-1)
    top = (values.exp() * (values - q_top)).sum(-1)
    rest = torch.where(tail > float("-inf"), tail.exp() * (tail - q_tail), 0.0)
    return top + rest


def _remove_stale(folder: Path, model: str, stamp: list, key: str) -> None:
    """Deletes entries of ``model`` made from other weights or config (never reused), and
    what a killed build of this entry left."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name == key or not entry.is_dir():
            continue
        try:
            meta = json.loads((entry / META).read_text())
        except (OSError, ValueError):
            if not (entry / META).exists() and entry.name.startswith(f"tmp-{key}-"):
                shutil.rmtree(entry, ignore_errors=True)  # a build that was killed
            continue
        if meta.get("model") == model and meta.get("stamp") != stamp:
            shutil.rmtree(entry, ignore_errors=True)


def _open(entry: Path, key: str) -> dict | None:
    try:
        meta = json.loads((entry / META).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or not (entry / ARRAYS).is_file():
        return None
    return meta


def build_expert(
    model_path: str,
    inputs: MergeInputs,
    tokenizer,
    ids: Sequence[Sequence[int]],
    settings: Settings,
    folder: Path,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """The entry of one expert's outputs on ``ids`` (computed, or reused when present);
    returns its meta (``path``, ``status``: computed/reused, seconds, bytes, ...)."""
    from mergekit.common import dtype_from_name
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    stamp = model_stamp(model_path)
    key = entry_key(model_path, stamp, ids, settings, inputs.dtype)
    entry = folder / key
    meta = _open(entry, key)
    if meta is not None:
        if progress:
            progress(len(ids))
        return {**meta, "path": str(entry), "status": "reused", "seconds": 0.0}
    _remove_stale(folder, model_path, stamp, key)
    start = time.perf_counter()
    device = inputs.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        device = "cpu"  # a Ray cluster's driver without the workers' GPU
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype_from_name(inputs.dtype), trust_remote_code=inputs.trust_remote_code
    ).to(device)
    model.eval()
    if settings.max_new_tokens:
        sequences = continue_greedily(
            model, tokenizer, ids, settings.max_new_tokens, settings.batch_size
        )
        starts = [len(p) - 1 for p in ids]
    else:
        sequences, starts = [list(p) for p in ids], [0] * len(ids)
    parts: dict[str, list[torch.Tensor]] = {"values": [], "indices": [], "tail": []}
    done = 0
    with torch.no_grad():
        for logp in log_probs(model, sequences, starts, settings.batch_size, _pad_id(tokenizer)):
            values, indices, tail = top_k_outputs(logp, settings.top_k)
            dtype = _DTYPES[settings.cache_dtype]
            parts["values"].append(values.to("cpu", dtype))
            parts["indices"].append(indices.to("cpu", torch.int32))
            parts["tail"].append(tail.to("cpu", dtype))
            n = min(settings.batch_size, len(sequences) - done)
            done += n
            if progress:
                progress(n)
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the candidates' model loads next
    arrays = {name: torch.cat(chunks).contiguous() for name, chunks in parts.items()}
    arrays["tokens"] = torch.tensor([t for s in sequences for t in s], dtype=torch.int32)
    arrays["lengths"] = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    arrays["starts"] = torch.tensor(starts, dtype=torch.int64)
    tmp = folder / f"tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(arrays, str(tmp / ARRAYS))
    seconds = time.perf_counter() - start
    meta = {
        "format": FORMAT,
        "key": key,
        "model": model_path,
        "stamp": stamp,
        "prompts": len(ids),
        "tokens": int(arrays["values"].shape[0]),
        "bytes": (tmp / ARRAYS).stat().st_size,
        "computed_seconds": seconds,
    }
    (tmp / META).write_text(json.dumps(meta))
    shutil.rmtree(entry, ignore_errors=True)
    tmp.rename(entry)  # complete or absent: a killed build leaves only a tmp- folder
    return {**meta, "path": str(entry), "status": "computed", "seconds": seconds}


@dataclass(frozen=True)
class Built:
    """The experts' outputs of every agreement task: where each expert's entry is (per
    task, in ``models`` order; what the evaluators and Ray actors read) and the cost."""

    entries: dict[str, list[str]]
    cost: dict[str, dict]
    seconds: float


def build(
    tasks: Sequence[TaskSpec],
    inputs: MergeInputs,
    tokenizer,
    cache_dir: Path,
    progress: Callable[[int], None] | None = None,
) -> Built:
    """Step 2 for agreement tasks: each expert's outputs on its prompts, once."""
    entries, cost, total = {}, {}, 0.0
    folder = Path(cache_dir) / FOLDER
    for spec in tasks:
        if spec.type != "agreement":
            continue
        settings = Settings.of(spec)
        metas = []
        for model, texts in zip(inputs.models, prompts_of(spec, inputs.models), strict=True):
            ids = encode(tokenizer, texts)
            metas.append(build_expert(model, inputs, tokenizer, ids, settings, folder, progress))
        entries[spec.name] = [m["path"] for m in metas]
        seconds = sum(m["seconds"] for m in metas)
        total += seconds
        computed = [m for m in metas if m["status"] == "computed"]
        cost[spec.name] = {
            "prompts": sum(m["prompts"] for m in metas),
            "tokens": sum(m["tokens"] for m in metas),
            "bytes": sum(m["bytes"] for m in metas),
            "seconds": seconds,
            "examples_computed": sum(m["prompts"] for m in computed),
            "computed_seconds": sum(m["computed_seconds"] for m in metas),
            "status": "computed"
            if len(computed) == len(metas)
            else "reused"
            if not computed
            else f"computed {len(computed)} of {len(metas)} experts, reused the rest",
            "top_k": settings.top_k,
            "max_new_tokens": settings.max_new_tokens,
            "cache_dtype": settings.cache_dtype,
            "folder": str(folder),
        }
    return Built(entries, cost, total)


def total_prompts(tasks: Sequence[TaskSpec]) -> int:
    """Prompts of every agreement task: the expert-outputs progress bar's length."""
    return sum(search_size(t) for t in tasks if t.type == "agreement")


# -- scoring a candidate ------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    """One expert's cached outputs, per prompt."""

    sequences: list[list[int]]
    starts: list[int]
    values: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor
    offsets: list[int]  # row of each prompt's first scored token in values/indices/tail


@lru_cache(maxsize=64)
def load(entry: str) -> Outputs:
    """An entry's arrays (once per process: every slice's scorer shares them)."""
    from safetensors.torch import load_file

    try:
        arrays = load_file(str(Path(entry) / ARRAYS))
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"agreement: the experts' outputs at {entry} cannot be read ({exc}); with Ray on "
            "several machines the cache directory must be shared"
        ) from None
    lengths, starts = arrays["lengths"].tolist(), arrays["starts"].tolist()
    flat, sequences, at = arrays["tokens"].tolist(), [], 0
    for n in lengths:
        sequences.append(flat[at : at + n])
        at += n
    offsets = [0]
    for n, s in zip(lengths, starts, strict=True):
        offsets.append(offsets[-1] + n - 1 - s)
    return Outputs(sequences, starts, arrays["values"], arrays["indices"], arrays["tail"], offsets)


def agreement_scorer(
    entries: Sequence[str], tokenizer, batch_size: int, limit: int | None = None
) -> Callable[[object], tuple[float, int]]:
    """``scorer(model) -> (mean over experts of the mean KL per scored token, prompts)``
    on the first ``limit`` prompts of the round-robin order (all when None)."""

    outputs = [load(e) for e in entries]
    taken = interleave([len(o.sequences) for o in outputs], limit)
    pad = _pad_id(tokenizer)

    @torch.no_grad()
    def score(model) -> tuple[float, int]:
        per_expert = []
        for out, n in zip(outputs, taken, strict=True):
            if not n:
                continue
            total, rows = 0.0, 0
            sequences, starts = out.sequences[:n], out.starts[:n]
            for logq in log_probs(model, sequences, starts, batch_size, pad):
                if out.indices.numel() and int(out.indices.max()) >= logq.shape[-1]:
                    raise ValueError(
                        "agreement: an expert's top tokens lie beyond the candidate's "
                        f"vocabulary of {logq.shape[-1]}; experts with larger vocabularies "
                        "cannot be compared token by token"
                    )
                stop = rows + logq.shape[0]
                kl = kl_top_k(
                    out.values[rows:stop], out.indices[rows:stop], out.tail[rows:stop], logq
                )
                total += float(kl.sum())
                rows = stop
            assert rows == out.offsets[n], "the cached outputs and the scored tokens differ"
            per_expert.append(total / rows)
        return sum(per_expert) / len(per_expert), sum(taken)

    return score


def scorer_for(
    spec: TaskSpec, entries: Mapping[str, Sequence[str]] | None, tokenizer, limit: int | None
) -> Callable[[object], tuple[float, int]]:
    """``spec``'s scorer on the entries :func:`build` made (Ray actors get their paths)."""
    if not entries or spec.name not in entries:
        raise RuntimeError(
            f"task '{spec.name}' (agreement): the experts' outputs were not computed "
            "(agreement.build runs at the search's step 2)"
        )
    return agreement_scorer(entries[spec.name], tokenizer, spec.batch_size, limit)
