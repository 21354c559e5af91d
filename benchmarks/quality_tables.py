"""The README's quality tables, made from the three regimes' ``results.json``.

The README shows the three regimes side by side; each regime's own RESULTS.md is written
by ``quality.py``, but nothing wrote the README's table, and hand-copied numbers went
stale when a regime was rerun. Print it, then paste it into the README (a test checks
that the README's tables are these):

    python benchmarks/quality_tables.py          # the README's two tables
    python benchmarks/quality_tables.py --all    # every paired difference (docs/quality.md)
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
REGIMES = {"distilled": HERE, "replay": HERE / "replay", "lora": HERE / "lora"}
ROWS = (
    "pcb",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "pcb (auto)",
    "pcb (lambda: auto)",
    "pcb (defaults)",
    "pcb (model scope)",
    "pcb + evolve (1/3 budget)",
    "pcb + evolve",
    "pcb + evolve (4x)",
    "pcb + evolve (label-free)",
    "pcb + random search (4x)",
    "linear",
)
LABELS = {
    "pcb (auto)": "pcb, untuned: `pcb_ratio: auto`, `lambda: auto`",
    "pcb (lambda: auto)": "pcb, untuned: `lambda: auto` (`pcb_ratio` 0.1)",
    "pcb (defaults)": "pcb, untuned: defaults (`pcb_ratio` 0.1, `lambda` 1)",
    "pcb (model scope)": "pcb (`pcb_scope: model`)",
    "linear": "linear (plain average)",
}
DIFFERENCES = (
    "pcb - ties",
    "pcb - task_arithmetic",
    "pcb (auto) - pcb",
    "pcb (auto) - pcb (defaults)",
    "pcb + evolve (1/3 budget) - pcb",
    "pcb + evolve - pcb",
    "pcb + evolve (4x) - pcb",
    "pcb + evolve (label-free) - pcb",
)


def _load() -> dict[str, dict]:
    return {name: json.loads((path / "results.json").read_text()) for name, path in REGIMES.items()}


def _cell(row: dict) -> str:
    return (
        f"{100 * row['normalized_mean']:.1f} ± {100 * row['normalized_std']:.1f} "
        f"({100 * row['gain_kept']:.1f}%)"
    )


def _scored(rows: list[dict]) -> str:
    """Validation examples a seed scored, the same in every regime or each shown."""
    means = []
    for row in rows:
        known = [n for n in row.get("examples_scored") or [] if n is not None]
        means.append(f"{statistics.fmean(known):,.0f}" if known else "-")
    return means[0] if len(set(means)) == 1 else " / ".join(means)


def table(results: dict[str, dict]) -> str:
    names = list(results)
    seeds = {n: len(r["methods"]["pcb"]["per_seed_normalized"]) for n, r in results.items()}
    lines = [
        "| model | "
        + " | ".join(f"{n} ({seeds[n]} seeds)" for n in names)
        + " | labelled validation examples a seed scores |",
        "|---|" + "---|" * (len(names) + 1),
        "| base | "
        + " | ".join(
            f"{100 * r['base']['normalized_mean']:.1f} ± {100 * r['base']['normalized_std']:.1f}"
            for r in results.values()
        )
        + " | 0 |",
    ]
    for label in ROWS:
        rows = [r["methods"].get(label) for r in results.values()]
        if any(row is None for row in rows):
            continue  # not run in every regime
        cells = " | ".join(_cell(row) for row in rows)
        scored = "0 (unlabelled prompts)" if "label-free" in label else _scored(rows)
        lines.append(f"| {LABELS.get(label, label)} | {cells} | {scored} |")
    lines.append("| experts | " + " | ".join("100" for _ in names) + " | - |")
    return "\n".join(lines)


def differences(results: dict[str, dict], every: bool = False) -> str:
    """The README's paired differences, or (``every``) all the regimes share."""
    names = list(results)
    first = next(iter(results.values()))["comparisons"]
    chosen = list(first) if every else DIFFERENCES
    lines = [
        "| paired difference, points [95% interval] | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for name in chosen:
        found = [r["comparisons"].get(name) for r in results.values()]
        if any(c is None for c in found):
            continue
        cells = " | ".join(
            f"{c['points']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]" for c in found
        )
        lines.append(f"| {name.replace(' - ', ' − ')} | {cells} |")
    return "\n".join(lines)


@click.command()
@click.option("--all", "every", is_flag=True, help="Every paired difference (docs/quality.md).")
def main(every: bool) -> None:
    """Print the README's quality table and paired differences."""
    results = _load()
    if not every:
        click.echo(table(results))
        click.echo()
    click.echo(differences(results, every))


if __name__ == "__main__":
    main()
