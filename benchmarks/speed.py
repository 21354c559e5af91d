"""Time ``mergekit-yaml`` with pcb (both scopes), ties and task_arithmetic, side by side.

Usage::

    python benchmarks/speed.py            # ~170M-parameter bf16 Llama, base + 3 experts
    python benchmarks/speed.py --quick    # a small model, for a smoke run
    python benchmarks/speed.py --cuda     # pass --cuda through to mergekit-yaml

Each merge runs as a fresh ``mergekit-yaml`` subprocess; the methods are interleaved
within every repeat so that load from other users of the machine hits them alike.
Peak RSS is the child's own ``ru_maxrss`` from ``os.wait4``, which covers exactly
that process, unlike polling (which can miss short peaks).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import click
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import FULL, QUICK, build_family, parameter_count

METHODS: dict[str, dict] = {
    "pcb": {"merge_method": "pcb", "parameters": {"pcb_ratio": 0.2}},
    "pcb (model scope)": {
        "merge_method": "pcb",
        "parameters": {"pcb_ratio": 0.2, "pcb_scope": "model"},
    },
    "ties": {"merge_method": "ties", "model_parameters": {"weight": 1.0, "density": 0.2}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "model_parameters": {"weight": 1.0}},
}


class Sample(NamedTuple):
    wall_s: float
    peak_rss_bytes: int


def write_config(path: Path, method: str, base: Path, experts: list[Path]) -> Path:
    recipe = METHODS[method]
    models = [
        {
            "model": str(e),
            **({"parameters": recipe["model_parameters"]} if "model_parameters" in recipe else {}),
        }
        for e in experts
    ]
    config = {"merge_method": recipe["merge_method"], "base_model": str(base), "models": models}
    if "parameters" in recipe:
        config["parameters"] = recipe["parameters"]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_once(config: Path, out: Path, extra: list[str]) -> Sample:
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    cmd = [exe, str(config), str(out), "--no-copy-tokenizer", "--quiet", *extra]
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait4 reports this child's own peak RSS (Linux: KiB), not the max over all children.
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return Sample(wall, usage.ru_maxrss * 1024)


def table(results: dict[str, list[Sample]]) -> str:
    med = {
        m: (statistics.median(s.wall_s for s in v), statistics.median(s.peak_rss_bytes for s in v))
        for m, v in results.items()
    }

    def ratio(m: str, ref: str, i: int) -> str:
        return f"{med[m][i] / med[ref][i]:.2f}x" if ref in med else "-"

    lines = [
        "| method | median wall time | peak RSS | time vs ties | time vs task_arithmetic "
        "| RSS vs ties | time vs pcb | RSS vs pcb |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, (wall, rss) in med.items():
        lines.append(
            f"| {m} | {wall:.1f} s | {rss / 2**30:.2f} GiB | {ratio(m, 'ties', 0)} "
            f"| {ratio(m, 'task_arithmetic', 0)} | {ratio(m, 'ties', 1)} "
            f"| {ratio(m, 'pcb', 0)} | {ratio(m, 'pcb', 1)} |"
        )
    return "\n".join(lines)


@click.command()
@click.option("--quick", is_flag=True, help="Small model (smoke run), not the ~170M one.")
@click.option("--repeats", "-r", default=3, show_default=True, help="Runs per method.")
@click.option("--cuda", is_flag=True, help="Pass --cuda to mergekit-yaml.")
@click.option(
    "--threads",
    "-j",
    type=int,
    default=None,
    help="Pass -j N to mergekit-yaml (torch threads). On a machine shared with "
    "other jobs, -j 1 avoids OpenMP oversubscription, which slows every "
    "threaded op 10x and so penalises methods by their op count.",
)
@click.option(
    "--method",
    "-m",
    "methods",
    multiple=True,
    type=click.Choice(list(METHODS)),
    help="Methods to time (default: all).",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the models are built (default $MERGEKIT_PCB_BENCH_CACHE or "
    "~/.cache/mergekit-pcb-bench).",
)
def main(
    quick: bool,
    repeats: int,
    cuda: bool,
    threads: int | None,
    methods: tuple[str, ...],
    cache_dir: Path | None,
) -> None:
    """Median wall time and peak RSS of mergekit-yaml per merge method, as a markdown table."""
    spec = QUICK if quick else FULL
    click.echo(
        f"building/using cached models ({parameter_count(spec) / 1e6:.0f}M params, "
        f"bf16, base + {spec.n_experts} experts)...",
        err=True,
    )
    base, experts = build_family(spec, cache_dir)
    methods = methods or tuple(METHODS)
    extra = (["--cuda"] if cuda else []) + (["-j", str(threads)] if threads else [])
    results: dict[str, list[Sample]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory(prefix="pcb-bench-") as tmp:
        tmp = Path(tmp)
        configs = {
            m: write_config(tmp / f"{i}.yml", m, base, experts) for i, m in enumerate(methods)
        }
        for r in range(repeats):
            for m in methods:
                sample = run_once(configs[m], tmp / "out", extra)
                results[m].append(sample)
                click.echo(
                    f"repeat {r + 1}/{repeats} {m}: {sample.wall_s:.1f} s, "
                    f"{sample.peak_rss_bytes / 2**30:.2f} GiB",
                    err=True,
                )
    click.echo(
        f"\n{parameter_count(spec) / 1e6:.0f}M-parameter Llama, bf16, base + "
        f"{spec.n_experts} experts, median of {repeats}, "
        f"mergekit-yaml --no-copy-tokenizer {' '.join(extra)}\n"
    )
    click.echo(table(results))


if __name__ == "__main__":
    main()
