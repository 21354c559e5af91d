"""What a ``mergekit-yaml`` pcb run on a tiny Llama must write, computed independently.

This re-implements, from mergekit's documented config semantics, which inputs and
which parameter values each output tensor gets (``models:`` as one full-range
slice, ``slices:``/``layer_range``, per-layer gradients with t = layer/(n-1)
inside each slice, filtered lists, precedence source > slice > top level), and
merges them with the float64 reference in ``reference.py``. The end-to-end tests
compare every tensor mergekit wrote against it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from conftest import NUM_LAYERS, assert_close_to_reference, load_tensors
from reference import reference_merge

DEFAULTS = {"pcb_ratio": 0.1, "clamp_ratio": 1e-4, "lambda": 1.0, "weight": 1.0}
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def interpolate(points: list, t: float) -> float:
    """mergekit's gradient: piecewise-linear over equally spaced points, t in [0, 1]."""
    values = [float(v) for v in points]
    if len(values) == 1:
        return values[0]
    position = t * (len(values) - 1)
    left = min(int(position), len(values) - 1)
    right = min(left + 1, len(values) - 1)
    frac = position - left
    return (1 - frac) * values[left] + frac * values[right]


def evaluate(setting: Any, tensor_name: str, t: float) -> float | None:
    if isinstance(setting, dict):  # one {filter, value} entry
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(not isinstance(item, dict) for item in setting):
            return interpolate(setting, t)
        for item in setting:
            pattern = item.get("filter")
            if pattern is None or pattern == "*" or pattern in tensor_name:
                return evaluate(item["value"], tensor_name, t)
        return None
    return setting if setting == "auto" else float(setting)  # lambda: auto


def resolve(name: str, scopes: list[dict | None], tensor_name: str, t: float) -> float:
    for scope in scopes:
        if scope and name in scope:
            value = evaluate(scope[name], tensor_name, t)
            if value is not None:
                return value
    return DEFAULTS[name]


@dataclass
class Source:
    model: str
    layer_range: tuple[int, int]
    parameters: dict | None


@dataclass
class Slice:
    sources: list[Source]
    parameters: dict | None
    base_model: str | None


def normalize(config: dict, num_layers: int) -> list[Slice]:
    """``models:`` becomes one slice over every layer, with the base appended if missing."""
    if config.get("models"):
        sources = [
            Source(m["model"], (0, num_layers), m.get("parameters")) for m in config["models"]
        ]
        if config["base_model"] not in [s.model for s in sources]:
            sources.append(Source(config["base_model"], (0, num_layers), None))
        return [Slice(sources, None, None)]
    return [
        Slice(
            [
                Source(s["model"], tuple(s["layer_range"]), s.get("parameters"))
                for s in item["sources"]
            ],
            item.get("parameters"),
            item.get("base_model"),
        )
        for item in config["slices"]
    ]


Loader = Callable[[str, str], torch.Tensor]  # (model path, tensor name) -> tensor


def merge_one(
    config: dict,
    piece: Slice,
    out_name: str,
    in_name: str,
    t: float,
    load: Loader,
) -> torch.Tensor:
    base_model = piece.base_model or config["base_model"]
    top = config.get("parameters")
    shared = {
        key: resolve(key, [piece.parameters, top], out_name, t)
        for key in ("pcb_ratio", "clamp_ratio", "lambda")
    }
    dtype = getattr(torch, config["dtype"]) if config.get("dtype") else None

    def read(model: str) -> torch.Tensor:
        tensor = load(model, in_name)
        return tensor.to(dtype) if dtype is not None else tensor

    experts = [s for s in piece.sources if s.model != base_model]
    weights = [
        resolve("weight", [s.parameters, piece.parameters, top], in_name, t) for s in experts
    ]
    merged = reference_merge(
        read(base_model),
        [read(s.model) for s in experts],
        weights=weights,
        pcb_ratio=shared["pcb_ratio"],
        clamp_ratio=shared["clamp_ratio"],
        lam=shared["lambda"],
    )
    return merged


def expected_outputs(
    config: dict,
    output_names: list[str],
    load: Loader,
    num_layers: int,
) -> dict[str, torch.Tensor]:
    """Every output tensor, in float64, before mergekit's final cast to the output dtype."""
    slices = normalize(config, num_layers)
    layer_of = {}  # output layer index -> (slice, offset inside it, t)
    index = 0
    for piece in slices:
        start, stop = piece.sources[0].layer_range
        length = stop - start
        for offset in range(length):
            layer_of[index] = (piece, offset, offset / (length - 1) if length > 1 else 1.0)
            index += 1
    results = {}
    for name in output_names:
        match = LAYER.match(name)
        if match:
            piece, offset, t = layer_of[int(match.group(1))]
            results[name] = _merge_layer(config, piece, name, match.group(2), offset, t, load)
        else:  # embeddings come from the first slice, norm and lm_head from the last, at t = 0
            piece = slices[0] if "embed_tokens" in name else slices[-1]
            results[name] = merge_one(config, piece, name, name, 0.0, load)
    return results


def _merge_layer(config, piece, out_name, suffix, offset, t, load):
    """Sources of one slice may take different layer ranges: each reads its own layer."""

    def per_source_load(model: str, _name: str) -> torch.Tensor:
        source = next(s for s in piece.sources if s.model == model)
        start = source.layer_range[0]
        return load(model, f"model.layers.{start + offset}.{suffix}")

    in_name = f"model.layers.{piece.sources[0].layer_range[0] + offset}.{suffix}"
    return merge_one(config, piece, out_name, in_name, t, per_source_load)


class Checkpoints:
    """Tensors of input models by path, loaded once each."""

    def __init__(self):
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, model: str, name: str) -> torch.Tensor:
        if model not in self._cache:
            self._cache[model] = load_tensors(Path(model))
        return self._cache[model][name]


def vocabulary(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


class AlignedCheckpoints(Checkpoints):
    """Inputs as mergekit aligns them to the output vocabulary before the method runs.

    A token a model lacks takes the row of the only model that has it (mergekit's
    rule for tokens present in one model, which is the only case these tests build).
    """

    def __init__(self, out_vocab: dict[str, int], models: list[Path]):
        super().__init__()
        self.out_vocab = out_vocab
        self.vocabs = {str(m): vocabulary(m) for m in models}

    def __call__(self, model: str, name: str) -> torch.Tensor:
        tensor = super().__call__(model, name)
        if "embed_tokens" not in name and name != "lm_head.weight":
            return tensor
        rows = []
        for token, _ in sorted(self.out_vocab.items(), key=lambda item: item[1]):
            owners = [model] + [m for m in self.vocabs if m != model]
            donor = next(m for m in owners if token in self.vocabs[m])
            rows.append(super().__call__(donor, name)[self.vocabs[donor][token]])
        return torch.stack(rows)


def compare_all(
    config: str,
    written: dict[str, torch.Tensor],
    load,
    *,
    num_layers: int = NUM_LAYERS,
    out_dtype: torch.dtype = torch.float32,
    rounding: float | None = None,
) -> None:
    parsed = yaml.safe_load(config)
    expected = expected_outputs(parsed, list(written), load, num_layers)
    assert written and set(expected) == set(written)
    for name, tensor in written.items():
        assert tensor.dtype == out_dtype, name
        if rounding is None:
            assert_close_to_reference(tensor, expected[name], name)
        else:  # rounded to a 16-bit dtype: within one unit in its last place
            torch.testing.assert_close(
                tensor.double(),
                expected[name],
                rtol=rounding,
                atol=rounding * 1e-3,
                msg=lambda m, name=name: f"{name}: {m}",
            )
