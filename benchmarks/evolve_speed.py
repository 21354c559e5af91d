"""Merge time of one search candidate vs a full ``mergekit-yaml`` PCB merge of the same models.

The search pays PCB's steps 1-8 once (the T~/B cache); a candidate then needs only
the cut, the weighted sum and ``base + lambda * m`` written into the loaded model.
This prints the one-off cache time, the per-candidate merge time (median over a
few candidates, with the cut looked up in the sorted-score table and, for
comparison, selected per candidate) and the ratio to a full ``mergekit-yaml``
run (a subprocess, as a user runs it). Target: candidate <= 0.2 x full merge.

    python benchmarks/evolve_speed.py               # 'medium' family (~33M params, bf16)
    python benchmarks/evolve_speed.py --family full # the 166M-param family of speed.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _models import FULL, QUICK, FamilySpec, build_family

MEDIUM = FamilySpec(
    vocab_size=8000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8
)
FAMILIES = {"quick": QUICK, "medium": MEDIUM, "full": FULL}


def _config(base: Path, experts: list[Path], data: Path):
    from mergekit_pcb.evolve.config import EvolveConfig

    return EvolveConfig.model_validate(
        {
            "base_model": str(base),
            "models": [str(e) for e in experts],
            "search": {"pcb_ratio": [0.02, 0.5], "lambda": [0.5, 2.0], "weight": [0.8, 1.3]},
            "evaluation": {"tasks": [{"name": "t", "type": "loss", "data": str(data)}]},
            "dtype": "bfloat16",
            "cache": {"memory_gb": 64},
        }
    )


@click.command()
@click.option("--family", type=click.Choice(sorted(FAMILIES)), default="medium")
@click.option("--candidates", type=int, default=5, help="Candidates to time (median reported).")
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's).")
def main(family: str, candidates: int, threads: int | None) -> None:
    from mergekit_pcb.evolve import cache as cache_mod
    from mergekit_pcb.evolve import layout as layout_mod
    from mergekit_pcb.evolve.candidate import Genome, ModelWriter

    if threads:
        torch.set_num_threads(threads)
    base, experts = build_family(FAMILIES[family])
    work = Path(tempfile.mkdtemp(prefix="evolve-speed-"))
    data = work / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    cfg = _config(base, experts, data)

    # Full mergekit-yaml merge with PCB's defaults.
    yml = work / "full.yml"
    merge = layout_mod.merge_config(
        cfg, layout_mod.default_values(cfg, 1), layout_mod.Layout(1, 1, (), ())
    )
    import yaml

    yml.write_text(yaml.safe_dump(merge))
    start = time.perf_counter()
    subprocess.run(
        [
            str(Path(sys.executable).parent / "mergekit-yaml"),
            str(yml),
            str(work / "merged"),
            "--no-copy-tokenizer",
            "--quiet",
        ],
        check=True,
    )
    full = time.perf_counter() - start

    start = time.perf_counter()
    layout = layout_mod.build_layout(cfg)
    planned, groups = layout_mod.tensor_groups(cfg, layout)
    cache = cache_mod.build(planned, groups, cfg, cache_dir=None, memory_bytes=64e9)
    cache_seconds = time.perf_counter() - start
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)  # no tokenizer here
    writer = ModelWriter(model, cache)
    genome = Genome.from_config(cfg, layout.groups)
    generator = torch.Generator().manual_seed(0)
    points = [
        genome.decode(torch.rand(genome.dimension, generator=generator).tolist())
        for _ in range(candidates)
    ]

    def timed() -> float:
        times = []
        for values in points:
            start = time.perf_counter()
            writer.write(values)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    lookup = timed()
    for t in cache.tensors:  # the same merge with the cut selected per candidate
        if t.arrays is not None:
            for key in ("cuts", "cut_first", "top"):
                t.arrays.pop(key, None)
    select = timed()
    params = sum(p.numel() for p in model.parameters())
    print(
        f"family {family}: {params / 1e6:.1f}M params x {len(experts)} experts, bf16, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"full mergekit-yaml pcb merge:          {full:8.2f} s")
    print(f"one-off T~/B cache (read + steps 1-8): {cache_seconds:8.2f} s")
    print(f"candidate merge, cut from sorted table: {lookup:8.3f} s  ({lookup / full:.3f} x full)")
    print(f"candidate merge, cut by selection:      {select:8.3f} s  ({select / full:.3f} x full)")


if __name__ == "__main__":
    main()
