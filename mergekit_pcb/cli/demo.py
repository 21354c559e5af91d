"""``mergekit-pcb demo OUT``: a complete PCB merge on a built-in default, offline.

It shows a new user, in seconds and without any download, that ``pcb`` runs
through mergekit's real pipeline (config, planner, executor, writer, model card),
and what PCB did to each tensor: how many entries each model kept and how often
the models disagreed in sign (the conflicts PCB's inter-balancing resolves).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import click
import torch

from mergekit_pcb.config_errors import ConfigError, one_line
from mergekit_pcb.kernel import drop_weights, scores
from mergekit_pcb.output_folder import prepare
from mergekit_pcb.parameters import CLAMP_RATIO, LAMBDA, PCB_RATIO, Parameter

DEFAULT_EXPERTS = 3


class TensorSummary(NamedTuple):
    name: str
    elements: int
    kept: list[int]  # entries with W > 0, per fine-tuned model
    sign_conflict: float  # share of entries where the task vectors differ in sign
    changed: int  # entries of the merged tensor that differ from the base


def demo_config(base: Path, experts: list[Path], pcb_ratio: float, clamp_ratio: float) -> str:
    """The YAML a user would write; absolute paths keep mergekit's card from asking the Hub."""
    weights = [1.0, 0.8, 0.6, 0.4, 0.2]
    lines = [
        "merge_method: pcb",
        f"base_model: {base.resolve()}",
        "models:",
    ]
    for i, path in enumerate(experts):
        lines += [f"  - model: {path.resolve()}", f"    parameters: {{weight: {weights[i % 5]}}}"]
    lines += [
        "parameters:",
        f"  pcb_ratio: {pcb_ratio}",
        f"  clamp_ratio: {clamp_ratio}",
        f"  lambda: {LAMBDA.default}",
        "dtype: float32",
    ]
    return "\n".join(lines) + "\n"


def summarize(
    base: dict[str, torch.Tensor],
    experts: list[dict[str, torch.Tensor]],
    merged: dict[str, torch.Tensor],
    *,
    pcb_ratio: float,
    clamp_ratio: float,
) -> list[TensorSummary]:
    """Recompute PCB's drop weights W per tensor (steps 2-9) to count what each model kept."""

    rows = []
    for name in sorted(merged):
        theta0 = base[name].to(torch.float32).reshape(-1)
        tau = torch.stack([e[name].to(torch.float32).reshape(-1) for e in experts]) - theta0
        signs = torch.sign(tau)
        conflict = ((signs > 0).any(dim=0) & (signs < 0).any(dim=0)).float().mean().item()
        if tau.any():
            _, score = scores(tau.clone(), clamp_ratio=clamp_ratio)
            weights = drop_weights(score, pcb_ratio)
            kept = [int(k) for k in (weights > 0).sum(dim=1)]
        else:
            kept = [0] * len(experts)
        changed = int((merged[name].to(torch.float32).reshape(-1) != theta0).sum())
        rows.append(TensorSummary(name, theta0.numel(), kept, conflict, changed))
    return rows


def format_summary(rows: list[TensorSummary]) -> str:
    n = len(rows[0].kept) if rows else 0
    width = max([len("tensor")] + [len(row.name) for row in rows])
    header = (
        f"{'tensor':<{width}} {'elements':>8}  "
        + "  ".join(f"{'kept m' + str(i + 1):>9}" for i in range(n))
        + f"  {'sign conflict':>13}  {'changed':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        kept = "  ".join(f"{k / row.elements:>9.1%}" for k in row.kept)
        lines.append(
            f"{row.name:<{width}} {row.elements:>8}  {kept}  {row.sign_conflict:>13.1%}  "
            f"{row.changed / row.elements:>8.1%}"
        )
    return "\n".join(lines)


def run_demo(
    out: Path,
    *,
    experts: int,
    pcb_ratio: float,
    clamp_ratio: float,
    seed: int,
    workdir: Path,
) -> list[TensorSummary]:
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file
    from transformers.utils import logging as hf_logging

    from mergekit_pcb.config_check import validate_config
    from mergekit_pcb.tiny import build_family

    hf_logging.disable_progress_bar()  # save_pretrained's per-model bars drown the summary
    base_path, expert_paths = build_family(
        workdir,
        n_experts=experts,
        seed=seed,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
    )
    source = demo_config(base_path, expert_paths, pcb_ratio, clamp_ratio)
    config = validate_config(source, source="demo config")
    run_merge(config, str(out), options=MergeOptions(quiet=True), config_source=source)

    def load(path: Path) -> dict[str, torch.Tensor]:
        tensors = {}
        for shard in sorted(path.glob("*.safetensors")):
            tensors.update(load_file(shard))
        return tensors

    return summarize(
        load(base_path),
        [load(p) for p in expert_paths],
        load(out),
        pcb_ratio=pcb_ratio,
        clamp_ratio=clamp_ratio,
    )


def _option(parameter: Parameter):
    """A click option for a numeric pcb parameter, its default and domain from parameters."""
    return click.option(
        "--" + parameter.name.replace("_", "-"),
        type=click.FloatRange(
            parameter.low,
            parameter.high,
            min_open=parameter.low_open,
            max_open=parameter.high_open,
        ),
        default=parameter.default,
        show_default=True,
        help=parameter.description[0].upper() + parameter.description[1:] + ".",
    )


@click.command("demo")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--experts",
    type=click.IntRange(1, 8),
    default=DEFAULT_EXPERTS,
    show_default=True,
    help="Number of fine-tuned models to merge.",
)
@_option(PCB_RATIO)
@_option(CLAMP_RATIO)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the tiny models.")
@click.option(
    "--inputs",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the tiny base and experts are written and kept (default: OUT/inputs).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the model of an earlier demo in OUT: its weights and index files are "
    "removed first.",
)
def demo(
    out: Path,
    experts: int,
    pcb_ratio: float,
    clamp_ratio: float,
    seed: int,
    inputs: Path | None,
    overwrite: bool,
) -> None:
    """Build a tiny local Llama base and experts, merge them with PCB into OUT, summarize.

    The inputs are kept (OUT/inputs unless --inputs), so the ``mergekit_config.yml`` the
    merge saves in OUT can be run again, changed, by the user. An earlier run's model in
    OUT is refused unless --overwrite, as by ``mergekit-pcb merge``.
    """
    inputs = inputs or out / "inputs"
    try:
        prepare(out, overwrite, [])
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    try:
        rows = run_demo(
            out,
            experts=experts,
            pcb_ratio=pcb_ratio,
            clamp_ratio=clamp_ratio,
            seed=seed,
            workdir=inputs,
        )
    except Exception as error:  # one clear line, not a traceback
        raise click.ClickException(one_line(error)) from None
    click.echo(f"PCB-merged model ({experts} experts + base, tiny Llama): {out.resolve()}")
    click.echo(
        f"pcb_ratio={pcb_ratio} clamp_ratio={clamp_ratio}; per tensor: share of entries "
        "each model kept (W > 0), share where the models disagree in sign, share changed"
    )
    click.echo(format_summary(rows))
    config = out.resolve() / "mergekit_config.yml"
    click.echo(f"\ninputs (tiny base and experts) kept in {inputs.resolve()}; {config} merges them")
    click.echo(
        f"next: edit pcb_ratio, lambda or the weights in {config}, then "
        f"mergekit-pcb merge {config} ./pcb-demo-2"
    )
