"""PCB's expensive steps, paid once: per tensor the clipped task vectors T~ and scores B.

Steps 1-8 of the spec depend on the inputs and ``clamp_ratio`` only, never on the
searched ``pcb_ratio``, ``lambda`` or weights, so a candidate needs just the cut,
the weighted sum and ``base + lambda * m`` (:mod:`.candidate`). Tensors stay in
memory up to a budget; the rest (or all, for Ray actors in other processes) go
to a cache directory as one safetensors file per tensor, read back through
``safe_open`` (memory-mapped, so the OS page cache is shared between actors).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_pcb import kernel
from mergekit_pcb.evolve.layout import PlannedTensor
from mergekit_pcb.parameters import PCB_RATIO

META = "cache.json"
FORMAT = 3


@dataclass
class CachedTensor:
    name: str
    group: int
    shape: tuple[int, ...]
    rows: tuple[int, ...]  # cfg.models index of each row
    unchanged: bool  # no expert changed it: the output is the base (as in the method)
    keys: tuple[tuple[float, float], ...] = ()  # content key of each row (sum, norm)
    file: str | None = None
    arrays: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def load(self, root: Path | None) -> dict[str, torch.Tensor]:
        """``clipped`` (T~), ``score`` (B) and ``base`` (flat), in the compute dtype."""
        if self.arrays is not None:
            return self.arrays
        from safetensors import safe_open

        with safe_open(str(root / self.file), framework="pt") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}

    def meta(self) -> dict:
        return {
            "name": self.name,
            "group": self.group,
            "shape": list(self.shape),
            "rows": list(self.rows),
            "unchanged": self.unchanged,
            "keys": [list(k) for k in self.keys],
            "file": self.file,
        }


@dataclass
class TensorCache:
    tensors: list[CachedTensor]
    root: Path | None  # directory of the on-disk part, if any

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def groups(self) -> list[int]:
        return [t.group for t in self.tensors]

    def arrays(self, tensor: CachedTensor) -> dict[str, torch.Tensor]:
        return tensor.load(self.root)

    def write_meta(self, fingerprint: str) -> None:
        data = {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "tensors": [t.meta() for t in self.tensors],
        }
        (self.root / META).write_text(json.dumps(data))

    @classmethod
    def open(cls, root: os.PathLike, fingerprint: str) -> TensorCache | None:
        """A complete on-disk cache for ``fingerprint``, or None."""
        root = Path(root)
        try:
            data = json.loads((root / META).read_text())
        except (OSError, ValueError):
            return None
        if data.get("format") != FORMAT or data.get("fingerprint") != fingerprint:
            return None
        tensors = [
            CachedTensor(
                t["name"],
                t["group"],
                tuple(t["shape"]),
                tuple(t["rows"]),
                t["unchanged"],
                tuple(tuple(k) for k in t["keys"]),
                t["file"],
            )
            for t in data["tensors"]
        ]
        if any(t.file is None or not (root / t.file).is_file() for t in tensors):
            return None
        return cls(tensors, root)


def _stat(path: str) -> list:
    """Sizes and mtimes of a local model's files, so edited inputs invalidate the cache."""
    p = Path(path)
    if not p.is_dir():
        return [path]
    return sorted(
        [f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in p.iterdir() if f.is_file()
    )


def fingerprint(cfg, groups: list[int]) -> str:
    data = {
        "base": [cfg.base_model, _stat(cfg.base_model)],
        "models": [[m, _stat(m)] for m in cfg.models],
        "dtype": cfg.dtype,
        "clamp_ratio": cfg.parameters.clamp_ratio,
        "groups": groups,
        "ratios": searched_ratios(cfg),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def searched_ratios(cfg) -> tuple[float, float]:
    """The pcb_ratio interval any candidate can use: the searched range and the default
    (always scored, as the baseline)."""
    low, high = cfg.search.range("pcb_ratio")
    return min(low, PCB_RATIO.default), max(high, PCB_RATIO.default)


def cut_table(score: torch.Tensor, ratios: tuple[float, float]) -> dict[str, torch.Tensor]:
    """Each row's sorted scores at every rank a searched ratio can cut at, and its max.

    The cut t_i = sorted(B_i)[int(d (1 - r))] is then a lookup instead of a selection
    per candidate (the selection was most of a candidate's merge time);
    the value is the same element, so the floats do not change. Only ranks between
    the cuts of the highest and lowest ratio are kept (int(d (1 - r)) is monotone in r).
    """
    d = score.shape[1]
    first, last = kernel.cut_index(d, ratios[1]), kernel.cut_index(d, ratios[0])
    last = min(last, d - 1)
    ranked = score.sort(dim=1).values
    return {
        "cuts": ranked[:, first : last + 1].clone(),
        "cut_first": torch.tensor([first], dtype=torch.int64),
        "top": ranked[:, -1].clone(),
    }


def prepare(base: torch.Tensor, experts: list[torch.Tensor], clamp_ratio: float):
    """Steps 1-8 exactly as ``PCBMerge.merge_group`` runs them (same functions, same floats)."""
    vectors = kernel.task_vectors(base, experts)
    flat = vectors.base.to(vectors.tau.dtype, copy=True)  # cached in the compute dtype
    if not vectors.changed:
        return flat, None, None
    clipped, score = kernel.scores(vectors.tau, clamp_ratio=clamp_ratio)
    return flat, clipped, score


def build(
    planned: list[PlannedTensor],
    groups: list[int],
    cfg,
    *,
    cache_dir: Path | None,
    memory_bytes: float,
    force_disk: bool = False,
    progress: Callable[[int], None] | None = None,
) -> TensorCache:
    """Read every input tensor once and cache T~/B; disk when over budget or forced."""
    from safetensors.torch import save_file

    ratio_span = searched_ratios(cfg)
    key = fingerprint(cfg, groups)
    if cache_dir is not None and (reuse := TensorCache.open(cache_dir, key)) is not None:
        if progress:  # a complete cache of the same inputs (e.g. on --resume): no re-read
            progress(len(planned))
        return reuse
    used = 0.0
    tensors = []
    for i, (p, g) in enumerate(zip(planned, groups, strict=True)):
        base, experts = p.load_inputs()
        missing = [p.rows[j] for j, e in enumerate(experts) if e is None]
        if base is None or missing:
            who = "base model" if base is None else f"model {cfg.models[missing[0]]}"
            raise ValueError(f"evolve: tensor '{p.name}' is missing from {who}")
        for j, e in enumerate(experts):
            bad = int((~torch.isfinite(e)).sum())
            if bad:
                raise ValueError(
                    f"evolve: tensor '{p.name}' of model "
                    f"'{cfg.models[p.rows[j]]}' holds {bad} NaN/Inf value(s)"
                )
        # The kernel's canonical expert order by content only: it does not depend on the
        # searched weights, so one cached order serves all (candidates break ties).
        keys = kernel.content_keys(experts)
        order = kernel.order_by(keys)
        experts = [experts[j] for j in order]
        base_flat, clipped, score = prepare(base, experts, p.clamp_ratio)
        arrays = {"base": base_flat}
        if clipped is not None:
            arrays.update(clipped=clipped, score=score, **cut_table(score, ratio_span))
        entry = CachedTensor(
            p.name,
            g,
            tuple(base.shape),
            tuple(p.rows[j] for j in order),
            clipped is None,
            tuple(keys[j] for j in order),
        )
        size = sum(a.numel() * a.element_size() for a in arrays.values())
        if not force_disk and used + size <= memory_bytes:
            entry.arrays = arrays
            used += size
        else:
            if cache_dir is None:
                raise ValueError(
                    "evolve: the T~/B cache exceeds cache.memory_gb; "
                    "set cache.dir (or pass --cache-dir) to spill it to disk"
                )
            cache_dir.mkdir(parents=True, exist_ok=True)
            entry.file = f"t{i:05d}.safetensors"
            save_file({k: v.contiguous() for k, v in arrays.items()}, str(cache_dir / entry.file))
        tensors.append(entry)
        if progress:
            progress(1)
    cache = TensorCache(tensors, cache_dir)
    if cache_dir is not None and all(t.file for t in tensors):
        cache.write_meta(key)
    return cache
