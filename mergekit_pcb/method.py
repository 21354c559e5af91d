"""The ``pcb`` merge method: mergekit's group API around :mod:`mergekit_pcb.kernel`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from pydantic import ValidationError

from mergekit_pcb import _autoload, direct, parallel, workspace
from mergekit_pcb.kernel import (
    ClipSelection,
    add_scaled,
    column_chunks,
    combine,
    compute_dtype,
    drop_weights,
    pcb_task_vector,
    scores,
)
from mergekit_pcb.scope import model as model_scope

NAME = "pcb"
PRETTY_NAME = "PCB"
REFERENCE_URL = "https://arxiv.org/abs/2410.02396"


@dataclass(frozen=True)
class BoundedFloat(ParameterSpec):
    """A float parameter whose errors name the parameter and its allowed range.

    mergekit reports pydantic's generic text, which never says which parameter
    failed; ``allowed`` is the human-readable domain that the check enforces.
    """

    allowed: str = "a finite number"
    low: float = -math.inf
    high: float = math.inf
    low_inclusive: bool = True
    high_inclusive: bool = True

    def validate(self, value: Any) -> float:
        number = None
        if not isinstance(value, bool):
            try:
                number = super().validate(value)
            except ValidationError:
                pass
        if number is None or not self._inside(number):
            where = "per-model " if self.scope == ParameterScope.NON_BASE else ""
            raise ValueError(
                f"pcb: {where}parameter '{self.name}' got {value!r}; allowed: {self.allowed}"
            )
        return number

    def _inside(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        above = x >= self.low if self.low_inclusive else x > self.low
        below = x <= self.high if self.high_inclusive else x < self.high
        return above and below


PARAMETERS = (
    BoundedFloat(
        "pcb_ratio",
        float,
        ParameterScope.SHARED,
        default=0.1,
        description="fraction of entries kept per model",
        allowed="a number in (0, 1], the fraction of entries each model keeps",
        low=0.0,
        low_inclusive=False,
        high=1.0,
    ),
    BoundedFloat(
        "clamp_ratio",
        float,
        ParameterScope.SHARED,
        default=1e-4,
        description="outlier-clipping quantile of |task vector|",
        allowed="a number in [0, 0.5), the quantile clipped at each end of |task vector|",
        low=0.0,
        high=0.5,
        high_inclusive=False,
    ),
    BoundedFloat(
        "lambda",
        float,
        ParameterScope.SHARED,
        default=1.0,
        description="scale of the merged task vector",
        allowed="a finite number, the scale of the merged task vector",
    ),
    BoundedFloat(
        "weight",
        float,
        ParameterScope.NON_BASE,
        default=1.0,
        description="per-model task coefficient",
        allowed="a finite number, this model's task coefficient",
    ),
    model_scope.PCB_SCOPE,
)


def check_finite(group: TensorGroup) -> None:
    """NaN or Inf would silently poison every statistic of the tensor; name the culprit."""
    for entry in group.entries:
        bad = (~torch.isfinite(entry.tensor)).sum().item()
        if bad:
            role = "base model" if entry.is_base else "model"
            raise ValueError(
                f"pcb: tensor '{group.metadata.name}' of {role} '{entry.id}' holds {bad} "
                "NaN/Inf value(s); allowed: finite values only"
            )


def canonical_order(entries, weights) -> list:
    """The experts sorted by content, so the result never depends on model order.

    Float sums over models depend on their order in the last bit; a content key
    (see :func:`content_keys`, then the coefficient) fixes one order for any
    permutation of the inputs. Content comes first so the order does not change with
    the coefficients: the evolutionary search caches T~/B once per tensor in this
    order and varies only the coefficients (mergekit_pcb.evolve.cache).
    """
    entries = list(entries)
    keys = content_keys([e.tensor for e in entries])
    rank = {e.id: (*key, float(weights[e.id])) for e, key in zip(entries, keys, strict=True)}
    return sorted(entries, key=lambda e: rank[e.id])


_SAMPLE = 4096


def content_keys(tensors: Sequence[torch.Tensor]) -> list[tuple[float, float]]:
    """(sum, norm) in float64 of each tensor: of ~4096 evenly spaced entries, or of all.

    The sample costs nothing next to the merge (the full float64 key was 15% of it);
    only when two tensors tie on their samples, e.g. experts that changed other
    entries than the sampled ones, are all keys taken over every entry. Tensors that
    still tie are identical in practice, and their order cannot matter.
    """

    def key(tensor: torch.Tensor, step: int) -> tuple[float, float]:
        flat = tensor.reshape(-1)[::step]
        return (
            float(flat.sum(dtype=torch.float64)),
            float(torch.linalg.vector_norm(flat, dtype=torch.float64)),
        )

    quick = [key(t, max(1, t.numel() // _SAMPLE)) for t in tensors]
    if len(set(quick)) == len(quick):
        return quick
    return [key(t, 1) for t in tensors]


class TaskVectors(NamedTuple):
    base: torch.Tensor  # flat base in its storage dtype (aliases the input)
    tau: torch.Tensor  # n x d
    finite: bool  # no NaN/Inf anywhere in tau
    changed: bool  # some entry of tau is nonzero


def task_vectors(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    reuse: bool = False,
    observe: Callable[[slice, torch.Tensor], None] | None = None,
) -> TaskVectors:
    """The flat base and the n x d task vectors in the compute dtype.

    Each expert is subtracted straight into its row, chunk by chunk in threads
    (one pass, no converted copy of anything), and each chunk's extremes are taken
    while it is in cache (finiteness and "changed" need no extra pass), as is
    anything ``observe(columns, tau_chunk)`` wants (e.g. the clip quantiles). An
    input whose dtype is wider than the compute dtype is first rounded to it, so
    every row is round(expert) - round(base) whatever the inputs' dtypes. The
    returned base keeps its storage dtype: its consumers (add_scaled) promote it
    exactly. ``reuse`` writes into this thread's reusable buffer (see
    mergekit_pcb.workspace): only for a caller that is done with the result
    before the next call.
    """
    work = compute_dtype(base.dtype)
    flat = base.reshape(-1)
    n, d = len(experts), base.numel()
    if reuse:
        tau = workspace.buffer("task vectors", n * d, work, base.device).view(n, d)
    else:
        tau = torch.empty((n, d), dtype=work, device=base.device)
    rows = [e.reshape(-1) for e in experts]
    rows = [r if torch.promote_types(r.dtype, work) == work else r.to(work) for r in rows]

    def subtract(cols: slice) -> torch.Tensor:
        base_chunk = flat[cols]
        if base_chunk.dtype != work:
            scratch = workspace.buffer(
                "task vectors base", cols.stop - cols.start, work, flat.device
            )
            base_chunk = scratch.copy_(base_chunk)
        for i, row in enumerate(rows):
            torch.sub(row[cols], base_chunk, out=tau[i, cols])
        chunk = tau[:, cols]
        if observe is not None:
            observe(cols, chunk)
        return torch.stack([chunk.amax(), chunk.amin()])

    extremes = parallel.map_chunks(subtract, column_chunks(n, d), base.device) if d else []
    extremes = torch.cat(extremes) if extremes else torch.zeros(2, dtype=work)
    return TaskVectors(flat, tau, bool(torch.isfinite(extremes).all()), bool(extremes.any()))


class PCBMerge(GroupMergeMethod):
    spec = MergeMethodSpec(
        name=NAME,
        pretty_name=PRETTY_NAME,
        reference_url=REFERENCE_URL,
        parameters=PARAMETERS,
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
    )

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        # mergekit's own message ("requires a base input") never names the config key.
        if base_id is None:
            where = f" (for {group_name})" if group_name else ""
            raise ValueError(
                f"pcb: 'base_model' is missing{where}; allowed: set base_model to the model "
                "the others were fine-tuned from (task vectors are taken against it)"
            )
        super().validate_inputs(input_ids, base_id, group_name=group_name)

    def merge_group(self, group: TensorGroup, /, **params: Any) -> torch.Tensor:
        if params["pcb_scope"] == "model":
            # First, so the statistics passes (run by the first call) hold no tau of ours.
            stats = model_scope.statistics(NAME, prepare)
        else:
            merged = _merge_direct(group, params)
            if merged is not None:
                return merged
        base = group.base.tensor
        clip = None
        if params["pcb_scope"] != "model":  # taken from tau's chunks as they are made
            n, d = len(group.non_base), base.numel()
            clip = ClipSelection(n, d, compute_dtype(base.dtype), params["clamp_ratio"])
        # reuse: done with tau before the next call
        prepared = prepare(group, params, reuse=True, observe=clip and clip.feed)
        experts, tau = prepared.experts, prepared.tau
        if prepared.unchanged:
            return base
        coefficients = _coefficients(experts, params, tau)
        if params["pcb_scope"] == "model":
            bounds, threshold, top = model_scope.stats_tensors(
                stats, experts, tau.dtype, tau.device
            )
            clipped, score = scores(tau, bounds)
            weights = drop_weights(
                score, params["pcb_ratio"], threshold=threshold, top=top, out=score
            )
            merged = combine(clipped, weights, coefficients, consume=True)
        else:
            merged = pcb_task_vector(
                tau,
                coefficients,
                pcb_ratio=params["pcb_ratio"],
                clamp_ratio=params["clamp_ratio"],
                bounds=clip.finish(tau),
            )
        return add_scaled(prepared.base, merged, params["lambda"], base.dtype).reshape(base.shape)


def _coefficients(experts, params: dict, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(
        [params["weight"][e.id] for e in experts], dtype=like.dtype, device=like.device
    )


def _merge_direct(group: TensorGroup, params: dict) -> torch.Tensor | None:
    """The tensor-scope merge without storing tau (:mod:`mergekit_pcb.direct`), where it
    applies; None where not. The same floats as the stored-tau path."""
    base, clamp_ratio = group.base.tensor, params["clamp_ratio"]
    if not direct.applies(base, [e.tensor for e in group.non_base], clamp_ratio):
        return None  # before the canonical order, which the stored-tau path makes itself
    experts = canonical_order(group.non_base, params["weight"])
    inputs = direct.source(base, [e.tensor for e in experts])
    stats = direct.statistics(inputs, clamp_ratio)
    if not stats.finite:
        raise _overflow(group, torch.float32)
    if not stats.changed:
        return base
    coefficients = _coefficients(experts, params, torch.empty(0))
    merged = direct.merge(inputs, stats.bounds, coefficients, params["pcb_ratio"], params["lambda"])
    return merged.reshape(base.shape)


def _overflow(group: TensorGroup, work: torch.dtype) -> ValueError:
    """The error for a non-finite task vector, naming the input at fault where one is."""
    check_finite(group)
    return ValueError(
        f"pcb: tensor '{group.metadata.name}': a task vector overflows {work} "
        "(model minus base_model exceeds its range); allowed: differences representable "
        f"in {work} (set dtype: float64)"
    )


def prepare(
    group: TensorGroup,
    params: dict,
    *,
    reuse: bool = False,
    observe: Callable[[slice, torch.Tensor], None] | None = None,
) -> model_scope.Prepared:
    """Flattened base and task vectors in the compute dtype, experts in canonical order.

    Shared by merge_group and the model-scope statistics passes, which must see
    bit-identical task vectors (in the same row order) for the cut to be exact.
    Finiteness is checked on tau (its extremes come free with it), since NaN/Inf
    in any input reaches tau; only then is the slow per-input scan run to name
    the culprit.
    ``reuse``: tau lives in this thread's reusable buffer; ``observe`` sees each
    chunk of tau as it is made (see :func:`task_vectors`).
    """
    experts = canonical_order(group.non_base, params["weight"])
    vectors = task_vectors(
        group.base.tensor, [e.tensor for e in experts], reuse=reuse, observe=observe
    )
    if not vectors.finite:
        raise _overflow(group, vectors.tau.dtype)
    return model_scope.Prepared(tuple(experts), vectors.base, vectors.tau, not vectors.changed)


pcb = PCBMerge()

# Importing this module first (``from mergekit_pcb.method import pcb``) loads mergekit's
# registry, whose hook cannot register a half-initialized module: register here.
_autoload.register()
