"""``mergekit-pcb merge CONFIG OUT``: ``mergekit-yaml`` with strict validation first.

The option set is mergekit's own (``add_merge_options``), so every
``mergekit-yaml`` flag works unchanged and new mergekit flags appear without a
change here. The difference is what happens before and around ``run_merge``:
the config is checked strictly (unknown parameter names, values, base model)
before any model is opened, and every failure prints as one line, not a traceback.
"""

from __future__ import annotations

import logging

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from mergekit_pcb.config_check import ConfigError, validate_config
from mergekit_pcb.mergekit_internals import local_folders_stay_local

LOG = logging.getLogger(__name__)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or repr(error)
    return f"{type(error).__name__}: {text}"


@click.command("merge", cls=PrettyPrintHelp)
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@add_merge_options
def merge(merge_options: MergeOptions, config_file: str, out_path: str) -> None:
    """Validate CONFIG_FILE strictly, then merge into OUT_PATH exactly like mergekit-yaml."""
    merge_options.apply_global_options()
    with open(config_file, encoding="utf-8") as file:
        config_source = file.read()
    try:
        config = validate_config(config_source, source=config_file)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None

    from mergekit.merge import run_merge

    try:
        with local_folders_stay_local():
            run_merge(config, out_path, options=merge_options, config_source=config_source)
    except Exception as error:  # every failure becomes one clear line
        LOG.debug("merge failed", exc_info=True)  # the traceback, with -vv
        raise click.ClickException(_one_line(error)) from None
    click.echo(f"merged model written to {out_path}")
