"""A candidate: search coordinates -> PCB values -> weights written into the loaded model.

CMA-ES works in the unit cube (every searched quantity scaled to [0, 1], so one
``sigma`` fits all); fixed quantities are not coordinates at all. The merge of a
candidate runs only spec steps 9-11 on the cached T~/B, with the kernel's own
functions, so its floats are those of ``mergekit-yaml`` on ``best.yml``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergekit_pcb import kernel
from mergekit_pcb.evolve.cache import CachedTensor, TensorCache
from mergekit_pcb.evolve.config import EvolveConfig
from mergekit_pcb.evolve.layout import Values
from mergekit_pcb.parameters import PCB_RATIO


@dataclass(frozen=True)
class Coordinate:
    kind: str  # pcb_ratio | lambda | weight
    index: int  # group or model index
    low: float
    high: float


@dataclass(frozen=True)
class Genome:
    """Maps points of the unit cube to :class:`Values` and back."""

    coordinates: tuple[Coordinate, ...]
    fixed: Values  # values used where a quantity is not searched

    @classmethod
    def from_config(cls, cfg: EvolveConfig, groups: int) -> Genome:
        coords = []
        lo, hi = cfg.search.range("pcb_ratio")
        if lo < hi:
            coords += [Coordinate("pcb_ratio", g, lo, hi) for g in range(groups)]
        lo_l, hi_l = cfg.search.range("lambda")
        if lo_l < hi_l:
            coords.append(Coordinate("lambda", 0, lo_l, hi_l))
        lo_w, hi_w = cfg.search.range("weight")
        if lo_w < hi_w:
            coords += [Coordinate("weight", i, lo_w, hi_w) for i in range(len(cfg.models))]
        fixed = Values((lo,) * groups, lo_l, (lo_w,) * len(cfg.models))
        return cls(tuple(coords), fixed)

    @property
    def dimension(self) -> int:
        return len(self.coordinates)

    def decode(self, x) -> Values:
        ratios, lam, weights = (
            list(self.fixed.pcb_ratio),
            self.fixed.lambda_,
            list(self.fixed.weights),
        )
        for c, u in zip(self.coordinates, x, strict=True):
            u = min(1.0, max(0.0, float(u)))
            value = c.low + u * (c.high - c.low)
            if c.kind == "pcb_ratio":
                ratios[c.index] = min(PCB_RATIO.high, max(value, 1e-12))  # inside (0, 1]
            elif c.kind == "lambda":
                lam = value
            else:
                weights[c.index] = value
        return Values(tuple(ratios), lam, tuple(weights))

    def encode(self, values: Values) -> list[float]:
        """The unit-cube point nearest to ``values`` (clipped into the searched ranges)."""
        out = []
        for c in self.coordinates:
            if c.kind == "pcb_ratio":
                v = values.pcb_ratio[c.index]
            elif c.kind == "lambda":
                v = values.lambda_
            else:
                v = values.weights[c.index]
            out.append(min(1.0, max(0.0, (v - c.low) / (c.high - c.low))))
        return out


def merged_tensor(tensor: CachedTensor, arrays: dict, values: Values) -> torch.Tensor:
    """Steps 9-11 for one tensor: drop, weighted combine, base + lambda * m (flat)."""
    base = arrays["base"]
    if tensor.unchanged:
        return base
    clipped, score = arrays["clipped"], arrays["score"]
    weights_of = [values.weights[r] for r in tensor.rows]
    # Rows are in the canonical content order; experts with identical content tie-break
    # by weight there, and their rows are identical, so only the coefficients move.
    order = kernel.order_by(tensor.keys, weights_of)
    coefficients = torch.tensor([weights_of[j] for j in order], dtype=clipped.dtype)
    ratio = values.pcb_ratio[tensor.group]
    threshold = top = None
    if "cuts" in arrays:
        rank = kernel.cut_index(score.shape[1], ratio) - int(arrays["cut_first"][0])
        if 0 <= rank < arrays["cuts"].shape[1]:
            threshold, top = arrays["cuts"][:, rank], arrays["top"]
    # Without a table entry drop_weights selects the cut itself: the same value.
    weights = kernel.drop_weights(score, ratio, threshold=threshold, top=top)  # cache untouched
    merged = kernel.combine(clipped, weights, coefficients)
    return kernel.add_scaled(base, merged, values.lambda_)


class ModelWriter:
    """Holds the candidate model's parameter handles and overwrites them in place."""

    def __init__(self, model, cache: TensorCache):
        targets = dict(model.named_buffers())
        targets.update(dict(model.named_parameters()))
        missing = [n for n in cache.names if n not in targets]
        if missing:
            raise ValueError(
                f"evolve: merged tensor(s) {', '.join(missing[:3])} have no parameter of that "
                "name in the loaded model (unsupported checkpoint naming)"
            )
        self.cache = cache
        self.targets = [targets[n] for n in cache.names]

    @torch.no_grad()
    def write(self, values: Values) -> None:
        for tensor, target in zip(self.cache.tensors, self.targets, strict=True):
            out = merged_tensor(tensor, self.cache.arrays(tensor), values)
            target.data.copy_(out.view(tensor.shape))

    def state(self) -> dict[str, torch.Tensor]:
        """The merged tensors as they sit in the model (for checks against mergekit)."""
        return {n: t.detach().clone() for n, t in zip(self.cache.names, self.targets, strict=True)}
