"""``mergekit-pcb evolve SEARCH.yml OUT_DIR``."""

from __future__ import annotations

import logging
from pathlib import Path

import click


@click.command("evolve")
@click.argument("search_yml", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the search in OUT_DIR without re-scoring finished candidates.",
)
@click.option("--seed", type=int, default=None, help="Override optimizer.seed.")
@click.option(
    "--budget",
    type=int,
    default=None,
    help="Override the budget, in candidates (optimizer.budget).",
)
@click.option(
    "--budget-examples",
    type=int,
    default=None,
    help="Override the budget, in examples scored (optimizer.budget_examples).",
)
@click.option("--write-model", is_flag=True, help="Also merge the best config into OUT_DIR/model.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the search's statistics go (default: cache.dir, else OUT_DIR/cache).",
)
@click.option(
    "--cache-memory-gb",
    type=float,
    default=None,
    help="Override cache.memory_gb, the in-memory budget for inputs that cannot be mapped.",
)
@click.option("--device", default=None, help="Override device (cpu, cuda, cuda:1, ...).")
@click.option(
    "--ray",
    "use_ray",
    is_flag=True,
    help="Score each generation's candidates in parallel on Ray actors.",
)
@click.option("--ray-address", default=None, help="Join this Ray cluster instead of a local one.")
@click.option("--ray-num-cpus", type=int, default=None, help="CPUs of the local Ray.")
@click.option(
    "--ray-actors",
    type=int,
    default=None,
    help="Number of actors (default: one per CPU of the Ray cluster).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level (and an error's traceback).")
def evolve(
    search_yml: Path,
    out_dir: Path,
    resume: bool,
    seed: int | None,
    budget: int | None,
    budget_examples: int | None,
    write_model: bool,
    cache_dir: Path | None,
    cache_memory_gb: float | None,
    device: str | None,
    use_ray: bool,
    ray_address: str | None,
    ray_num_cpus: int | None,
    ray_actors: int | None,
    no_progress: bool,
    verbose: bool,
) -> None:
    """Search pcb_ratio, lambda and per-model weights on your tasks; write best.yml."""
    from mergekit_pcb.config_errors import one_line
    from mergekit_pcb.evolve.config import EvolveConfigError, load_config
    from mergekit_pcb.evolve.report import format_summary
    from mergekit_pcb.evolve.search import RunOptions, run_search

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_config(search_yml)
        overrides = {}
        if budget is not None and budget_examples is not None:
            raise EvolveConfigError(
                "--budget-examples: give the budget in candidates (--budget) or in examples "
                "(--budget-examples), not both"
            )
        if seed is not None or budget is not None or budget_examples is not None:
            update = {"seed": seed} if seed is not None else {}
            if budget is not None:  # the command line's unit replaces the YAML's
                update.update(budget=budget, budget_examples=None)
            if budget_examples is not None:
                update.update(budget=None, budget_examples=budget_examples)
            opt = cfg.optimizer.model_copy(update=update)
            for name, value in (("--seed", seed), ("--budget", budget)):
                if value is not None and value < (0 if name == "--seed" else 1):
                    raise EvolveConfigError(f"{name} must be >= {0 if name == '--seed' else 1}")
            if budget_examples is not None and budget_examples < 1:
                raise EvolveConfigError("--budget-examples must be >= 1")
            overrides["optimizer"] = opt
        if cache_dir is not None or cache_memory_gb is not None:
            overrides["cache"] = cfg.cache.model_copy(
                update={
                    k: v
                    for k, v in (
                        ("dir", str(cache_dir.resolve()) if cache_dir else None),
                        ("memory_gb", cache_memory_gb),
                    )
                    if v is not None
                }
            )
        if device is not None:
            overrides["device"] = device
        cfg = _with_overrides(cfg, overrides)
        options = RunOptions(
            resume=resume,
            write_model=write_model,
            ray=use_ray or bool(ray_address),
            ray_address=ray_address,
            ray_num_cpus=ray_num_cpus,
            ray_actors=ray_actors,
            progress=not no_progress,
            root=search_yml.resolve().parent,
        )
        report = run_search(cfg, out_dir, options)
    except EvolveConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # anything else is one line too; -v logs the traceback
        logging.getLogger("mergekit_pcb.evolve").info("the search failed", exc_info=True)
        raise click.ClickException(one_line(exc)) from None
    click.echo(format_summary(report, cfg.evaluation.tasks, out_dir))


def _with_overrides(cfg, overrides: dict):
    """The config with the command line's values, validated as if the YAML held them
    (``model_copy`` alone would skip every check, e.g. that --budget fits the warm-up)."""
    from pydantic import ValidationError

    from mergekit_pcb.config_errors import format_validation_error
    from mergekit_pcb.evolve.config import EvolveConfigError

    if not overrides:
        return cfg
    updated = cfg.model_copy(update=overrides)
    try:
        return type(cfg).model_validate(updated.model_dump(by_alias=True))
    except ValidationError as error:
        raise EvolveConfigError(
            f"with the command-line options: {format_validation_error(error)}"
        ) from None
