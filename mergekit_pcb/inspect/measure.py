"""What PCB does to one tensor, counted with the merge's own kernel functions.

For each output tensor the group that ``merge_group`` would receive is taken
through the same steps as the merge: the canonical expert order
(:func:`mergekit_pcb.groups.ordered`), the task vectors, the scores B and
clipped task vectors T~ (:func:`kernel.scores`, with the whole model's clip
bounds under ``pcb_scope: model``), the drop weights W at the tensor's own cut or
the whole model's (:func:`kernel.drop_weights`), the weighted combination m
(:func:`kernel.combine`) and ``base + lambda * m`` in the output dtype
(:func:`kernel.add_scaled`). Counts are taken from those very tensors, chunk by
chunk, so memory stays at what a stored-tau merge of the tensor holds (tau or T~,
B or W, m and the output). Only a bounded sample of positions is kept beyond the
tensor, for the score histograms and, under ``pcb_scope: model``, the ratio sweep.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mergekit_pcb import groups, kernel
from mergekit_pcb.kernel import auto_scale
from mergekit_pcb.kernel.known_cuts import cut_values
from mergekit_pcb.kernel.whole_model import row_statistics

# The pcb_ratio values of the sweep (the configured ratio is marked on the plot).
SWEEP = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
_CHUNK = 1 << 20  # elements of tau per chunk of the counting passes


@dataclass
class TensorRecord:
    """One output tensor's exact counts (rows in PCB's canonical expert order)."""

    name: str
    layer: int | str
    module: str
    component: str
    elements: int
    experts: list[int]  # index into the plan's experts, per row
    weights: list[float]
    pcb_ratio: float
    clamp_ratio: float
    lambda_: float | str
    kept: list[int]  # entries with W > 0
    wins: list[int]  # entries where this row's W is the largest (> 0; ties: first row)
    abs_sum: list[float]  # sum of |tau|
    gram: list[list[float]]  # tau_i . tau_j
    sign_pairs: list[list[int]]  # entries where tau_i > 0 and tau_j < 0
    conflict: int  # entries where some tau > 0 and some tau < 0
    kept_conflict: int  # the same among the rows that keep the entry (W > 0)
    none_kept: int  # entries no row keeps (they stay at the base)
    changed: int  # entries whose written value differs from the base's
    merged_sq: float  # |m|^2 of the merged task vector at lambda 1
    cut: list[float]  # each row's cut t over its max B (the scale of the histograms)
    scored: bool = True  # False where no expert changed the tensor (nothing to score)
    lambda_chosen: float | None = None  # the scale lambda: auto chose (as the merge does)
    sweep_kept: list[list[int]] | None = None  # rows x SWEEP, exact (tensor scope)
    sweep_conflict: list[int] | None = None  # SWEEP, exact (tensor scope)

    def to_json(self) -> dict:
        data = asdict(self)
        data["lambda"] = data.pop("lambda_")
        return data


@dataclass
class Sample:
    """Up to ``per_tensor`` positions of every tensor, drawn uniformly (seeded by the
    tensor's name) and weighted by elements / positions, so that pooled they stand for
    the whole model. Each position keeps every row's B over its scale (the row's max B:
    the tensor's, or the whole model's under ``pcb_scope: model``) and sign of T~."""

    per_tensor: int
    experts: list[torch.Tensor] = field(default_factory=list)  # (n,) expert index per part
    scores: list[torch.Tensor] = field(default_factory=list)  # m x n, B / scale
    signs: list[torch.Tensor] = field(default_factory=list)  # m x n int8
    weights: list[float] = field(default_factory=list)  # elements per sampled position

    @property
    def positions(self) -> int:
        return sum(len(s) for s in self.scores)

    def add(self, name: str, rows: list[int], score, clipped, scale) -> None:
        d = score.shape[1]
        if d <= self.per_tensor:
            where = torch.arange(d)
        else:
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            where = torch.randint(0, d, (self.per_tensor,), generator=generator)
        where = where.to(score.device)
        picked = score.index_select(1, where) / scale[:, None]
        self.experts.append(torch.tensor(rows))
        self.scores.append(picked.T.float().cpu())
        self.signs.append(torch.sign(clipped.index_select(1, where)).T.to(torch.int8).cpu())
        self.weights.append(d / len(where))


def _chunks(n: int, d: int) -> list[slice]:
    width = max(1, _CHUNK // max(n, 1))
    return [slice(start, min(start + width, d)) for start in range(0, d, width)]


def _before(tau: torch.Tensor) -> dict[str, Any]:
    """Counts on the raw task vectors (before T~ is written over them)."""
    n, d = tau.shape
    gram = torch.zeros(n, n, dtype=torch.float64, device=tau.device)
    pairs = torch.zeros(n, n, dtype=torch.float64, device=tau.device)
    abs_sum = torch.zeros(n, dtype=torch.float64, device=tau.device)
    conflict = 0
    for cols in _chunks(n, d):
        chunk = tau[:, cols]
        wide = chunk.to(torch.float64)
        gram += wide @ wide.T
        abs_sum += wide.abs().sum(dim=1)
        positive, negative = chunk > 0, chunk < 0
        pairs += positive.to(torch.float64) @ negative.to(torch.float64).T
        conflict += int((positive.any(dim=0) & negative.any(dim=0)).sum())
    return {
        "gram": gram.cpu().tolist(),
        "sign_pairs": pairs.round().long().cpu().tolist(),
        "abs_sum": abs_sum.cpu().tolist(),
        "conflict": conflict,
    }


def _cuts(score: torch.Tensor, ratios: tuple[float, ...]) -> torch.Tensor:
    """Each row's cut t = sorted(B)[int(d (1 - r))] at every ratio (rows x ratios), as the
    merge's selection picks it (:func:`kernel.known_cuts.cut_values`: many ranks at once)."""
    ranks = [kernel.cut_index(score.shape[1], r) for r in ratios]
    return cut_values(score, ranks).to(score.device)


def _sweep(score: torch.Tensor, clipped: torch.Tensor, thresholds: torch.Tensor):
    """Exact kept counts (rows x ratios) and kept-conflict counts (ratios) at every cut.

    ``thresholds`` (rows x ratios, ratios ascending) never increase along a row, so
    an entry b is kept from the ratio index ``first`` = #(t >= b) on; a position
    conflicts from the later of the first kept positive and the first kept negative.
    """
    n, d = score.shape
    k = thresholds.shape[1]
    ascending = thresholds.flip(1).contiguous()
    kept = torch.zeros(n, k + 1, dtype=torch.int64, device=score.device)
    conflict = torch.zeros(k + 1, dtype=torch.int64, device=score.device)
    never = torch.tensor(k, device=score.device)
    for cols in _chunks(n, d):
        first = k - torch.searchsorted(ascending, score[:, cols].contiguous())
        kept.scatter_add_(1, first, torch.ones_like(first))
        signs = torch.sign(clipped[:, cols])
        positive = torch.where(signs > 0, first, never).amin(dim=0)
        negative = torch.where(signs < 0, first, never).amin(dim=0)
        conflict += torch.bincount(torch.maximum(positive, negative), minlength=k + 1)
    return kept.cumsum(dim=1)[:, :k].cpu().tolist(), conflict.cumsum(dim=0)[:k].cpu().tolist()


def _after(weights: torch.Tensor, clipped: torch.Tensor) -> dict[str, Any]:
    """Counts on the drop weights W."""
    n, d = weights.shape
    kept = torch.zeros(n, dtype=torch.int64, device=weights.device)
    wins = torch.zeros(n, dtype=torch.int64, device=weights.device)
    none_kept = kept_conflict = 0
    for cols in _chunks(n, d):
        w = weights[:, cols]
        keep = w > 0
        kept += keep.sum(dim=1)
        largest, winner = w.max(dim=0)  # the first row among equal maxima
        won = largest > 0  # W >= 0: no row keeps the entry where the largest W is 0
        wins += torch.bincount(winner[won], minlength=n)
        none_kept += int(won.numel() - won.sum())
        signs = clipped[:, cols]
        positive = (keep & (signs > 0)).any(dim=0)
        negative = (keep & (signs < 0)).any(dim=0)
        kept_conflict += int((positive & negative).sum())
    return {
        "kept": kept.cpu().tolist(),
        "wins": wins.cpu().tolist(),
        "none_kept": none_kept,
        "kept_conflict": kept_conflict,
    }


def _scale(top: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Each row's max B, or (if not positive) its largest |B|, or 1: never 0."""
    fallback = score.abs().amax(dim=1)
    scale = torch.where(top > 0, top, fallback)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def measure(
    planned: Any,
    group: Any,
    expert_index: dict,
    sample: Sample,
    statistics: dict | None = None,
) -> TensorRecord:
    """Run PCB on one group as the merge does and count what it did.

    ``statistics``: the whole model's (``pcb_scope: model``), else the tensor's own.
    """
    from mergekit.common import dtype_from_name

    params = planned.parameters
    weight_of = {e.id: planned.weight_of(e.id) for e in group.non_base}
    experts = groups.ordered(group, weight_of)
    rows = [expert_index[e.id] for e in experts]
    coefficients = [weight_of[e.id] for e in experts]
    base = group.base.tensor
    vectors = kernel.task_vectors(base, [e.tensor for e in experts])
    if not vectors.finite:
        raise groups.non_finite_error(group, vectors.tau.dtype)
    tau = vectors.tau
    n, d = tau.shape
    ratio = params["pcb_ratio"]
    record = TensorRecord(
        name=planned.name,
        layer=planned.layer,
        module=planned.module,
        component=planned.component,
        elements=d,
        experts=rows,
        weights=coefficients,
        pcb_ratio=ratio,
        clamp_ratio=params["clamp_ratio"],
        lambda_=params["lambda"],
        kept=[0] * n,
        wins=[0] * n,
        none_kept=d,
        kept_conflict=0,
        changed=0,
        merged_sq=0.0,
        cut=[0.0] * n,
        **_before(tau),
    )
    if statistics is None:
        record.sweep_kept = [[0] * len(SWEEP) for _ in range(n)]
        record.sweep_conflict = [0] * len(SWEEP)
    if not vectors.changed:  # the merge returns the base unchanged, as here
        record.scored = False
        return record

    auto = auto_scale.is_auto(params["lambda"])
    coefficient_row = torch.tensor(coefficients, dtype=tau.dtype)
    total = auto_scale.Stored(tau, coefficient_row) if auto else None  # before tau is used
    if statistics is not None:
        whole = row_statistics([statistics[e.id] for e in experts], tau.dtype, tau.device)
        clipped, score = kernel.scores(tau, whole.bounds)
        threshold, top = whole.threshold, whole.top
    else:
        clipped, score = kernel.scores(tau, clamp_ratio=params["clamp_ratio"])
        cuts = _cuts(score, (*SWEEP, ratio))
        threshold, top = cuts[:, -1].contiguous(), score.amax(dim=1)
        record.sweep_kept, record.sweep_conflict = _sweep(score, clipped, cuts[:, :-1])
    scale = _scale(top, score)
    record.cut = (threshold / scale).cpu().tolist()
    sample.add(planned.name, rows, score, clipped, scale)

    weights = kernel.drop_weights(score, ratio, threshold=threshold, top=top, out=score)
    for key, value in _after(weights, clipped).items():
        setattr(record, key, value)
    merged = kernel.combine(clipped, weights, coefficient_row)
    record.merged_sq = float(torch.linalg.vector_norm(merged, dtype=torch.float64) ** 2)
    lam = params["lambda"]
    if auto:
        lam = record.lambda_chosen = total.choose(merged)
    written = kernel.add_scaled(vectors.base, merged, lam, base.dtype)
    # Where the merge stops (a float16 overflow), inspect stops with the same message.
    error = groups.non_finite_output(group, written, planned.out_dtype)
    if error is not None:
        raise error
    base_written = vectors.base
    if planned.out_dtype:
        out_dtype = dtype_from_name(planned.out_dtype)
        written, base_written = written.to(out_dtype), base_written.to(out_dtype)
    record.changed = int((written != base_written).sum())
    return record
