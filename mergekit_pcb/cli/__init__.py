"""``mergekit-pcb``: one click group; each subcommand lives in its own module.

Subcommands are imported only when invoked, so ``mergekit-pcb --help`` stays fast
and an optional extra missing for one subcommand never breaks the others.
"""

from __future__ import annotations

import importlib

import click

COMMANDS = {
    "merge": (
        "mergekit_pcb.cli.merge",
        "merge",
        "Validate a pcb config strictly, then run mergekit's merge.",
    ),
    "demo": (
        "mergekit_pcb.cli.demo",
        "demo",
        "Build tiny local models and merge them with PCB (no downloads).",
    ),
    "evolve": (
        "mergekit_pcb.cli.evolve",
        "evolve",
        "Search PCB's ratios and coefficients with CMA-ES.",
    ),
    "inspect": (
        "mergekit_pcb.cli.inspect",
        "inspect",
        "Report where the experts agree, conflict and win under PCB (no model written).",
    ),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str):
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_, _, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="mergekit-pcb")
def main() -> None:
    """PCB-Merging for mergekit (arXiv 2410.02396)."""
