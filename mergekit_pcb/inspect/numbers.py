"""Every number of the report, from the per-tensor counts and the sample.

Shares are counts over elements; an expert's shares count only the tensors it is
merged into (slices may leave it out of some). Layers are mergekit's output layer
indices; ``embeddings`` and ``head`` hold the weights before and after the layers.
Layer groups (for the similarity matrices and the summary) cut the layers into at
most four contiguous runs, as ``mergekit-pcb evolve`` does (layer i of L in group
i * G // L).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from mergekit_pcb.inspect.measure import SWEEP, Sample, TensorRecord
from mergekit_pcb.inspect.planning import EMBEDDINGS, HEAD

MAX_GROUPS = 4
# Histogram of B / max B: symmetric log bins, 8 per decade from 1e-8 to 1, one bin
# around zero; values below -1 are counted in the first bin.
_DECADES = 8
_PER_DECADE = 8
_POSITIVE = np.logspace(-_DECADES, 0, _DECADES * _PER_DECADE + 1)
EDGES = np.concatenate([-_POSITIVE[::-1], _POSITIVE])


def share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def layer_label(module: str, layer: int | str, modules: int) -> str:
    text = str(layer)
    return f"{module}/{text}" if modules > 1 else text


def _order_key(layer: int | str) -> tuple[int, int]:
    if layer == EMBEDDINGS:
        return (0, 0)
    if layer == HEAD:
        return (2, 0)
    return (1, int(layer))


def layer_groups(num_layers: int) -> list[tuple[str, list[int]]]:
    """(label, layers) of each contiguous group of layers."""
    count = min(MAX_GROUPS, num_layers)
    found: list[tuple[str, list[int]]] = []
    for g in range(count):
        members = [i for i in range(num_layers) if i * count // num_layers == g]
        label = f"layer {members[0]}" if len(members) == 1 else f"layers {members[0]}-{members[-1]}"
        found.append((label, members))
    return found


def totals(records: Sequence[TensorRecord], labels: Sequence[str]) -> dict[str, Any]:
    """All shares of a set of tensors: whole, per expert and per pair of experts."""
    n = len(labels)
    count = {k: 0 for k in ("elements", "conflict", "kept_conflict", "none_kept", "changed")}
    merged_sq = 0.0
    per = {k: [0.0] * n for k in ("elements", "kept", "wins", "abs", "sq", "merged_sq", "any")}
    gram = [[0.0] * n for _ in range(n)]
    opposed = [[0] * n for _ in range(n)]
    together = [[0] * n for _ in range(n)]
    for r in records:
        for key in count:
            count[key] += getattr(r, key)
        merged_sq += r.merged_sq
        for i, e in enumerate(r.experts):
            per["elements"][e] += r.elements
            per["kept"][e] += r.kept[i]
            per["wins"][e] += r.wins[i]
            per["abs"][e] += r.abs_sum[i]
            per["sq"][e] += r.gram[i][i]
            per["merged_sq"][e] += r.merged_sq
            per["any"][e] += r.elements - r.none_kept
            for j, f in enumerate(r.experts):
                gram[e][f] += r.gram[i][j]
                opposed[e][f] += r.sign_pairs[i][j] + r.sign_pairs[j][i]
                together[e][f] += r.elements
    elements = count["elements"]
    experts = {}
    for e, label in enumerate(labels):
        if not per["elements"][e]:
            continue
        norm = math.sqrt(per["sq"][e])
        experts[label] = {
            "elements": int(per["elements"][e]),
            "kept": share(per["kept"][e], per["elements"][e]),
            "wins": share(per["wins"][e], per["elements"][e]),
            "wins_of_kept": share(per["wins"][e], per["any"][e]),
            "mean_abs_tau": share(per["abs"][e], per["elements"][e]),
            "norm": norm,
            "merged_norm_ratio": share(math.sqrt(per["merged_sq"][e]), norm),
            "kept_count": int(per["kept"][e]),
            "wins_count": int(per["wins"][e]),
        }

    def cosine(e: int, f: int) -> float | None:
        scale = math.sqrt(gram[e][e] * gram[f][f]) if together[e][f] else 0.0
        return gram[e][f] / scale if scale else None

    return {
        "tensors": len(records),
        "elements": elements,
        "sign_conflict": share(count["conflict"], elements),
        "conflict_after_drop": share(count["kept_conflict"], elements),
        "no_expert_keeps": share(count["none_kept"], elements),
        "changed": share(count["changed"], elements),
        "counts": count,
        "merged_norm": math.sqrt(merged_sq),
        "experts": experts,
        "cosine": [[cosine(e, f) for f in range(n)] for e in range(n)],
        "pair_sign_conflict": [
            [share(opposed[e][f], together[e][f]) if e != f else None for f in range(n)]
            for e in range(n)
        ],
    }


def _weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: Iterable[float]) -> list:
    if not len(values):
        return [None for _ in qs]
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    total = cumulative[-1]
    out = []
    for q in qs:
        index = min(int(np.searchsorted(cumulative, q * total, side="right")), len(values) - 1)
        out.append(float(values[order][index]))
    return out


def _pooled(sample: Sample, expert: int) -> tuple[np.ndarray, np.ndarray]:
    values, weights = [], []
    for rows, scores, weight in zip(sample.experts, sample.scores, sample.weights, strict=True):
        for i, e in enumerate(rows.tolist()):
            if e == expert:
                values.append(scores[:, i].numpy())
                weights.append(np.full(len(scores), weight))
    if not values:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(values), np.concatenate(weights)


def sweep(
    records: Sequence[TensorRecord], sample: Sample, labels: Sequence[str], exact: bool
) -> dict[str, Any]:
    """Kept share per expert and kept-conflict share at every ratio of SWEEP.

    Exact from the per-tensor cuts (tensor scope); from the sample otherwise: each
    expert's cut is then the sample's weighted quantile, as the whole model's would be.
    """
    result: dict[str, Any] = {"ratios": list(SWEEP), "exact": exact}
    if exact:
        elements = sum(r.elements for r in records)
        kept = {label: [0] * len(SWEEP) for label in labels}
        sizes = dict.fromkeys(labels, 0)
        conflict = [0] * len(SWEEP)
        for r in records:
            for i, e in enumerate(r.experts):
                sizes[labels[e]] += r.elements
                kept[labels[e]] = [
                    a + b for a, b in zip(kept[labels[e]], r.sweep_kept[i], strict=True)
                ]
            conflict = [a + b for a, b in zip(conflict, r.sweep_conflict, strict=True)]
        result["kept"] = {
            label: [share(k, sizes[label]) for k in kept[label]] for label in labels if sizes[label]
        }
        result["conflict_after_drop"] = [share(c, elements) for c in conflict]
        return result
    cuts = {}
    for e in range(len(labels)):
        values, weights = _pooled(sample, e)
        if len(values):
            cuts[e] = _weighted_quantiles(values, weights, [1 - r for r in SWEEP])
    kept = {labels[e]: [0.0] * len(SWEEP) for e in cuts}
    sizes = {labels[e]: 0.0 for e in cuts}
    conflict = [0.0] * len(SWEEP)
    total = 0.0
    for rows, scores, signs, weight in zip(
        sample.experts, sample.scores, sample.signs, sample.weights, strict=True
    ):
        rows = rows.tolist()
        total += weight * len(scores)
        for k in range(len(SWEEP)):
            t = np.array([cuts[e][k] for e in rows], dtype=np.float32)
            keep = scores.numpy() > t
            for i, e in enumerate(rows):
                kept[labels[e]][k] += weight * float(keep[:, i].sum())
            s = signs.numpy()
            both = (keep & (s > 0)).any(axis=1) & (keep & (s < 0)).any(axis=1)
            conflict[k] += weight * float(both.sum())
        for e in rows:
            sizes[labels[e]] += weight * len(scores)
    result["kept"] = {label: [share(k, sizes[label]) for k in kept[label]] for label in kept}
    result["conflict_after_drop"] = [share(c, total) for c in conflict]
    return result


def histograms(
    records: Sequence[TensorRecord],
    sample: Sample,
    labels: Sequence[str],
    model_cuts: dict[int, float] | None,
) -> dict[str, Any]:
    """B / max B per expert from the sample, and where the cut falls on that scale."""
    counts, cuts = {}, {}
    for e, label in enumerate(labels):
        values, weights = _pooled(sample, e)
        if not len(values):
            continue
        clipped = np.clip(values, -1.0, 1.0)
        counts[label] = np.histogram(clipped, bins=EDGES, weights=weights)[0].tolist()
        if model_cuts is not None:
            cuts[label] = {"exact": model_cuts.get(e)}
        else:
            rows = [
                (r.cut[i], r.elements)
                for r in records
                if r.scored
                for i, x in enumerate(r.experts)
                if x == e
            ]
            low, median, high = _weighted_quantiles(
                np.array([c for c, _ in rows]),
                np.array([w for _, w in rows], dtype=float),
                (0.1, 0.5, 0.9),
            )
            cuts[label] = {"p10": low, "median": median, "p90": high}
    return {
        "edges": EDGES.tolist(),
        "counts": counts,
        "cuts": cuts,
        "positions": sample.positions,
        "per_tensor": sample.per_tensor,
    }


def ordered_layers(records: Sequence[TensorRecord]) -> list[tuple[str, int | str]]:
    keys = {(r.module, r.layer) for r in records}
    modules = list(dict.fromkeys(r.module for r in records))
    return sorted(keys, key=lambda k: (modules.index(k[0]), *_order_key(k[1])))
