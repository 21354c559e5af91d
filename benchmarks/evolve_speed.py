"""The search's costs against a full ``mergekit-yaml`` PCB merge of the same models.

Usage::

    python benchmarks/evolve_speed.py --family full -j 2   # 166M-param bf16 Llama, 2 threads
    python benchmarks/evolve_speed.py --quick              # a small model, for a smoke run
    python benchmarks/evolve_speed.py --family 1b --device cuda   # on a GPU machine

The full merge runs as a ``mergekit-yaml`` subprocess (PCB's defaults), the search
as another subprocess of this script (``--inner``): its start-up (planning,
reading every input tensor once, the statistics at every pcb_ratio level),
loading the model it scores, and candidate merges at the searched range's
lowest, highest and default ratio and at random points, written into the loaded
model. Each process's peak RSS is its own ``ru_maxrss`` from ``os.wait4``. The
issue's targets (2-core CPU): start-up <= 1.5x, a candidate <= 0.25x a full
merge for any searched ratio, the search's peak RSS <= 1.5x the merge's.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import build_family, family_options, family_spec
from speed import run_once

SEARCH = {"pcb_ratio": [0.02, 0.5], "lambda": [0.5, 2.0], "weight": [0.8, 1.3]}


def _config(base: str, experts: list[str], data: Path, device: str) -> dict:
    return {
        "base_model": base,
        "models": experts,
        "search": SEARCH,
        "evaluation": {"tasks": [{"name": "t", "type": "loss", "data": str(data)}]},
        "dtype": "bfloat16",
        "device": device,
    }


def search_side(raw: dict, candidates: int, threads: int | None) -> dict:
    """The search's side, in its own process: what it does before and per candidate."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    from mergekit_pcb.evolve import cache as cache_mod
    from mergekit_pcb.evolve import layout as layout_mod
    from mergekit_pcb.evolve.candidate import Genome, ModelWriter
    from mergekit_pcb.evolve.config import EvolveConfig

    def peak() -> int:  # this process's peak RSS so far, in bytes (Linux: KiB)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    cfg = EvolveConfig.model_validate(raw)
    imported = peak()
    start = time.perf_counter()
    layout = layout_mod.build_layout(cfg.inputs, cfg.search.layer_groups)
    planned, groups = layout_mod.tensor_groups(cfg.inputs, layout)
    cache = cache_mod.build(
        planned,
        groups,
        cfg.inputs,
        cache_mod.ratio_levels(cfg.search),
        cache_dir=None,
        memory_bytes=0,
    )
    del planned
    startup = time.perf_counter() - start
    after_startup = peak()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.bfloat16)
    model.to(cfg.device)
    writer = ModelWriter(model, cache, cfg.cache.gpu_memory_gb)
    load = time.perf_counter() - start
    genome = Genome.of(cfg.search, len(cfg.models), layout.groups)
    low, high = cfg.search.range("pcb_ratio")
    fixed = layout_mod.default_values(cfg.inputs, layout.groups)
    points = [
        layout_mod.Values((ratio,) * layout.groups, 1.3, fixed.weights)
        for ratio in (low, high, fixed.pcb_ratio[0])
    ]
    generator = random.Random(0)
    points += [
        genome.decode([generator.random() for _ in range(genome.dimension)])
        for _ in range(max(0, candidates - len(points)))
    ]
    writer.write(points[0])  # first-call costs (numba's cache load) are not a candidate's
    times = []
    for values in points:
        if cfg.device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        writer.write(values)
        if cfg.device != "cpu":
            torch.cuda.synchronize()
        times.append((values.pcb_ratio[0], time.perf_counter() - start))
    return {
        "startup_s": startup,
        "load_s": load,
        "candidates": times,
        "levels": len(cache.levels),
        "rss": {"imports": imported, "startup": after_startup, "end": peak()},
        "params": sum(p.numel() for p in model.parameters()),
    }


def _run_inner(raw: dict, candidates: int, threads: int | None, work: Path):
    """(result, peak RSS bytes) of :func:`search_side` in a fresh process."""
    spec = work / "inner.json"
    spec.write_text(json.dumps({"config": raw, "candidates": candidates, "threads": threads}))
    out = work / "inner-result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--inner", str(spec), str(out)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise click.ClickException(f"the search process failed:\n{stderr[-3000:]}")
    return json.loads(out.read_text()), usage.ru_maxrss * 1024


@click.command()
@family_options
@click.option("--candidates", type=int, default=7, show_default=True, help="Candidates to time.")
@click.option("--threads", "-j", type=int, default=None, help="torch threads of both processes.")
@click.option(
    "--device", default="cpu", show_default=True, help="The search's device (cuda: a GPU)."
)
@click.option("--inner", nargs=2, type=click.Path(path_type=Path), default=None, hidden=True)
def main(
    family: str,
    quick: bool,
    candidates: int,
    threads: int | None,
    device: str,
    cache_dir: Path | None,
    inner: tuple[Path, Path] | None,
) -> None:
    """Start-up, candidate and full-merge times and peak RSS of the search."""
    if inner is not None:
        spec = json.loads(inner[0].read_text())
        result = search_side(spec["config"], spec["candidates"], spec["threads"])
        inner[1].write_text(json.dumps(result))
        return
    spec = family_spec(family, quick)
    name = "quick" if quick else family
    import torch

    # Drawn on a GPU where one exists, as benchmarks/speed.py draws them: the same models.
    base, experts = build_family(
        spec, cache_dir, device="cuda" if torch.cuda.is_available() else "cpu"
    )
    with tempfile.TemporaryDirectory(prefix="evolve-speed-") as tmp:
        work = Path(tmp)
        data = work / "d.jsonl"
        data.write_text(json.dumps({"text": "hello"}) + "\n")
        raw = _config(str(base), [str(e) for e in experts], data, device)
        full_yml = work / "full.yml"
        full_yml.write_text(
            yaml.safe_dump(
                {
                    "merge_method": "pcb",
                    "base_model": str(base),
                    "models": [{"model": str(e)} for e in experts],
                    "dtype": "bfloat16",
                }
            )
        )
        extra = (["--cuda"] if device != "cpu" else []) + (["-j", str(threads)] if threads else [])
        full = run_once(full_yml, work / "merged", extra)
        result, search_rss = _run_inner(raw, candidates, threads, work)
    times = [t for _, t in result["candidates"]]
    slowest_ratio, slowest = max(result["candidates"], key=lambda rt: rt[1])
    median = statistics.median(times)
    merge = full.wall_s
    gib = 2**30
    startup = result["startup_s"]
    rows = [
        (
            "full mergekit-yaml pcb merge",
            f"{merge:.2f} s",
            f"peak RSS {full.peak_rss_bytes / gib:.2f} GiB",
        ),
        ("search start-up (statistics)", f"{startup:.2f} s", f"{startup / merge:.2f} x full merge"),
        ("model load (not a merge)", f"{result['load_s']:.2f} s", ""),
        (f"candidate merge, median of {len(times)}", f"{median:.3f} s", f"{median / merge:.3f} x"),
        (
            f"candidate merge, slowest (r={slowest_ratio})",
            f"{slowest:.3f} s",
            f"{slowest / merge:.3f} x",
        ),
        (
            "search peak RSS",
            f"{search_rss / gib:.2f} GiB",
            f"{search_rss / full.peak_rss_bytes:.2f} x",
        ),
    ]
    click.echo(
        f"family {name}: {result['params'] / 1e6:.1f}M params x {len(experts)} experts, bf16, "
        f"device {device}, threads {threads or 'default'}, {result['levels']} pcb_ratio levels"
    )
    for label, value, note in rows:
        click.echo(f"{label + ':':40s} {value:>12s}   {note}")
    rss = result["rss"]
    click.echo(
        f"search peak RSS, running: {rss['imports'] / gib:.2f} GiB after imports, "
        f"{rss['startup'] / gib:.2f} GiB after the start-up, {rss['end'] / gib:.2f} GiB at the end"
    )


if __name__ == "__main__":
    main()
