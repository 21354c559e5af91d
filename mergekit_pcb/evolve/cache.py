"""Step 2 of the search: what it keeps between candidates: a few numbers per row and ratio level.

Steps 1-8 of the spec depend on the inputs and ``clamp_ratio`` only, never on the
searched ``pcb_ratio``, ``lambda`` or weights; of their n x d results a merge
needs only each row's clip bounds, its max score M_i and its cut t_i, which
depends on the ratio. So the search quantises ``pcb_ratio`` to a grid of levels
(:func:`ratio_levels`), takes those statistics once per tensor for every level
(:func:`build`: one streamed pass, :mod:`mergekit_pcb.kernel.known_cuts`), and a
candidate recomputes B and the merge from the inputs in one pass
(:mod:`.candidate`). Memory: O(rows x levels) numbers per tensor, never n x d.

The inputs stay where they are: a candidate maps the very safetensors files that
mergekit reads (:mod:`.inputs`). Inputs that mergekit reaches another way (e.g. a
pickled ``.bin``) are kept as mergekit loaded them: in memory up to a budget,
else as safetensors in the cache directory.

With a cache directory the statistics (and any kept inputs) are written there
with ``cache.json``, so that ``--resume`` and Ray actors (which share only this
small cache) skip the start-up pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_pcb import kernel
from mergekit_pcb.evolve import inputs as inputs_mod
from mergekit_pcb.evolve.inputs import InputRef
from mergekit_pcb.evolve.layout import PlannedTensor
from mergekit_pcb.kernel import known_cuts, runtime
from mergekit_pcb.parameters import PCB_RATIO

META = "cache.json"
STATISTICS = "statistics.safetensors"
KEPT_INPUTS = "inputs"
FORMAT = 4
# pcb_ratio is searched on a grid of this many decimals (plus the range's ends and
# PCB's default): every level's cut is cached, and best.yml carries the level itself.
RATIO_DECIMALS = 3
_STAT_KEYS = ("low", "high", "top", "cuts")


def snap_ratio(value: float, low: float, high: float) -> float:
    """The level of the searched range [low, high] that a candidate's ``value`` uses:
    rounded to RATIO_DECIMALS decimals (a float whose repr is that decimal, so it
    survives best.yml), clipped into the range (whose ends are levels too)."""
    return min(high, max(low, round(value, RATIO_DECIMALS)))


def ratio_levels(search) -> tuple[float, ...]:
    """Every pcb_ratio a candidate can have: what :func:`snap_ratio` makes of the
    searched range, and PCB's default (scored as the baseline), ascending."""
    low, high = search.range("pcb_ratio")
    step = 10**RATIO_DECIMALS
    first, last = math.floor(low * step), math.ceil(high * step)
    grid = {snap_ratio(k / step, low, high) for k in range(first, last + 1)}
    return tuple(sorted(grid | {low, high, PCB_RATIO.default}))


def searched_ratios(search) -> tuple[float, float]:
    """The pcb_ratio interval any candidate can use: the searched range and the default
    (always scored, as the baseline)."""
    low, high = search.range("pcb_ratio")
    return min(low, PCB_RATIO.default), max(high, PCB_RATIO.default)


@dataclass
class CachedTensor:
    name: str
    group: int
    shape: tuple[int, ...]
    rows: tuple[int, ...]  # inputs.models index of each row, in the canonical content order
    unchanged: bool  # no expert changed it: the output is the base (as in the method)
    keys: tuple[tuple[float, float], ...] = ()  # content key of each row (sum, norm)
    clamp_ratio: float = 0.0
    # Rows tying on their content keys differ: a candidate whose weights reorder them
    # is merged in full (the cached statistics follow the content order).
    distinct_ties: bool = False
    sources: tuple[InputRef, ...] | None = None  # base, then each row; None: kept
    file: str | None = None  # kept inputs, on disk (under KEPT_INPUTS)
    arrays: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # kept inputs
    statistics: known_cuts.Statistics | None = field(default=None, repr=False)

    def meta(self) -> dict:
        return {
            "name": self.name,
            "group": self.group,
            "shape": list(self.shape),
            "rows": list(self.rows),
            "unchanged": self.unchanged,
            "keys": [list(k) for k in self.keys],
            "clamp_ratio": self.clamp_ratio,
            "distinct_ties": self.distinct_ties,
            "flavour": self.statistics.flavour,
            "sources": None if self.sources is None else [s.to_json() for s in self.sources],
            "file": self.file,
        }


@dataclass
class TensorCache:
    tensors: list[CachedTensor]
    root: Path | None  # directory of the on-disk part, if any
    levels: tuple[float, ...] = ()
    device: str = "cpu"  # where the statistics were taken (and candidates merge)
    _level_index: dict[float, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._level_index = {level: j for j, level in enumerate(self.levels)}

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def groups(self) -> list[int]:
        return [t.group for t in self.tensors]

    def level(self, ratio: float) -> int | None:
        """The column of ``ratio``'s cut in every tensor's statistics; None if no level."""
        return self._level_index.get(ratio)

    def refs(self, tensor: CachedTensor) -> list[InputRef] | None:
        """Where the base and each row live on disk (None: held in memory)."""
        if tensor.sources is not None:
            return list(tensor.sources)
        if tensor.file is not None:
            path = str(self.root / KEPT_INPUTS / tensor.file)
            dtype = inputs_mod.open_file(path).dtype("base")
            return [
                InputRef(path, key, inputs_mod.dtype_name(dtype))
                for key in ("base", *map(str, range(len(tensor.rows))))
            ]
        return None

    @contextmanager
    def inputs(self, tensor: CachedTensor) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        """(base, experts in row order), flat, as the merge receives them; their pages
        leave this process afterwards."""
        refs = self.refs(tensor)
        if refs is None:
            arrays = tensor.arrays
            yield arrays["base"], [arrays[str(j)] for j in range(len(tensor.rows))]
            return
        loaded = [inputs_mod.load(ref).reshape(-1) for ref in refs]
        try:
            yield loaded[0], loaded[1:]
        finally:
            del loaded
            for ref in refs:
                inputs_mod.release(ref)

    def write_meta(self, fingerprint: str) -> None:
        from safetensors.torch import save_file

        arrays = {}
        for i, t in enumerate(self.tensors):
            if t.statistics.changed:
                for key in _STAT_KEYS:
                    arrays[f"{i}.{key}"] = getattr(t.statistics, key).contiguous()
        save_file(arrays, str(self.root / STATISTICS))
        data = {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "levels": list(self.levels),
            "device": self.device,
            "tensors": [t.meta() for t in self.tensors],
        }
        (self.root / META).write_text(json.dumps(data))

    @classmethod
    def open(cls, root: os.PathLike, fingerprint: str) -> TensorCache | None:
        """A complete on-disk cache for ``fingerprint``, or None."""
        from safetensors.torch import load_file

        root = Path(root)
        try:
            data = json.loads((root / META).read_text())
        except (OSError, ValueError):
            return None
        if data.get("format") != FORMAT or data.get("fingerprint") != fingerprint:
            return None
        try:
            arrays = load_file(str(root / STATISTICS))
        except (OSError, ValueError):
            return None
        tensors = []
        for i, t in enumerate(data["tensors"]):
            changed = not t["unchanged"]
            stats = known_cuts.Statistics(
                t["flavour"],
                changed,
                **({key: arrays[f"{i}.{key}"] for key in _STAT_KEYS} if changed else {}),
            )
            sources = t["sources"]
            tensors.append(
                CachedTensor(
                    t["name"],
                    t["group"],
                    tuple(t["shape"]),
                    tuple(t["rows"]),
                    t["unchanged"],
                    tuple(tuple(k) for k in t["keys"]),
                    t["clamp_ratio"],
                    t["distinct_ties"],
                    None if sources is None else tuple(InputRef.from_json(s) for s in sources),
                    t["file"],
                    statistics=stats,
                )
            )
        kept = [t.file for t in tensors if t.sources is None]
        if None in kept or any(not (root / KEPT_INPUTS / f).is_file() for f in kept):
            return None
        return cls(tensors, root, tuple(data["levels"]), data["device"])


def _stat(path: str) -> list:
    """Sizes and mtimes of a local model's files, so edited inputs invalidate the cache."""
    p = Path(path)
    if not p.is_dir():
        return [path]
    return sorted(
        [f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in p.iterdir() if f.is_file()
    )


def _device(inputs) -> str:
    """Where statistics are taken and candidates merge: the GPU for a CUDA device."""
    return "cuda" if torch.device(inputs.device).type == "cuda" else "cpu"


def fingerprint(inputs, levels: tuple[float, ...], groups: list[int]) -> str:
    """What the statistics depend on (``inputs``: a :class:`.config.MergeInputs`)."""
    data = {
        "format": FORMAT,
        "base": [inputs.base_model, _stat(inputs.base_model)],
        "models": [[m, _stat(m)] for m in inputs.models],
        "dtype": inputs.dtype,
        "clamp_ratio": inputs.clamp_ratio,
        "groups": groups,
        "levels": list(levels),
        "device": _device(inputs),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def _non_finite(p: PlannedTensor, inputs, base, experts, error) -> ValueError:
    """The error for a task vector that is not finite, naming the input at fault."""
    named = [("base model", inputs.base_model, base)]
    named += [("model", inputs.models[row], e) for row, e in zip(p.rows, experts, strict=True)]
    for role, model, tensor in named:
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            return ValueError(
                f"evolve: tensor '{p.name}' of {role} '{model}' holds {bad} NaN/Inf value(s)"
            )
    return ValueError(
        f"evolve: tensor '{p.name}': a task vector overflows {error.dtype} (model minus "
        f"base_model exceeds its range); allowed: differences representable in {error.dtype} "
        "(set dtype: float64)"
    )


def _distinct_ties(keys: list, experts: list[torch.Tensor]) -> bool:
    """Whether rows with equal content keys differ (their order would matter)."""
    first: dict = {}
    for key, tensor in zip(keys, experts, strict=True):
        if key in first and not torch.equal(first[key], tensor):
            return True
        first.setdefault(key, tensor)
    return False


def _remove_stale(root: Path) -> None:
    """Deletes the files of a cache in ``root`` that does not serve this search (other
    inputs or settings, or an older format: one of T~ and B per tensor, n x d floats each)."""
    try:
        data = json.loads((root / META).read_text())
    except (OSError, ValueError):
        return
    for t in data.get("tensors", []):
        name = t.get("file")
        if isinstance(name, str) and Path(name).name == name:
            (root / name).unlink(missing_ok=True)
            (root / KEPT_INPUTS / name).unlink(missing_ok=True)
    (root / META).unlink(missing_ok=True)
    (root / STATISTICS).unlink(missing_ok=True)


def build(
    planned: list[PlannedTensor],
    groups: list[int],
    inputs,
    levels: tuple[float, ...],
    *,
    cache_dir: Path | None,
    memory_bytes: float,
    force_disk: bool = False,
    progress: Callable[[int], None] | None = None,
) -> TensorCache:
    """Read every input tensor once and take its statistics at every ratio level.

    Inputs that :func:`.inputs.resolve` cannot map are kept (memory up to
    ``memory_bytes``, else ``cache_dir``; always ``cache_dir`` with ``force_disk``).
    With a ``cache_dir`` the cache is written there, and reused when complete.
    """
    from safetensors.torch import save_file

    key = fingerprint(inputs, levels, groups)
    if cache_dir is not None and (reuse := TensorCache.open(cache_dir, key)) is not None:
        if progress:  # a complete cache of the same inputs (e.g. on --resume): no re-read
            progress(len(planned))
        return reuse
    if cache_dir is not None:
        _remove_stale(cache_dir)
    device = _device(inputs)
    # On the very GPU the candidates will use (cuda:1 ...): the merge's floats are that device's.
    compute_on = torch.device(inputs.device) if device == "cuda" else torch.device("cpu")
    used = 0.0
    tensors = []
    for i, (p, g) in enumerate(zip(planned, groups, strict=True)):
        refs = inputs_mod.resolve(p)
        if refs is not None:
            loaded = [inputs_mod.load(ref) for ref in refs]
            base, experts = loaded[0], loaded[1:]
        else:
            base, experts = p.load_inputs()
        missing = [p.rows[j] for j, e in enumerate(experts) if e is None]
        if base is None or missing:
            who = "base model" if base is None else f"model {inputs.models[missing[0]]}"
            raise ValueError(f"evolve: tensor '{p.name}' is missing from {who}")
        # The kernel's canonical expert order by content only: it does not depend on the
        # searched weights, so one cached order serves all (candidates break ties).
        keys = kernel.content_keys(experts)
        order = kernel.order_by(keys)
        ordered = [experts[j] for j in order]
        d = base.numel()
        on_device = [t.to(compute_on) for t in (base, *ordered)]
        try:
            stats = known_cuts.statistics(
                on_device[0],
                on_device[1:],
                p.clamp_ratio,
                [kernel.cut_index(d, r) for r in levels],
            )
        except kernel.NonFiniteTaskVector as error:
            raise _non_finite(p, inputs, base, experts, error) from None
        del on_device
        entry = CachedTensor(
            p.name,
            g,
            tuple(base.shape),
            tuple(p.rows[j] for j in order),
            not stats.changed,
            tuple(keys[j] for j in order),
            p.clamp_ratio,
            _distinct_ties([keys[j] for j in order], ordered),
            statistics=stats,
        )
        if refs is not None:
            entry.sources = (refs[0], *(refs[1 + j] for j in order))
            del loaded, base, experts, ordered
            for ref in refs:
                inputs_mod.release(ref)
        else:
            kept = {"base": base.reshape(-1).contiguous()}
            kept.update({str(k): e.reshape(-1).contiguous() for k, e in enumerate(ordered)})
            size = sum(a.numel() * a.element_size() for a in kept.values())
            if not force_disk and used + size <= memory_bytes:
                entry.arrays = kept
                used += size
            else:
                if cache_dir is None:
                    raise ValueError(
                        f"evolve: the inputs of tensor '{p.name}' are not in safetensors files "
                        "and exceed cache.memory_gb; set cache.dir (or pass --cache-dir) to "
                        "keep them on disk"
                    )
                (cache_dir / KEPT_INPUTS).mkdir(parents=True, exist_ok=True)
                entry.file = f"t{i:05d}.safetensors"
                save_file(kept, str(cache_dir / KEPT_INPUTS / entry.file))
        tensors.append(entry)
        if progress:
            progress(1)
    runtime.release(runtime.Role.STORED_SCORES)  # up to 512 MiB the candidates do not use
    cache = TensorCache(tensors, cache_dir, levels, device)
    if cache_dir is not None and all(t.arrays is None for t in tensors):
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache.write_meta(key)
    return cache
