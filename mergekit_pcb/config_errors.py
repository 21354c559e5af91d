"""One wording for config mistakes, shared by ``mergekit-pcb merge`` and ``evolve``.

Each problem becomes one line that names the key at fault and what is allowed, so
the CLI can print it as ``Error: ...`` instead of a traceback or pydantic's
multi-line report.
"""

from __future__ import annotations

import difflib

import yaml
from pydantic import ValidationError


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the key and what is allowed."""


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def load_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a YAML mapping at the top level, got {data!r}")
    return data


def one_line(error: BaseException) -> str:
    """Any exception as ``Type: message`` on one line, for a CLI's ``Error: ...``."""
    text = " ".join(str(error).split()) or repr(error)
    return f"{type(error).__name__}: {text}"


def format_validation_error(error: ValidationError) -> str:
    """pydantic's multi-line report as one line: 'location: message' per problem."""
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "config"
        parts.append(f"{location}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
