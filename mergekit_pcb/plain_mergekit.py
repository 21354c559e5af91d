"""pcb's config checks under mergekit's own entry points: ``mergekit-yaml``,
``mergekit-multi`` and the Python API ``mergekit.merge.run_merge``.

Most users never type ``mergekit-pcb``: they type ``mergekit-yaml``, which merged a
``pcb_rato: 0.3`` typo silently with the default ratio, and answered a missing
``base_model``, ``pcb_ratio: 20`` or a mistyped local path with a traceback. mergekit
has no hook for a method to check its config, so
:mod:`mergekit_pcb.mergekit_internals` wraps ``run_merge``, ``mergekit-yaml``'s command
and ``mergekit-multi``'s ``load_config`` with these functions (armed by
:mod:`mergekit_pcb._autoload`). A config whose ``merge_method`` is
not ``pcb`` passes untouched. A pcb config gets the checks of ``mergekit-pcb merge``
(the same functions) before any model is opened: parameter names with a did-you-mean,
values against each parameter's domain, scopes, ``base_model``, dtypes, keys
mergekit's schema would drop (where the YAML text is at hand), and every model path,
relative ones read from the working directory as mergekit reads them. The output
folder rule (``--overwrite``) stays ``mergekit-pcb merge``'s own.
"""

from __future__ import annotations

from typing import Any

import click
import yaml

from mergekit_pcb.config_check import (
    check_dtypes,
    check_pcb,
    validate_mapping,
)
from mergekit_pcb.config_errors import ConfigError
from mergekit_pcb.model_paths import check_models, merge_config_references, merge_folders

NAME = "pcb"


class PcbConfigError(ConfigError, click.ClickException):
    """A pcb config problem in one line: a ``ValueError`` (a :class:`ConfigError`) to
    Python callers of ``run_merge``, and, being a ``click.ClickException``, printed by
    mergekit's click commands as one ``Error: ...`` line with exit status 1 instead of
    a traceback."""

    def __init__(self, message: str) -> None:
        ConfigError.__init__(self, message)
        click.ClickException.__init__(self, message)


def _config_file() -> str | None:
    """The YAML the running click command read (``config_file`` of mergekit-yaml,
    mergekit-multi and mergekit-pcb merge), to name it and offer its folder in errors;
    None when ``run_merge`` is called from Python."""
    context = click.get_current_context(silent=True)
    value = context.params.get("config_file") if context is not None else None
    return value if isinstance(value, str) else None


def _specs() -> dict:
    from mergekit.merge_methods import get

    return {spec.name: spec for spec in get(NAME).spec.parameters}


def _pcb_mapping(text: Any) -> dict | None:
    """The YAML text as a mapping where it is one that names ``merge_method: pcb``."""
    if not isinstance(text, str):
        return None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return None  # mergekit only copies config_source into the model card
    return raw if isinstance(raw, dict) and raw.get("merge_method") == NAME else None


def check_merge(config: Any, config_source: str | None = None) -> bool:
    """Raise :class:`PcbConfigError` where ``mergekit-pcb merge`` would refuse this
    ``MergeConfiguration``; False (and nothing checked) where it is not a pcb merge."""
    if getattr(config, "merge_method", None) != NAME:
        return False
    config_file = _config_file()
    source = config_file or "config"
    try:
        raw = _pcb_mapping(config_source)
        if raw is not None:  # the text mergekit-yaml read: keys its schema drops, nulls
            validate_mapping(raw, source)
        check_dtypes(config, source)
        check_pcb(config, _specs())
        check_models(merge_config_references(config), merge_folders(config_file))
    except ConfigError as error:
        raise PcbConfigError(str(error)) from None
    return True


def check_config_file(config_file: Any) -> None:
    """``mergekit-yaml``'s YAML, where it is a pcb config, checked as ``mergekit-pcb
    merge`` checks it, before mergekit parses it (its models: in :func:`check_merge`)."""
    try:
        with open(config_file, encoding="utf-8") as file:
            raw = _pcb_mapping(file.read())
    except (OSError, TypeError, UnicodeDecodeError):
        return  # mergekit's own error follows
    if raw is not None:
        try:
            validate_mapping(raw, str(config_file))
        except ConfigError as error:
            raise PcbConfigError(str(error)) from None


def check_multimerge(config_source: str) -> None:
    """Every pcb document of a ``mergekit-multi`` config, before the first merge runs.

    A model named by another document's ``name`` is that merge's output, which does not
    exist yet; it is checked when its merge runs (``run_merge`` checks each merge).
    """
    try:
        documents = list(yaml.safe_load_all(config_source))
    except yaml.YAMLError:
        return  # mergekit's own error follows
    names = {d.get("name") for d in documents if isinstance(d, dict)} - {None}
    config_file = _config_file()
    source = config_file or "config"
    for document in documents:
        if not isinstance(document, dict) or document.get("merge_method") != NAME:
            continue
        document = dict(document)
        name = document.pop("name", None)
        merge = f"merge '{name}'" if name is not None else "the final (unnamed) merge"
        try:
            config = validate_mapping(document, source)
            references = [
                (where, reference)
                for where, reference in merge_config_references(config)
                if str(reference.model.path) not in names
            ]
            check_models(references, merge_folders(config_file))
        except ConfigError as error:
            raise PcbConfigError(f"{merge}: {error}") from None


__all__ = ["PcbConfigError", "check_config_file", "check_merge", "check_multimerge"]
