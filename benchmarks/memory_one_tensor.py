"""Peak memory of one big tensor's merge: pcb, task_arithmetic and ties side by side.

Usage::

    python benchmarks/memory_one_tensor.py                       # 32064 x 8192, 3 repeats
    python benchmarks/memory_one_tensor.py --rows 128256 -m pcb -m task_arithmetic

Why one tensor: at 70B shapes the embedding and LM head (128256 x 8192, 1.05B
elements) bound a merge's memory, and what a method keeps besides its inputs for
that one tensor is what decides whether it fits. Each method merges a bf16 base
and 3 experts of that shape through mergekit's own ``merge_state_dicts`` in a
fresh subprocess. The figure is the rise of the process's peak RSS above what it
held just before the merge (the inputs are already in memory): Linux's VmHWM is
reset through ``/proc/self/clear_refs`` after the inputs are made, so the peak
of making them does not count. The output tensor is part of the rise (every
method makes one). Medians of ``--repeats`` runs, the methods interleaved.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import click

PARAMETERS = {
    "pcb": {"pcb_ratio": 0.2},
    "task_arithmetic": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 0.2},
    # The untuned settings (issue 22), measured on request (-m).
    "pcb (lambda: auto)": {"pcb_ratio": 0.2, "lambda": "auto"},
    "pcb (auto)": {"pcb_ratio": "auto", "lambda": "auto"},
}
DEFAULT_METHODS = ("pcb", "task_arithmetic", "ties")

# Runs in the child: makes the inputs, resets the peak, merges, prints one JSON line.
_CHILD = r"""
import gc, json, sys, time
import torch
import mergekit_pcb  # registers pcb
from mergekit.merge_methods import merge_state_dicts
from mergekit_pcb.kernel import streamed

method, rows, cols = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
parameters = json.loads(sys.argv[4])
if sys.argv[5] == "stored":
    streamed.STORED_SCORES_BYTES = 1 << 62  # B stored whatever its size, as before issue 24
torch.manual_seed(0)

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)

def make(base=None, block=1024):
    # Row blocks: no float32 copy of the whole tensor is ever made.
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    for start in range(0, rows, block):
        part = slice(start, min(start + block, rows))
        if base is None:
            out[part] = torch.randn(part.stop - part.start, cols).mul_(0.02)
        else:
            x = base[part].float()
            delta = torch.randn(x.shape).mul_(0.002 * 0.02)
            sparse = torch.rand(x.shape) < 0.05
            delta += torch.randn(x.shape).mul_(sparse).mul_(0.02 * 0.02)
            out[part] = x.add_(delta)
    return out

base = make()
experts = [make(base) for _ in range(3)]
models = {"base": {"w": base}, **{f"e{i}": {"w": e} for i, e in enumerate(experts)}}
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
before = status("VmRSS")
start = time.perf_counter()
with torch.no_grad():
    out = merge_state_dicts(models, method, base="base", parameters=parameters)
seconds = time.perf_counter() - start
peak = status("VmHWM")
inputs = sum(t.numel() * t.element_size() for t in (base, *experts))
print(json.dumps({"rise": peak - before, "before": before, "peak": peak,
                  "inputs": inputs, "seconds": seconds, "dtype": str(out["w"].dtype)}))
"""


def run_one(method: str, rows: int, cols: int, stored: bool = False) -> dict:
    """One merge in a fresh process; a kill or failure is returned with its exit status."""
    merge_method = method.split(" ")[0]  # "pcb (auto)" is pcb with other parameters
    args = [sys.executable, "-c", _CHILD, merge_method, str(rows), str(cols)]
    args += [json.dumps(PARAMETERS[method]), "stored" if stored else "default"]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"returncode": done.returncode, "stderr": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[str, list[dict]], inputs: int) -> str:
    gib = 2**30
    lines = [
        f"| method | rise above the inputs ({inputs / gib:.2f} GiB) | x inputs "
        "| x task_arithmetic's rise | seconds |",
        "|---|---|---|---|---|",
    ]
    medians = {}
    for method, runs in results.items():
        ok = [r for r in runs if "rise" in r]
        if len(ok) < len(runs):
            codes = sorted({r["returncode"] for r in runs if "returncode" in r})
            lines.append(f"| {method} | failed (exit status {codes}) | | | |")
            continue
        medians[method] = (
            statistics.median(r["rise"] for r in ok),
            statistics.median(r["seconds"] for r in ok),
        )
    ta = medians.get("task_arithmetic")
    for method, (rise, seconds) in medians.items():
        versus = f"{rise / ta[0]:.2f}x" if ta else "-"
        lines.append(
            f"| {method} | {rise / gib:.2f} GiB | {rise / inputs:.2f}x | {versus} | {seconds:.1f} |"
        )
    return "\n".join(lines)


@click.command()
@click.option("--rows", default=32064, show_default=True, help="Rows of the tensor.")
@click.option("--cols", default=8192, show_default=True, help="Columns of the tensor.")
@click.option("--repeats", "-r", default=3, show_default=True, help="Runs per method.")
@click.option(
    "--method",
    "-m",
    "methods",
    multiple=True,
    type=click.Choice(list(PARAMETERS)),
    help="Methods to measure (default: pcb, task_arithmetic, ties).",
)
@click.option(
    "--store-scores",
    is_flag=True,
    help="pcb as before issue 24: the scores B stored as one n x d float32 matrix, "
    "whatever its size (the comparison's 'before').",
)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Raw runs.")
def main(
    rows: int, cols: int, repeats: int, methods: tuple[str, ...], store_scores: bool, json_out
) -> None:
    """Median rise of peak RSS above the inputs for one rows x cols bf16 tensor."""
    methods = methods or DEFAULT_METHODS
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(repeats):
        for m in methods:
            run = run_one(m, rows, cols, store_scores)
            results[m].append(run)
            if "rise" in run:
                click.echo(
                    f"repeat {r + 1}/{repeats} {m}: rise {run['rise'] / 2**30:.2f} GiB, "
                    f"{run['seconds']:.1f} s",
                    err=True,
                )
            else:
                click.echo(f"repeat {r + 1}/{repeats} {m}: exit {run['returncode']}", err=True)
    inputs = 4 * rows * cols * 2
    click.echo(
        f"\nOne {rows} x {cols} bf16 tensor, base + 3 experts, mergekit merge_state_dicts, "
        f"median of {repeats}{', B stored (as before issue 24)' if store_scores else ''}\n"
    )
    click.echo(table(results, inputs))
    if json_out is not None:
        json_out.write_text(json.dumps({"rows": rows, "cols": cols, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
