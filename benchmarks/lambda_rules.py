"""Data-free rules for PCB's scale Lambda (issue 22), on the quality benchmark's experts.

    python benchmarks/lambda_rules.py --regime distilled   # or replay, lora, all

For every seed of a regime (trained checkpoints come from the benchmark's cache) it
merges with PCB at several ``pcb_ratio`` values, scales each tensor's merged task
vector m by every rule below and scores the result on the validation stream (the
500 examples a task the benchmark re-ranks its finalists on) and on the test split.
Rules are chosen on validation only; test is quoted. Writes
``benchmarks/lambda_rules.json`` (one entry per regime, merged into the file).

The rules (per tensor t unless said; s = sum_i lambda_i tau_i, the task-arithmetic sum):

- ``fixed 1``: Lambda = 1, the paper's.
- ``projection``: the Lambda at which Lambda m is closest to s, <m, s> / |m|^2.
- ``projection, per layer`` / ``per model``: the same least squares over every tensor of
  a decoder layer (embeddings, final norm and head each alone) / of the whole model.
- ``projection, shrunk``: halfway from 1 to the projection.
- ``projection, model median``: one Lambda, the median of the tensors' projections.
- ``kept least squares``: the Lambda at which Lambda m reproduces each tau_i on the
  entries it keeps (W_i > 0), summed over i.
- ``norm, RMS expert``: |Lambda m| = the RMS of |tau_i|.
- ``norm, sum``: |Lambda m| = |s|.
- ``projection, shared part once``: the projection times min(1, E / |s|^2), E the sum
  of the experts' squared norms (``lambda: auto``, mergekit_pcb/kernel/auto_scale.py).
- ``shared part once, ratio by cosine``: ``pcb_ratio`` per tensor too, the level of
  ``RATIOS`` whose m has the largest cosine with s, then the rule above.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy
from _quality_run import _mean, _normalized, _per_task
from _quality_setup import REGIMES, bench, rescore_split

from mergekit_pcb.kernel import combine, drop_weights, scores

HERE = Path(__file__).resolve().parent
RATIOS = (0.1, 0.2, 0.4, 0.7)
CLAMP = 1e-4
COSINE = "shared part once, ratio by cosine"
AUTO_RULE = "projection, shared part once"  # what lambda: auto computes


class Tensor:
    """What every rule reads for one tensor: m, s and the kept-entry sums."""

    def __init__(self, base: torch.Tensor, experts: list[torch.Tensor], ratio: float):
        tau = torch.stack([(e.float() - base.float()).flatten() for e in experts]).double()
        work = tau.float().clone()
        clipped, score = scores(work, clamp_ratio=CLAMP)
        weights = drop_weights(score, ratio)
        ones = torch.ones(len(experts), dtype=torch.float32)
        self.m = combine(clipped, weights, ones).double()
        s = tau.sum(0)
        kept = weights > 0
        self.mm = float(self.m @ self.m)
        self.ms = float(self.m @ s)
        self.ss = float(s @ s)
        self.kept_mt = float(sum((self.m * tau[i] * kept[i]).sum() for i in range(len(tau))))
        self.kept_mm = float(sum((self.m.square() * kept[i]).sum() for i in range(len(tau))))
        self.rms_tau = float(tau.square().sum(1).mean().sqrt())
        self.cosine = self.ms / (self.mm * self.ss) ** 0.5 if self.mm * self.ss > 0 else 0.0
        # The part every expert shares, c: with tau_i = c + u_i and the u_i orthogonal,
        # <tau_i, tau_j> = |c|^2 for i != j. s counts c n times; a merge wants it once.
        n = self.n = len(tau)
        gram = tau @ tau.T
        shared = float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1))) if n > 1 else 0.0
        mean = s / n
        share = min(1.0, max(0.0, shared) / float(mean @ mean)) if float(mean @ mean) > 0 else 0
        self.m_common = share * float(self.m @ mean)  # <m, c_est>, c_est = share * mean tau


def _group(name: str) -> str:
    match = re.match(r"(.*layers\.\d+)\.", name)
    return match.group(1) if match else name


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 1.0


def _pooled(tensors: dict[str, Tensor], key: Callable[[str], str]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for name, t in tensors.items():
        acc = sums.setdefault(key(name), [0.0, 0.0])
        acc[0] += t.ms
        acc[1] += t.mm
    return {name: _ratio(*sums[key(name)]) for name in tensors}


def rules(tensors: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Rule name -> tensor name -> Lambda."""
    proj = {n: _ratio(t.ms, t.mm) for n, t in tensors.items()}
    median = statistics.median(proj[n] for n, t in tensors.items() if t.mm > 0)
    return {
        "fixed 1": dict.fromkeys(tensors, 1.0),
        "projection": proj,
        "projection, per layer": _pooled(tensors, _group),
        "projection, per model": _pooled(tensors, lambda n: ""),
        "projection, shrunk": {n: 1 + (p - 1) / 2 for n, p in proj.items()},
        "projection, model median": dict.fromkeys(tensors, median),
        "kept least squares": {n: _ratio(t.kept_mt, t.kept_mm) for n, t in tensors.items()},
        "norm, RMS expert": {n: _ratio(t.rms_tau, t.mm**0.5) for n, t in tensors.items()},
        "norm, sum": {n: _ratio(t.ss**0.5, t.mm**0.5) for n, t in tensors.items()},
        "projection, shared part once": {
            n: max(0.0, _ratio(t.ms - (t.n - 1) * t.m_common, t.mm)) for n, t in tensors.items()
        },
    }


def _spread(values: dict[str, float], tensors: dict[str, Tensor]) -> dict[str, float]:
    live = sorted(v for n, v in values.items() if tensors[n].mm > 0)
    return {"min": live[0], "median": statistics.median(live), "max": live[-1]}


def run_regime(name: str, log, only: set[str] | None = None) -> dict:
    regime = REGIMES[name]
    family, model, _, test = bench(regime, log=log)
    val = rescore_split(regime)
    n_val = regime.n_rescore
    base = family.base.state_dict()

    def hits(state, examples, n):
        model.load_state_dict(state)
        return _mean(_per_task(toy.correct(model, family.tokenizer, examples), regime, n))

    seeds = []
    for seed in regime.seeds:
        start = time.perf_counter()
        experts = family.experts[seed]
        tasks = list(experts)
        own_val = {t: hits(experts[t], val, n_val)[t] for t in tasks}
        own_test = {t: hits(experts[t], test, regime.n_test)[t] for t in tasks}
        rows = []
        changed = [k for k in base if any(not torch.equal(experts[t][k], base[k]) for t in tasks)]
        by_ratio = {
            ratio: {k: Tensor(base[k], [experts[t][k] for t in tasks], ratio) for k in changed}
            for ratio in RATIOS
        }

        def row(rule, ratio, tensors, scales, own_val=own_val, own_test=own_test) -> dict:
            state = dict(base)
            for k, t in tensors.items():
                merged = base[k].double() + scales[k] * t.m.view(base[k].shape)
                state[k] = merged.to(base[k].dtype)
            return {
                "rule": rule,
                "pcb_ratio": ratio,
                "lambda": _spread(scales, tensors),
                "val": 100 * _normalized(hits(state, val, n_val), own_val),
                "test": 100 * _normalized(hits(state, test, regime.n_test), own_test),
            }

        for ratio, tensors in by_ratio.items():
            for rule, scales in rules(tensors).items():
                if only is None or rule in only:
                    rows.append(row(rule, ratio, tensors, scales))
        if only is None or COSINE in only:
            # pcb_ratio chosen per tensor too: the level whose m points most along s.
            picked = {k: max(RATIOS, key=lambda r, k=k: by_ratio[r][k].cosine) for k in changed}
            tensors = {k: by_ratio[picked[k]][k] for k in changed}
            scales = rules(tensors)[AUTO_RULE]
            rows.append(row(COSINE, _spread(picked, tensors), tensors, scales))
        seeds.append({"seed": seed, "rows": rows, "seconds": time.perf_counter() - start})
        log(f"{name} seed {seed}: {seeds[-1]['seconds']:.0f} s")
    return {"regime": name, "n_val": n_val, "n_test": regime.n_test, "seeds": seeds}


def _ratio_label(ratio) -> str:
    return "per tensor" if isinstance(ratio, dict) else f"{ratio:g}"


def report(published: dict) -> str:
    """Markdown: every rule and ratio, validation then test, mean over seeds, per regime;
    the rows in the order of the mean validation score over the regimes."""
    regimes = [r for r in REGIMES if r in published]
    table: dict[tuple[str, str], dict[str, tuple[float, float, float]]] = {}
    for name in regimes:
        rows: dict[tuple[str, str], list[dict]] = {}
        for seed in published[name]["seeds"]:
            for row in seed["rows"]:
                rows.setdefault((row["rule"], _ratio_label(row["pcb_ratio"])), []).append(row)
        for key, found in rows.items():
            table.setdefault(key, {})[name] = (
                statistics.fmean(r["val"] for r in found),
                statistics.fmean(r["test"] for r in found),
                statistics.median(r["lambda"]["median"] for r in found),
            )
    complete = {k: v for k, v in table.items() if set(v) == set(regimes)}
    order = sorted(complete, key=lambda k: -statistics.fmean(v[0] for v in complete[k].values()))
    head = " | ".join(f"{r} val | {r} test | {r} median Lambda" for r in regimes)
    lines = [f"| rule | pcb_ratio | {head} |", "|---|---|" + "---|" * (3 * len(regimes))]
    for rule, ratio in order:
        cells = " | ".join(
            f"{v[0]:.2f} | {v[1]:.2f} | {v[2]:.2f}"
            for v in (complete[(rule, ratio)][r] for r in regimes)
        )
        lines.append(f"| {rule} | {ratio} | {cells} |")
    return "\n".join(lines)


@click.command()
@click.option("--regime", "regime_name", type=click.Choice([*REGIMES, "all"]), default="all")
@click.option("--out", type=click.Path(path_type=Path), default=HERE / "lambda_rules.json")
@click.option("--threads", default=1, show_default=True)
@click.option(
    "--rule", "only", multiple=True, help="Run only this rule (repeatable; default: all)."
)
@click.option("--report", "just_report", is_flag=True, help="Print OUT's table; run nothing.")
def main(
    regime_name: str, out: Path, threads: int, only: tuple[str, ...], just_report: bool
) -> None:
    if just_report:
        click.echo(report(json.loads(out.read_text())))
        return
    torch.set_num_threads(threads)
    names = list(REGIMES) if regime_name == "all" else [regime_name]
    published = json.loads(out.read_text()) if out.exists() else {}
    chosen = set(only) or None
    for name in names:
        published[name] = run_regime(name, lambda m: click.echo(m, err=True), chosen)
        out.write_text(json.dumps(published, indent=1) + "\n")


if __name__ == "__main__":
    main()
