"""mergekit-evolve's genome accepts ``merge_method: pcb`` and its configs merge with pcb."""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import check, load_tensors, run_python, run_tool

SCRIPT = textwrap.dedent("""
    import json, sys
    import mergekit.evo.genome as genome_mod   # imported before the registry, as in mergekit-evolve
    import mergekit.merge                      # the registry import fires the .pth hook
    import torch
    from mergekit.evo.genome import ModelGenome, ModelGenomeDefinition, METHOD_PARAM_MAPS
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    args = json.loads(sys.argv[1])
    definition = ModelGenomeDefinition.model_validate({
        "models": args["experts"], "base_model": args["base"], "merge_method": "pcb",
    })
    genome = ModelGenome(definition)
    x0 = genome.initial_genotype()
    x = x0.clone()
    x[0, :, 0, 0] = torch.tensor([0.7, 1.1, 0.4])
    x[0, :, 0, 1] = -0.3                      # a negative ratio gene maps to 0.3
    config = genome.genotype_merge_config(x)
    dumped = config.model_dump(mode="json", exclude_none=True)  # the planner edits config
    run_merge(config, args["out"], MergeOptions(quiet=True, copy_tokenizer=False))
    zero = x.clone(); zero[..., 1] = 0.0
    ratios = {genome.genotype_merge_config(zero).slices[0].parameters["pcb_ratio"]}
    print(json.dumps({
        "maps": METHOD_PARAM_MAPS["pcb"], "x0_ratio": x0[..., 1].unique().tolist(),
        "config": dumped, "zero_ratios": sorted(ratios),
    }))
""")


def test_genome_config_merges_with_pcb(family, tmp_path):
    args = {
        "experts": [str(p) for p in family.experts],
        "base": str(family.base),
        "out": str(tmp_path / "genome"),
    }
    result = check(run_python(SCRIPT.replace("sys.argv[1]", repr(json.dumps(args)))))
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["maps"] == ["weight", "pcb_ratio"]
    assert info["x0_ratio"] == [pytest.approx(0.1)]  # PCB's default, not density's 1.0
    assert info["zero_ratios"] == [pytest.approx(0.001)]  # 0 is outside (0, 1]; mapped to the floor
    config = info["config"]
    assert config["merge_method"] == "pcb"
    assert config.get("parameters", {}) == {}  # the genome's normalize/int8_mask: dropped
    sources = config["slices"][0]["sources"]
    assert [s["parameters"]["weight"] for s in sources[:3]] == [
        0.699999988079071,
        1.100000023841858,
        0.4000000059604645,
    ]
    # pcb_ratio is shared: written per slice (mergekit ignores shared values set per model).
    assert all("pcb_ratio" not in s.get("parameters", {}) for s in sources)
    assert config["slices"][0]["parameters"]["pcb_ratio"] == 0.30000001192092896

    # The same values as a hand-written pcb config give the same model, bit for bit.
    plain = tmp_path / "plain.yml"
    weights = [s["parameters"]["weight"] for s in sources[:3]]
    models = "\n".join(
        f"  - model: {m}\n    parameters: {{weight: {w}}}"
        for m, w in zip(args["experts"], weights, strict=True)
    )
    plain.write_text(
        f"merge_method: pcb\nbase_model: {family.base}\nmodels:\n{models}\n"
        f"parameters: {{pcb_ratio: 0.30000001192092896}}\ndtype: bfloat16\n"
    )
    check(run_tool("mergekit-yaml", plain, tmp_path / "plain", "--no-copy-tokenizer"))
    genome_out, plain_out = load_tensors(tmp_path / "genome"), load_tensors(tmp_path / "plain")
    base = load_tensors(family.base)
    assert genome_out.keys() == plain_out.keys()
    moved = 0
    bad = [n for n, t in plain_out.items() if not t.equal(genome_out[n])]
    assert not bad, bad
    for name, tensor in plain_out.items():
        moved += not tensor.equal(base[name].to(tensor.dtype))
    assert moved > len(plain_out) // 2
