"""The search's small cache: ratio levels, inputs read where they lie, candidates on a device.

What each test pins down: every pcb_ratio a candidate can have is a cached level
that survives best.yml; the memory-mapped inputs are the very tensors mergekit
hands to the merge; a candidate merged with a known cut equals the merge that
selects its own cut; the cache holds O(rows x levels) numbers; and the GPU's
input handling (resident within a budget, the rest staged) gives the same model.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from evolve_support import loss_search_config, planned_cache
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_pcb.evolve import cache as cache_mod
from mergekit_pcb.evolve import inputs as inputs_mod
from mergekit_pcb.evolve import layout as layout_mod
from mergekit_pcb.evolve.candidate import DeviceInputs, Genome, ModelWriter, plan_residency
from mergekit_pcb.evolve.config import EvolveConfig
from mergekit_pcb.evolve.evaluator import load_model
from mergekit_pcb.parameters import PCB_RATIO


def _cfg(family, tmp_path, **kw) -> EvolveConfig:
    return loss_search_config(
        family, tmp_path, **{**{"parameters": {"clamp_ratio": 0.0}, "dtype": "bfloat16"}, **kw}
    )


def _search_cfg(pcb_ratio) -> EvolveConfig:
    return EvolveConfig.model_validate(
        {
            "base_model": "b",
            "models": ["a"],
            "search": {"pcb_ratio": pcb_ratio, "lambda": [0.5, 2.0], "weight": 1.0},
            "evaluation": {"tasks": [{"name": "t", "type": "python", "function": "m:f"}]},
        }
    )


@settings(max_examples=60, deadline=None)
@given(
    low=st.floats(1e-4, 1.0),
    width=st.floats(0.0, 1.0),
    u=st.floats(0.0, 1.0),
)
def test_every_candidate_ratio_is_a_level_that_survives_yaml(low, width, u):
    high = min(1.0, low + width)
    cfg = _search_cfg([low, high])
    levels = cache_mod.ratio_levels(cfg.search)
    assert list(levels) == sorted(set(levels))
    assert {low, high, PCB_RATIO.default} <= set(levels)
    assert all(low <= r <= high for r in levels if r != PCB_RATIO.default)
    genome = Genome.of(cfg.search, len(cfg.models), 1)
    if low < high:
        (ratio,) = genome.decode([u] * genome.dimension).pcb_ratio
        assert ratio in levels
        assert yaml.safe_load(yaml.safe_dump({"r": ratio}))["r"] == ratio
        assert abs(ratio - (low + u * (high - low))) <= 0.0005 + 1e-12


def test_levels_of_the_default_range():
    levels = cache_mod.ratio_levels(_search_cfg([0.02, 0.5]).search)
    assert len(levels) == 481 and levels[0] == 0.02 and levels[-1] == 0.5
    assert 0.1 in levels and 0.137 in levels
    fixed = cache_mod.ratio_levels(_search_cfg(0.3).search)
    assert fixed == (PCB_RATIO.default, 0.3)


def _planned(cfg):
    layout = layout_mod.build_layout(cfg.inputs, cfg.search.layer_groups)
    return layout, *layout_mod.tensor_groups(cfg.inputs, layout)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
def test_mapped_inputs_are_what_mergekit_hands_over(family, tmp_path, dtype):
    """float32 files: as stored, or cast by mergekit to the merge's dtype."""
    _, planned, _ = _planned(_cfg(family, tmp_path, dtype=dtype))
    for p in planned:
        refs = inputs_mod.resolve(p)
        assert refs is not None, p.name
        base, experts = p.load_inputs()
        mapped = [inputs_mod.load(ref) for ref in refs]
        for got, want in zip(mapped, [base, *experts], strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want), p.name


def test_pickled_inputs_do_not_resolve(bin_family, tmp_path):
    _, planned, _ = _planned(_cfg(bin_family, tmp_path))
    assert all(inputs_mod.resolve(p) is None for p in planned)


@pytest.fixture
def built(family, tmp_path):
    cfg = _cfg(family, tmp_path)
    _, _, _, cache = planned_cache(cfg)
    model, _ = load_model(cfg.inputs, tasks=cfg.evaluation.tasks)
    return cfg, cache, model


def test_cache_holds_rows_times_levels_numbers(built):
    _, cache, _ = built
    levels = len(cache.levels)
    for t in cache.tensors:
        assert t.arrays is None and t.sources is not None  # nothing of the inputs is held
        if t.unchanged:
            continue
        n = len(t.rows)
        stats = t.statistics
        assert stats.cuts.shape == (n, levels)
        assert sum(x.numel() for x in (stats.low, stats.high, stats.top)) == 3 * n


def test_known_cut_equals_the_selected_cut(built):
    """The same candidate with its ratio's level hidden from the cache: every tensor is
    then merged by the kernel's own merge (which selects the cut), with equal floats."""
    _, cache, model = built
    values = layout_mod.Values((0.137,), 1.2, (1.1, 0.7, 1.3))
    writer = ModelWriter(model, cache)
    writer.write(values)
    known = writer.state()
    del cache._level_index[0.137]
    writer.write(values)
    for name, tensor in writer.state().items():
        assert torch.equal(tensor.view(torch.int16), known[name].view(torch.int16)), name
    assert any(not t.unchanged for t in cache.tensors)


def test_residency_fills_the_budget_in_order():
    assert plan_residency([4, 4, 4], 8) == [True, True, False]
    assert plan_residency([10, 3, 6, 2], 9) == [False, True, True, False]
    assert plan_residency([], 5) == []
    assert plan_residency([1, 1], 0) == [False, False]


def test_device_inputs_resident_and_staged_give_the_same_model(built):
    """DeviceInputs on CPU tensors (no pinned memory without CUDA): half the tensors
    resident, the rest staged through the one reused buffer, as on a GPU."""
    _, cache, model = built
    values = layout_mod.Values((0.3,), 0.9, (0.8, 1.2, 1.0))
    writer = ModelWriter(model, cache)
    writer.write(values)
    host = writer.state()
    # bf16 inputs: 2 bytes for the base and each row.
    total = sum(2 * (1 + len(t.rows)) * torch.Size(t.shape).numel() for t in cache.tensors)
    device_inputs = DeviceInputs(cache, torch.device("cpu"), total / 2, pin=False)
    assert any(device_inputs.resident_flags) and not all(device_inputs.resident_flags)
    for tensor in cache.tensors:
        with device_inputs.inputs(tensor) as (base, experts), cache.inputs(tensor) as (b, e):
            assert all(torch.equal(x, y) for x, y in zip((base, *experts), (b, *e), strict=True))
    writer.source = device_inputs
    for parameter in model.parameters():
        parameter.data.zero_()
    writer.write(values)
    assert all(torch.equal(host[n], t) for n, t in writer.state().items())


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_memory_gb", [0.0, None])  # every tensor staged; all resident
def test_cuda_search_equals_mergekit_yaml_cuda(family, tmp_path, gpu_memory_gb):
    """device: cuda: statistics and candidates on the GPU give what ``mergekit-yaml --cuda
    best.yml`` writes (values; see kernel.known_cuts on the sign of a zero)."""
    from conftest import check, load_tensors, run_tool

    cfg = _cfg(family, tmp_path, device="cuda")
    layout, _, _, cache = planned_cache(cfg)
    assert cache.device == "cuda"
    model, _ = load_model(cfg.inputs, tasks=cfg.evaluation.tasks)
    writer = ModelWriter(model, cache, gpu_memory_gb)
    values = layout_mod.Values((0.137,), 1.2, (1.1, 0.7, 1.3))
    writer.write(values)
    best = tmp_path / "best.yml"
    best.write_text(yaml.safe_dump(layout_mod.merge_config(cfg.inputs, values, layout)))
    check(run_tool("mergekit-yaml", best, tmp_path / "merged", "--no-copy-tokenizer", "--cuda"))
    merged = load_tensors(tmp_path / "merged")
    for name, tensor in writer.state().items():
        assert torch.equal(tensor.cpu(), merged[name]), name


def test_a_stale_cache_is_removed_and_replaced(family, tmp_path):
    """An older search's cache in the same directory (format 3: T~ and B per tensor) is
    deleted, not left to fill the disk; files it did not list stay."""
    cfg = _cfg(family, tmp_path)
    _, planned, groups = _planned(cfg)
    root = tmp_path / "cache"
    root.mkdir()
    (root / "t00000.safetensors").write_bytes(b"old T~/B")
    (root / "notes.txt").write_text("mine")
    (root / "cache.json").write_text(
        json.dumps({"format": 3, "fingerprint": "x", "tensors": [{"file": "t00000.safetensors"}]})
    )
    cache = cache_mod.build(
        planned,
        groups,
        cfg.inputs,
        cache_mod.ratio_levels(cfg.search),
        cache_dir=root,
        memory_bytes=0,
    )
    assert not (root / "t00000.safetensors").exists() and (root / "notes.txt").exists()
    assert (root / "statistics.safetensors").exists()
    reopened = cache_mod.TensorCache.open(
        root, cache_mod.fingerprint(cfg.inputs, cache_mod.ratio_levels(cfg.search), groups)
    )
    assert reopened is not None and reopened.names == cache.names
    for a, b in zip(cache.tensors, reopened.tensors, strict=True):
        assert a.sources == b.sources and a.rows == b.rows
        if not a.unchanged:
            assert torch.equal(a.statistics.cuts, b.statistics.cuts)
