"""Step 1 of the search: JSONL task data, read once, each line checked, errors with
file and line number."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path


class DataError(ValueError):
    """Raised for a data file the search cannot use; the message names file and line."""


def _check(row: object, kind: str, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if kind in ("loss", "agreement"):
        if not isinstance(row.get("text"), str) or not row["text"]:
            raise DataError(f'{where}: type {kind} needs a non-empty string field "text"')
    elif kind == "exact_match":
        for key in ("prompt", "answer"):
            if not isinstance(row.get(key), str):
                raise DataError(
                    f'{where}: type exact_match needs string fields "prompt" and '
                    f'"answer" ("{key}" is missing or not a string)'
                )
    elif kind == "choice":
        choices, label = row.get("choices"), row.get("label")
        if not isinstance(row.get("prompt"), str):
            raise DataError(f'{where}: type choice needs a string field "prompt"')
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise DataError(f'{where}: "choices" must be a list of at least 2 non-empty strings')
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise DataError(
                f'{where}: "label" must be an integer index into "choices" (0..{len(choices) - 1})'
            )
    return row


@lru_cache(maxsize=64)
def read_jsonl(path: str, kind: str) -> tuple[dict, ...]:
    """All rows of ``path``, validated for task type ``kind``; blank lines are skipped."""
    rows = []
    with Path(path).open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            rows.append(_check(row, kind, where))
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty)")
    return tuple(rows)
