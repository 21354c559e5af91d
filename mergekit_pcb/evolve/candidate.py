"""Steps 3 and 4 of the search: a candidate's coordinates -> PCB values -> weights
written into the loaded model.

Every optimizer works in the unit cube (every searched quantity scaled to [0, 1], so one
``sigma`` fits all); fixed quantities are not coordinates at all. ``pcb_ratio``
is snapped to the cache's levels (:func:`.cache.snap_ratio`), so that its cut is
known. A candidate's merge recomputes B from the inputs chunk by chunk and
combines it at once (:func:`mergekit_pcb.kernel.known_cuts.merge`: one pass per
tensor, written straight into the loaded model), with the kernel's own loops
or torch ops, so its floats are those of ``mergekit-yaml`` on ``best.yml``.

With ``device: cuda`` the merge runs on the GPU (the torch ops, as ``mergekit-yaml
--cuda`` runs them): the inputs stay resident there while they fit
``cache.gpu_memory_gb``, and the rest pass through a pinned host buffer per
candidate (:class:`DeviceInputs`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mergekit_pcb import kernel
from mergekit_pcb.evolve.cache import CachedTensor, TensorCache, snap_ratio
from mergekit_pcb.evolve.config import SearchSpace
from mergekit_pcb.evolve.layout import Values
from mergekit_pcb.kernel import known_cuts


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
    def of(cls, search: SearchSpace, models: int, groups: int) -> Genome:
        """The cube of ``search``'s ranges for ``models`` experts and ``groups`` layer groups."""
        coords = []
        lo, hi = search.range("pcb_ratio")
        if lo < hi:
            coords += [Coordinate("pcb_ratio", g, lo, hi) for g in range(groups)]
        if search.lambda_auto:  # fixed: pcb's own per-tensor scale
            lo_l = hi_l = search.lambda_
        else:
            lo_l, hi_l = search.range("lambda")
        if lo_l != hi_l:
            coords.append(Coordinate("lambda", 0, lo_l, hi_l))
        lo_w, hi_w = search.range("weight")
        if lo_w < hi_w:
            coords += [Coordinate("weight", i, lo_w, hi_w) for i in range(models)]
        fixed = Values((lo,) * groups, lo_l, (lo_w,) * models)
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
                ratios[c.index] = snap_ratio(value, c.low, c.high)  # a level: its cut is cached
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


def merged_tensor(
    cache: TensorCache,
    tensor: CachedTensor,
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    values: Values,
    out: torch.Tensor | None = None,
    on_scale=None,
) -> torch.Tensor:
    """One tensor of the candidate (flat), from its inputs (base and experts in the
    cache's row order): into ``out`` where given and the known-cut merge applies.
    ``on_scale``: told the scale ``lambda: auto`` chooses."""
    if tensor.unchanged:
        return base
    weights_of = [values.weights[r] for r in tensor.rows]
    # Rows are in the canonical content order; experts with equal content keys
    # tie-break by weight, as the merge orders them.
    order = kernel.order_by(tensor.keys, weights_of)
    coefficients = [weights_of[j] for j in order]
    experts = [experts[j] for j in order]
    ratio = values.pcb_ratio[tensor.group]
    level = cache.level(ratio)
    reordered = order != sorted(order)
    if level is None or (reordered and tensor.distinct_ties):
        # A ratio without a cached cut (or rows whose order changes B): the merge itself.
        merge = (
            kernel.merge_streamed
            if tensor.statistics.flavour == known_cuts.STREAMED
            else kernel.merge_stored
        )
        merged = merge(
            base,
            experts,
            coefficients,
            pcb_ratio=ratio,
            clamp_ratio=tensor.clamp_ratio,
            scale=values.lambda_,
            on_scale=on_scale,
        )
        return merged.reshape(-1)
    stats = tensor.statistics.rows(order) if reordered else tensor.statistics
    return known_cuts.merge(
        base, experts, coefficients, stats, level, scale=values.lambda_, out=out, on_scale=on_scale
    )


def plan_residency(sizes: Sequence[int], budget: float) -> list[bool]:
    """Which tensors' inputs (of these byte sizes, in merge order) stay on the GPU:
    each one that still fits the budget, in order."""
    resident, used = [], 0
    for size in sizes:
        fits = used + size <= budget
        resident.append(fits)
        used += size if fits else 0
    return resident


def _input_bytes(cache: TensorCache, tensor: CachedTensor) -> int:
    numel = 1
    for s in tensor.shape:
        numel *= s
    refs = cache.refs(tensor)
    if refs is None:
        return sum(a.numel() * a.element_size() for a in tensor.arrays.values())
    return sum(numel * getattr(torch, ref.dtype).itemsize for ref in refs)


class DeviceInputs:
    """The inputs of every tensor on the merge's device (a GPU).

    Resident where they fit ``budget`` bytes (copied there once); the others are
    copied per candidate from the memory-mapped files through one pinned host
    buffer (reused: each copy waits for the previous one to leave it).
    """

    def __init__(self, cache: TensorCache, device: torch.device, budget: float, pin: bool = True):
        self.cache, self.device, self.pin = cache, torch.device(device), pin
        sizes = [_input_bytes(cache, t) for t in cache.tensors]
        self.resident_flags = plan_residency(sizes, budget)
        self._index = {id(t): i for i, t in enumerate(cache.tensors)}
        self._resident: dict[int, list[torch.Tensor]] = {}
        for i, (tensor, keep) in enumerate(zip(cache.tensors, self.resident_flags, strict=True)):
            if keep:
                with cache.inputs(tensor) as (base, experts):
                    self._resident[i] = [t.to(self.device, copy=True) for t in (base, *experts)]
        self._staging: torch.Tensor | None = None
        self._copied = None  # the event after the last copy out of the staging buffer

    @contextmanager
    def inputs(self, tensor: CachedTensor) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        i = self._index[id(tensor)]
        if i in self._resident:
            found = self._resident[i]
            yield found[0], found[1:]
            return
        with self.cache.inputs(tensor) as (base, experts):
            staged = self._stage([base, *experts])
        yield staged[0], staged[1:]

    def _stage(self, host: list[torch.Tensor]) -> list[torch.Tensor]:
        """``host`` on the device, through the pinned staging buffer."""
        align = 64
        offsets, total = [], 0
        for t in host:
            offsets.append(total)
            total += -(-t.numel() * t.element_size() // align) * align
        if self._staging is None or self._staging.numel() < total:
            self._staging = None
            self._staging = torch.empty(total, dtype=torch.uint8, pin_memory=self.pin)
        if self._copied is not None:
            self._copied.synchronize()  # the previous tensor has left the buffer
        views = []
        for t, offset in zip(host, offsets, strict=True):
            nbytes = t.numel() * t.element_size()
            views.append(self._staging[offset : offset + nbytes].view(t.dtype))
            views[-1].copy_(t.reshape(-1))
        out = [view.to(self.device, non_blocking=True, copy=True) for view in views]
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        return out


def _gpu_budget(device: torch.device, gpu_memory_gb: float | None) -> float:
    """cache.gpu_memory_gb in bytes; by default half the GPU's free memory (the model
    is loaded by then; the rest is left to the scoring)."""
    if gpu_memory_gb is not None:
        return gpu_memory_gb * 1e9
    free, _ = torch.cuda.mem_get_info(device)
    return free / 2


class ModelWriter:
    """Holds the candidate model's parameter handles and overwrites them in place."""

    def __init__(self, model, cache: TensorCache, gpu_memory_gb: float | None = None):
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
        self.source = cache
        if cache.device != "cpu":
            device = next((t.device for t in self.targets), torch.device(cache.device))
            budget = _gpu_budget(device, gpu_memory_gb)
            self.source = DeviceInputs(cache, device, budget)

    @torch.no_grad()
    def write(self, values: Values) -> None:
        for tensor, target in zip(self.cache.tensors, self.targets, strict=True):
            with self.source.inputs(tensor) as (base, experts):
                data = target.data
                direct = (
                    data.view(-1)
                    if data.is_contiguous()
                    and data.dtype == base.dtype
                    and data.device == base.device
                    else None
                )
                out = merged_tensor(self.cache, tensor, base, experts, values, direct)
                if direct is None or out.data_ptr() != direct.data_ptr():
                    data.copy_(out.view(tensor.shape))

    def state(self) -> dict[str, torch.Tensor]:
        """The merged tensors as they sit in the model (for checks against mergekit)."""
        return {n: t.detach().clone() for n, t in zip(self.cache.names, self.targets, strict=True)}
