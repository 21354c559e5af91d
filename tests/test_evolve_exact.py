"""The search scores exactly the model that ``mergekit-yaml best.yml`` writes.

The cached statistics plus each candidate's one pass over its inputs must give,
tensor by tensor, the floats of a real ``mergekit-yaml`` run (in a subprocess) on
the config the search writes, including per-layer-group ratios expressed as
mergekit filters, on the streamed path and the stored one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import check, load_tensors, run_tool
from evolve_support import loss_search_config, planned_cache

from mergekit_pcb.evolve import cache as cache_mod
from mergekit_pcb.evolve import layout as layout_mod
from mergekit_pcb.evolve.candidate import ModelWriter
from mergekit_pcb.evolve.config import EvolveConfig
from mergekit_pcb.evolve.evaluator import load_model


def _cfg(family, tmp_path, **kw) -> EvolveConfig:
    return loss_search_config(family, tmp_path, **{**{"parameters": {"clamp_ratio": 0.01}}, **kw})


def _search_state(cfg, values, *, cache_dir=None, force_disk=False):
    layout, _, groups, cache = planned_cache(
        cfg, cache_dir=cache_dir, memory_bytes=1e12, force_disk=force_disk
    )
    model, _ = load_model(cfg.inputs, tasks=cfg.evaluation.tasks)
    writer = ModelWriter(model, cache)
    writer.write(values)
    return layout, groups, cache, writer.state()


def _mergekit(cfg, values, layout, tmp_path) -> dict:
    import yaml

    best = tmp_path / "best.yml"
    best.write_text(yaml.safe_dump(layout_mod.merge_config(cfg.inputs, values, layout)))
    out = tmp_path / "merged"
    check(run_tool("mergekit-yaml", best, out, "--no-copy-tokenizer"))
    return load_tensors(out)


@pytest.mark.parametrize(
    "dtype,groups,disk,clamp,lam",
    [
        ("float32", 2, False, 0.01, 1.37),
        ("bfloat16", 1, True, 0.01, 1.37),
        ("bfloat16", 1, False, 0.0, 1.37),
        ("float32", 2, False, 0.01, "auto"),
        ("bfloat16", 1, False, 0.0, "auto"),
    ],
)
def test_candidate_equals_mergekit_yaml(family, tmp_path, dtype, groups, disk, clamp, lam):
    """clamp_ratio 0.01 takes the stored path on these tensors, 0.0 the streamed one;
    ``lambda: auto`` (search.lambda: auto) chooses the same scales in both."""
    cfg = _cfg(
        family,
        tmp_path,
        dtype=dtype,
        search={"layer_groups": groups},
        parameters={"clamp_ratio": clamp},
    )
    ratios = (0.3, 0.07)[:groups]
    values = layout_mod.Values(ratios, lam, (0.9, 1.2, 0.6))
    layout, group_of, cache, state = _search_state(
        cfg, values, cache_dir=tmp_path / "cache", force_disk=disk
    )
    flavours = {t.statistics.flavour for t in cache.tensors if not t.unchanged}
    assert flavours == ({"streamed"} if clamp == 0.0 else {"stored"})
    if disk:  # the statistics on disk, and the inputs read where they are
        reopened = cache_mod.TensorCache.open(
            tmp_path / "cache",
            cache_mod.fingerprint(cfg.inputs, cache_mod.ratio_levels(cfg.search), group_of),
        )
        assert reopened is not None and reopened.names == cache.names
        assert all(t.sources is not None for t in reopened.tensors)
    merged = _mergekit(cfg, values, layout, tmp_path)
    base = load_tensors(family.base)
    assert set(state) <= set(merged)
    changed = 0
    for name, tensor in state.items():
        expected = merged[name]
        assert tensor.dtype == expected.dtype, name
        diff = (tensor.float() - expected.float()).abs().max()
        assert torch.equal(tensor, expected), f"{name}: max diff {diff}"
        changed += not torch.equal(expected, base[name].to(expected.dtype))
    assert changed > len(state) // 2  # the merge really moved the weights
    if groups > 1:
        # 3 layers in 2 groups: layers 0-1 and embeddings group 0; layer 2, norm, lm_head group 1.
        by_name = dict(zip(cache.names, group_of, strict=True))
        assert by_name["model.embed_tokens.weight"] == 0
        assert by_name["model.layers.1.mlp.up_proj.weight"] == 0
        assert by_name["model.layers.2.mlp.up_proj.weight"] == 1
        assert by_name["lm_head.weight"] == 1 and by_name["model.norm.weight"] == 1


def test_layer_ratios_change_only_their_group(family, tmp_path):
    """Changing group 1's ratio moves exactly the tensors of group 1."""
    cfg = _cfg(family, tmp_path, search={"layer_groups": 2})
    _, _, groups, cache = planned_cache(cfg, memory_bytes=1e12)
    model, _ = load_model(cfg.inputs, tasks=cfg.evaluation.tasks)
    writer = ModelWriter(model, cache)
    writer.write(layout_mod.Values((0.2, 0.2), 1.0, (1.0, 1.0, 1.0)))
    a = writer.state()
    writer.write(layout_mod.Values((0.2, 0.6), 1.0, (1.0, 1.0, 1.0)))
    b = writer.state()
    for name, g in zip(cache.names, groups, strict=True):
        same = torch.equal(a[name], b[name])
        if g == 0:
            assert same, name
        elif name.endswith("layernorm.weight") or name == "model.norm.weight":
            continue  # norms may be unchanged by the experts' sparse noise only rarely
        else:
            assert not same, name


def test_best_yml_resolves_to_used_values(family, tmp_path):
    """mergekit's planner resolves the written filters to exactly the searched values."""
    cfg = _cfg(family, tmp_path, search={"layer_groups": 3})
    layout = layout_mod.build_layout(cfg.inputs, cfg.search.layer_groups)
    planned, groups = layout_mod.tensor_groups(cfg.inputs, layout)
    values = layout_mod.Values((0.11, 0.37, 0.93), 0.77, (1.3, 0.5, 0.8))
    merge = layout_mod.merge_config(cfg.inputs, values, layout)
    layout_mod.check_reproduces(cfg.inputs, merge, values, groups, [p.name for p in planned])
    wrong = layout_mod.Values((0.11, 0.37, 0.94), 0.77, (1.3, 0.5, 0.8))
    with pytest.raises(RuntimeError, match="pcb_ratio"):
        layout_mod.check_reproduces(cfg.inputs, merge, wrong, groups)


def test_cache_inputs_and_storage_do_not_change_the_merge(family, bin_family, tmp_path):
    """Pickled .bin inputs (kept by the cache, split between memory and disk) give the
    floats of memory-mapped safetensors inputs."""
    values = layout_mod.Values((0.25,), 0.8, (1.1, 0.7, 1.3))
    cfg = _cfg(family, tmp_path)
    *_, in_memory = _search_state(cfg, values)

    bin_cfg = _cfg(bin_family, tmp_path)
    layout = layout_mod.build_layout(bin_cfg.inputs, bin_cfg.search.layer_groups)
    planned, groups = layout_mod.tensor_groups(bin_cfg.inputs, layout)
    budget = 4 * 4 * sum(p.numel() for p in load_tensors(family.base).values()) / 3  # ~ a third
    mixed = cache_mod.build(
        planned,
        groups,
        bin_cfg.inputs,
        cache_mod.ratio_levels(bin_cfg.search),
        cache_dir=tmp_path / "spill",
        memory_bytes=budget,
    )
    assert all(t.sources is None for t in mixed.tensors)  # nothing to memory-map
    on_disk = [t.file is not None for t in mixed.tensors]
    assert any(on_disk) and not all(on_disk)
    model, _ = load_model(bin_cfg.inputs, tasks=bin_cfg.evaluation.tasks)
    writer = ModelWriter(model, mixed)
    writer.write(values)
    from_bin = writer.state()
    assert from_bin.keys() == in_memory.keys()
    assert all(torch.equal(in_memory[n], t) for n, t in from_bin.items())


def test_start_lambda_auto_is_the_median_of_autos_scales(family, tmp_path):
    """optimizer.start.lambda: auto starts the searched lambda at the median of the
    per-tensor scales, each checked against the float64 reference."""
    import statistics

    from reference import reference_auto_scale, reference_task_vector

    from mergekit_pcb.evolve import auto_start
    from mergekit_pcb.evolve.search import start_values

    cfg = _cfg(family, tmp_path, optimizer={"start": {"lambda": "auto", "pcb_ratio": 0.3}})
    layout, _, groups, cache = planned_cache(cfg, memory_bytes=1e12)
    default = layout_mod.default_values(cfg.inputs, layout.groups)
    opt = auto_start.resolve(cfg.optimizer, cfg.search, cache, start_values(cfg.optimizer, default))
    base = load_tensors(family.base)
    experts = [load_tensors(e) for e in family.experts]
    expected = []
    for name in cache.names:
        tau = torch.stack([(e[name].double() - base[name].double()).flatten() for e in experts])
        if tau.abs().max() == 0:
            continue
        m = reference_task_vector(tau, [1.0] * 3, 0.3, 0.01)
        expected.append(reference_auto_scale(m, tau, [1.0] * 3))
    assert opt.start.lambda_ == pytest.approx(statistics.median(expected), rel=1e-5)
    assert opt.start.pcb_ratio == 0.3 and cfg.optimizer.start.lambda_ == "auto"
