"""``mergekit-pcb merge CONFIG OUT``: ``mergekit-yaml`` with strict validation first.

The option set is mergekit's own (``add_merge_options``), so every
``mergekit-yaml`` flag works unchanged and new mergekit flags appear without a
change here, plus ``--overwrite``. The difference is what happens before and around
``run_merge``: the config is checked strictly (unknown parameter names, values,
dtypes, base model), every model it names is found (relative paths from the working
directory, as mergekit-yaml reads them), and the output folder is checked (a model
already there is refused unless ``--overwrite``; shards of an interrupted merge are
removed), all before any model is opened or anything is written. Every failure
prints as one line, not a traceback (``-vv`` logs it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from mergekit_pcb.config_check import ConfigError, validate_config
from mergekit_pcb.config_errors import one_line
from mergekit_pcb.mergekit_internals import local_folders_stay_local
from mergekit_pcb.model_paths import check_models, merge_config_references, merge_folders
from mergekit_pcb.output_folder import prepare

LOG = logging.getLogger(__name__)


@click.command("merge", cls=PrettyPrintHelp)
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a model already in OUT_PATH: its weights and index files are removed first.",
)
@add_merge_options
def merge(merge_options: MergeOptions, config_file: str, out_path: str, overwrite: bool) -> None:
    """Validate CONFIG_FILE strictly, then merge into OUT_PATH exactly like mergekit-yaml."""
    merge_options.apply_global_options()
    with open(config_file, encoding="utf-8") as file:
        config_source = file.read()
    try:
        config = validate_config(config_source, source=config_file)
        references = merge_config_references(config)
        check_models(references, merge_folders(config_file))
        inputs = [Path(str(reference.model.path)) for _, reference in references]
        prepare(Path(out_path), overwrite, [path for path in inputs if path.is_dir()])
    except ConfigError as error:
        raise click.ClickException(str(error)) from None

    from mergekit.merge import run_merge

    try:
        with local_folders_stay_local():
            run_merge(config, out_path, options=merge_options, config_source=config_source)
    except Exception as error:  # every failure becomes one clear line
        LOG.debug("merge failed", exc_info=True)  # the traceback, with -vv
        raise click.ClickException(one_line(error)) from None
    click.echo(f"merged model written to {out_path}")
