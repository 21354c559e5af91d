"""Time ``mergekit-yaml`` with pcb (both scopes), ties and task_arithmetic, side by side.

Usage::

    python benchmarks/speed.py                      # ~170M-parameter bf16 Llama, base + 3 experts
    python benchmarks/speed.py --quick              # a small model, for a smoke run
    python benchmarks/speed.py --family 1b --cuda   # 0.95B, built and merged on a GPU

Each merge runs as a fresh ``mergekit-yaml`` subprocess; the methods are interleaved
within every repeat so that load from other users of the machine hits them alike.
Peak RSS is the child's own ``ru_maxrss`` from ``os.wait4``, which covers exactly
that process, unlike polling (which can miss short peaks). With ``--cuda`` the child
also reports its ``torch.cuda.max_memory_allocated`` at exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import click
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cgroup import MemoryCap
from _models import build_family, family_options, family_spec, parameter_count

METHODS: dict[str, dict] = {
    "pcb": {"merge_method": "pcb", "parameters": {"pcb_ratio": 0.2}},
    "pcb (lambda: auto)": {
        "merge_method": "pcb",
        "parameters": {"pcb_ratio": 0.2, "lambda": "auto"},
    },
    "pcb (auto)": {
        "merge_method": "pcb",
        "parameters": {"pcb_ratio": "auto", "lambda": "auto"},
    },
    "pcb (model scope)": {
        "merge_method": "pcb",
        "parameters": {"pcb_ratio": 0.2, "pcb_scope": "model"},
    },
    "ties": {"merge_method": "ties", "model_parameters": {"weight": 1.0, "density": 0.2}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "model_parameters": {"weight": 1.0}},
}


# The headline table's methods; the auto rows (docs/lambda-auto.md) only when named (-m).
DEFAULT_METHODS = ("pcb", "pcb (model scope)", "ties", "task_arithmetic")


class Sample(NamedTuple):
    wall_s: float
    peak_rss_bytes: int
    gpu_peak_bytes: int | None = None
    returncode: int = 0  # nonzero: the merge failed or was killed (its numbers are not a result)
    capped: bool = False  # killed by --rss-cap, not by itself or the OOM killer
    peak_anon_bytes: int = 0  # the largest anonymous RSS seen (polled every 0.1 s)


def _watch_rss(
    pid: int,
    cap_bytes: int | None,
    killed: list[bool],
    peak: list[int],
    done: threading.Event,
    cap_seconds: float | None = None,
) -> None:
    """Kill ``pid`` once its anonymous RSS passes ``cap_bytes``: a merge that would not fit
    is then a result (the table says so) instead of a trip of the machine's OOM killer,
    which might pick another process. Anonymous memory only: the pages of memory-mapped
    checkpoints also count in RSS, but the kernel drops them under pressure."""
    status = Path(f"/proc/{pid}/status")
    start = time.perf_counter()
    while not done.wait(0.1):
        if cap_seconds is not None and time.perf_counter() - start > cap_seconds:
            killed.append(True)
            os.kill(pid, signal.SIGKILL)
            return
        try:
            rss = next(
                int(x.split()[1]) * 1024
                for x in status.read_text().splitlines()
                if x.startswith("RssAnon:")
            )
        except (OSError, StopIteration):
            return
        peak[0] = max(peak[0], rss)
        if cap_bytes is not None and rss > cap_bytes:
            killed.append(True)
            os.kill(pid, signal.SIGKILL)
            return


# mergekit-yaml in this process, writing the GPU's peak allocation to argv[1] at exit.
_WITH_GPU_PEAK = (
    "import atexit, sys, torch\n"
    "path = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(path, 'w').write(str(torch.cuda.max_memory_allocated())))\n"
    "from mergekit.scripts.run_yaml import main\n"
    "sys.argv[0] = 'mergekit-yaml'\n"
    "main()\n"
)


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


def run_once(
    config: Path,
    out: Path,
    extra: list[str],
    rss_cap: int | None = None,
    time_cap: float | None = None,
    memory_cap: MemoryCap | None = None,
) -> Sample:
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    args = [str(config), str(out), "--no-copy-tokenizer", "--quiet", *extra]
    gpu_file = out.parent / "gpu-peak.txt" if "--cuda" in extra else None
    if gpu_file is None:
        cmd = [exe, *args]
    else:
        gpu_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-c", _WITH_GPU_PEAK, str(gpu_file), *args]
    start = time.perf_counter()
    process = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=memory_cap.enter if memory_cap else None,
    )
    killed: list[bool] = []
    peak = [0]
    done = threading.Event()
    watch = threading.Thread(
        target=_watch_rss, args=(process.pid, rss_cap, killed, peak, done, time_cap)
    )
    watch.start()
    # stderr is read while the child runs: a full pipe would block it.
    stderr = process.stderr.read().decode(errors="replace")
    # wait4 reports this child's own peak RSS (Linux: KiB), not the max over all children.
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    watch.join()
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    shutil.rmtree(out, ignore_errors=True)
    if process.returncode != 0:
        if not killed and not (memory_cap and process.returncode == -signal.SIGKILL):
            click.echo(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}", err=True)
        return Sample(wall, usage.ru_maxrss * 1024, None, process.returncode, bool(killed), peak[0])
    gpu_peak = int(gpu_file.read_text()) if gpu_file is not None else None
    return Sample(wall, usage.ru_maxrss * 1024, gpu_peak, peak_anon_bytes=peak[0])


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """``count`` processes that only burn CPU while the merges run: how a merge fares on
    a shared machine, where threads that wait on each other stall."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def table(
    results: dict[str, list[Sample]],
    rss_cap: int | None = None,
    time_cap: float | None = None,
    memory_cap: int | None = None,
) -> str:
    failed = {m: v for m, v in results.items() if any(s.returncode for s in v)}
    results = {m: v for m, v in results.items() if m not in failed}
    gpu = bool(results) and all(s.gpu_peak_bytes is not None for v in results.values() for s in v)
    med = {
        m: (
            statistics.median(s.wall_s for s in v),
            statistics.median(s.peak_rss_bytes for s in v),
            statistics.median(s.gpu_peak_bytes for s in v) if gpu else None,
        )
        for m, v in results.items()
    }

    def ratio(m: str, ref: str, i: int) -> str:
        return f"{med[m][i] / med[ref][i]:.2f}x" if ref in med else "-"

    head = (
        "| method | median wall time | peak RSS | time vs ties | time vs task_arithmetic "
        "| RSS vs ties | time vs pcb | RSS vs pcb |"
    )
    rule = "|---|---|---|---|---|---|---|---|"
    if gpu:
        head += " GPU peak allocated | GPU peak vs ties |"
        rule += "---|---|"
    lines = [head, rule]
    for m, (wall, rss, gpu_peak) in med.items():
        line = (
            f"| {m} | {wall:.1f} s | {rss / 2**30:.2f} GiB | {ratio(m, 'ties', 0)} "
            f"| {ratio(m, 'task_arithmetic', 0)} | {ratio(m, 'ties', 1)} "
            f"| {ratio(m, 'pcb', 0)} | {ratio(m, 'pcb', 1)} |"
        )
        if gpu:
            line += f" {gpu_peak / 2**30:.2f} GiB | {ratio(m, 'ties', 2)} |"
        lines.append(line)
    for m, samples in failed.items():
        bad = next(s for s in samples if s.returncode)
        if bad.capped and time_cap and bad.wall_s >= time_cap:
            why = f"killed at the time cap of {time_cap:g} s (exit status {bad.returncode})"
        elif bad.capped and rss_cap:
            why = (
                f"killed at the anonymous-RSS cap of {rss_cap / 2**30:g} GiB "
                f"(exit status {bad.returncode})"
            )
        elif memory_cap and bad.returncode == -signal.SIGKILL:
            why = (
                f"killed by the memory cap of {memory_cap / 2**30:g} GiB "
                f"(exit status {bad.returncode})"
            )
        else:
            why = f"failed, exit status {bad.returncode}"
        lines.append(
            f"| {m} | {why} after {bad.wall_s:.0f} s | >= {bad.peak_rss_bytes / 2**30:.2f} GiB "
            + "| - " * (len(lines[1].split("|")) - 5)
            + "|"
        )
    return "\n".join(lines)


@click.command()
@family_options
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
    "--load",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Run this many CPU-bound busy loops beside the merges (a shared machine).",
)
@click.option(
    "--rss-cap",
    type=float,
    default=None,
    help="Kill a merge whose anonymous RSS passes this many GiB and record it as killed "
    "(on a shared machine, instead of letting the OOM killer choose).",
)
@click.option(
    "--time-cap",
    type=float,
    default=None,
    help="Kill a merge still running after this many seconds and record it as killed.",
)
@click.option(
    "--memory-cap",
    type=float,
    default=None,
    help="Run each merge in a memory cgroup of this many GiB (Linux, root): page cache "
    "is reclaimed at the cap, anonymous memory is not, so a merge that completes fits "
    "in that much free RAM; one that does not is recorded as killed.",
)
@click.option(
    "--out-shard-size",
    default=None,
    help="Pass --out-shard-size to mergekit-yaml: the output it holds before writing "
    "(mergekit's default, 5B bytes, holds a 70B slice's whole output).",
)
@click.option(
    "--method",
    "-m",
    "methods",
    multiple=True,
    type=click.Choice(list(METHODS)),
    help="Methods to time (default: pcb, pcb (model scope), ties, task_arithmetic).",
)
def main(
    family: str,
    quick: bool,
    repeats: int,
    cuda: bool,
    threads: int | None,
    load: int,
    methods: tuple[str, ...],
    rss_cap: float | None,
    time_cap: float | None,
    memory_cap: float | None,
    out_shard_size: str | None,
    cache_dir: Path | None,
) -> None:
    """Median wall time and peak RSS of mergekit-yaml per merge method, as a markdown table."""
    spec = family_spec(family, quick)
    click.echo(
        f"building/using cached models ({parameter_count(spec) / 1e6:.0f}M params, "
        f"bf16, base + {spec.n_experts} experts)...",
        err=True,
    )
    # Drawn on a GPU where one exists (seconds, not minutes, for 4 x 1B), so that the
    # --cuda and the CPU runs of one machine merge the same models.
    import torch

    base, experts = build_family(
        spec, cache_dir, device="cuda" if torch.cuda.is_available() else "cpu"
    )
    cap = int(rss_cap * 2**30) if rss_cap else None
    methods = methods or DEFAULT_METHODS
    extra = (["--cuda"] if cuda else []) + (["-j", str(threads)] if threads else [])
    extra += ["--out-shard-size", out_shard_size] if out_shard_size else []
    results: dict[str, list[Sample]] = {m: [] for m in methods}
    limit = int(memory_cap * 2**30) if memory_cap else None
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pcb-bench-")))
        stack.enter_context(busy_loops(load))
        cgroup = MemoryCap(limit) if limit else None
        if cgroup:
            stack.callback(cgroup.close)
        configs = {
            m: write_config(tmp / f"{i}.yml", m, base, experts) for i, m in enumerate(methods)
        }
        for r in range(repeats):
            for m in methods:
                if any(s.returncode for s in results[m]):
                    continue  # killed or failed once: its result is that
                sample = run_once(configs[m], tmp / "out", extra, cap, time_cap, cgroup)
                results[m].append(sample)
                gpu = (
                    f", GPU {sample.gpu_peak_bytes / 2**30:.2f} GiB"
                    if sample.gpu_peak_bytes is not None
                    else ""
                )
                click.echo(
                    f"repeat {r + 1}/{repeats} {m}: {sample.wall_s:.1f} s, "
                    f"{sample.peak_rss_bytes / 2**30:.2f} GiB{gpu}, "
                    f"anonymous {sample.peak_anon_bytes / 2**30:.2f} GiB"
                    + (f", exit status {sample.returncode}" if sample.returncode else ""),
                    err=True,
                )
    command = " ".join(["mergekit-yaml --no-copy-tokenizer", *extra])
    beside = f", {load} busy loop(s) beside" if load else ""
    beside += f", in a {memory_cap:g} GiB memory cgroup" if memory_cap else ""
    click.echo(
        f"\n{parameter_count(spec) / 1e6:.0f}M-parameter Llama, bf16, base + "
        f"{spec.n_experts} experts, median of {repeats}, {command}{beside}\n"
    )
    click.echo(table(results, cap, time_cap, limit))
    anon = ", ".join(
        f"{m} {statistics.median(s.peak_anon_bytes for s in v) / 2**30:.2f} GiB"
        for m, v in results.items()
    )
    click.echo(f"\nPeak anonymous RSS (polled every 0.1 s; medians): {anon}")


if __name__ == "__main__":
    main()
