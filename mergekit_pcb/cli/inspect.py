"""``mergekit-pcb inspect CONFIG REPORT_DIR``: PCB's parameter competition, seen before a merge.

The config and the models it names are checked as by ``mergekit-pcb merge`` (the
same functions), then planned by mergekit as the merge plans it; PCB's scores are
computed with the merge's kernel, and no model is written. Every failure prints as
one line.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import click

from mergekit_pcb.inspect import DEFAULT_SAMPLE

LOG = logging.getLogger(__name__)


def _device(value: str) -> str:
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise click.BadParameter(
            f"{value!r} is not a torch device; allowed: cpu, cuda, cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(f"{value!r}: this torch sees no CUDA device; allowed: cpu")
    if device.type not in ("cpu", "cuda"):
        raise click.BadParameter(f"{value!r}: allowed: cpu, cuda, cuda:N")
    return value


def _pattern(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as error:
            raise click.BadParameter(
                f"{value!r} is not a regular expression ({error}); allowed: a Python regular "
                "expression, e.g. 'layers\\.(0|1)\\.mlp'"
            ) from None
    return value


def _progress(items, total: int, title: str):
    from tqdm import tqdm

    return tqdm(items, total=total, desc=title, unit="tensor", leave=False)


def _previous_report(report_dir: Path, overwrite: bool) -> None:
    """Refuse a folder holding an earlier report unless ``overwrite``, which removes
    exactly the files a report consists of (nothing else in the folder)."""
    from mergekit_pcb.inspect.plots import FIGURES
    from mergekit_pcb.output_folder import previous_run

    names = ("report.html", "report.json", *FIGURES)
    found = [report_dir / name for name in names if (report_dir / name).is_file()]
    if found and not overwrite:
        raise click.ClickException(
            previous_run(
                report_dir,
                "a report",
                [path.name for path in found],
                "the new report would replace it",
                "--overwrite (removes that report's files first) or another folder",
            )
        )
    for path in found:
        path.unlink()
    if found:
        LOG.warning(
            "--overwrite: removed the earlier report's files from %s: %s",
            report_dir,
            ", ".join(path.name for path in found),
        )


@click.command("inspect")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("report_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where PCB's scores are computed (cpu, cuda, cuda:N).",
)
@click.option(
    "--tensors",
    "pattern",
    default=None,
    callback=_pattern,
    help="Inspect only tensors whose name this regular expression finds (pcb_scope: model "
    "still takes its statistics over every tensor).",
)
@click.option(
    "--sample",
    type=click.IntRange(1, None),
    default=DEFAULT_SAMPLE,
    show_default=True,
    help="Positions per tensor kept for the score histograms (and, with pcb_scope: model, "
    "the pcb_ratio sweep).",
)
@click.option("--trust-remote-code", is_flag=True, help="As for mergekit-yaml.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the report of an earlier run in REPORT_DIR: its files are removed first.",
)
def inspect(
    config_file: str,
    report_dir: Path,
    device: str,
    pattern: str | None,
    sample: int,
    trust_remote_code: bool,
    no_progress: bool,
    overwrite: bool,
) -> None:
    """Score CONFIG_FILE's merge with PCB and write REPORT_DIR/report.html, report.json and
    PNGs: who keeps, wins and conflicts where (no model is written)."""
    from mergekit_pcb.inspect import plots

    try:
        plots.require()
        device = _device(device)
    except (ImportError, click.BadParameter) as error:
        raise click.ClickException(str(error).replace("\n", " ")) from None

    from mergekit_pcb.config_check import ConfigError, validate_config
    from mergekit_pcb.config_errors import one_line
    from mergekit_pcb.model_paths import check_models, merge_config_references, merge_folders

    with open(config_file, encoding="utf-8") as file:
        text = file.read()
    try:  # exactly the checks of mergekit-pcb merge, before any model is opened
        config = validate_config(text, source=config_file)
        check_models(merge_config_references(config), merge_folders(config_file))
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    if config.merge_method != "pcb":
        raise click.ClickException(
            f"{config_file}: merge_method is '{config.merge_method}'; allowed: pcb "
            "(inspect shows what PCB does to the experts)"
        )
    _previous_report(report_dir, overwrite)

    from mergekit_pcb.inspect import InspectError, run

    try:
        report = run(
            config,
            report_dir,
            config_path=config_file,
            device=device,
            pattern=pattern,
            sample=sample,
            trust_remote_code=trust_remote_code,
            progress=None if no_progress else _progress,
        )
    except InspectError as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:  # every failure becomes one clear line
        LOG.debug("inspect failed", exc_info=True)  # the traceback, with -vv
        raise click.ClickException(one_line(error)) from None
    for sentence in report["summary"]:
        click.echo(f"- {sentence['text']}")
    click.echo(f"report written to {report_dir / 'report.html'}")
