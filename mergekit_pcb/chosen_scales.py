"""The scales ``lambda: auto`` chose: one line when a merge's last one is known, a
section of the model card, and :func:`collect` for code that merges in-process.

Why per executor: mergekit merges each output tensor in its own ``merge_group`` call,
with no hook at the end of a merge, so the records are kept with the ``Executor``
that runs the calls (:func:`mergekit_internals.running_executor`); the line is
written when the last tensor that asked for ``auto`` (counted in the executor's task
universe) reports, and the card writer reads the same records.
"""

from __future__ import annotations

import statistics
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mergekit_pcb import mergekit_internals
from mergekit_pcb.kernel.auto_scale import AUTO

_LOCK = threading.Lock()
_BY_EXECUTOR: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # -> {tensor: scale}
_EXPECTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # -> tensors asking auto
_COLLECTORS: list[list[tuple[str, float | None]]] = []


def spread(scales: dict[str, float | None]) -> dict[str, float] | None:
    """min / median / max of the chosen scales (None for tensors no expert changed)."""
    values = sorted(v for v in scales.values() if v is not None)
    if not values:
        return None
    return {"min": values[0], "median": statistics.median(values), "max": values[-1]}


def summary(scales: dict[str, float | None]) -> str:
    """One line for a log or a table: the spread over the tensors auto scaled."""
    s = spread(scales)
    same = sum(v is None for v in scales.values())
    unchanged = f"; {same} unchanged tensor{'s' * (same != 1)} kept the base" if same else ""
    if s is None:
        return f"lambda: auto had nothing to scale{unchanged}"
    n = len(scales) - same
    return (
        f"lambda: auto chose {s['median']:.3g} (median; min {s['min']:.3g}, "
        f"max {s['max']:.3g}) over {n} tensor{'s' * (n != 1)}{unchanged}"
    )


def _expected(executor: Any) -> int:
    count = _EXPECTED.get(executor)
    if count is None:
        count = sum(
            1
            for task in mergekit_internals.merge_method_tasks(executor, "pcb")
            if task.parameters.get("lambda") == AUTO
        )
        _EXPECTED[executor] = count
    return count


def record(tensor: str, scale: float | None) -> None:
    """Keep the scale auto chose for ``tensor`` (None: no expert changed it, the base is
    kept); the merge's last one writes the line."""
    _, executor = mergekit_internals.running_executor()
    with _LOCK:
        for collected in _COLLECTORS:
            collected.append((tensor, scale))
        if executor is None:
            return
        if not _BY_EXECUTOR:  # first auto of this process under mergekit: the card learns it
            mergekit_internals.extend_model_card(card_section)
        scales = _BY_EXECUTOR.setdefault(executor, {})
        scales[tensor] = scale
        done = len(scales) == _expected(executor)
    if done:
        _write(f"pcb: {summary(scales)}")


def _write(line: str) -> None:
    from tqdm import tqdm  # above mergekit's progress bar, not through it

    tqdm.write(line, file=sys.stderr)


def of(executor: Any) -> dict[str, float | None]:
    with _LOCK:
        return dict(_BY_EXECUTOR.get(executor, {}))


def card_section(executor: Any) -> str:
    """Markdown for the model card of the merge ``executor`` ran ('' without auto)."""
    scales = of(executor)
    if not scales:
        return ""
    rows = "\n".join(
        f"| `{name}` | {'unchanged' if value is None else f'{value:.4g}'} |"
        for name, value in sorted(scales.items())
    )
    return (
        "\n### lambda: auto\n\n"
        f"pcb's {summary(scales)}: per tensor, the scale at which the merged task vector "
        "best matches the sum of the task vectors (least squares).\n\n"
        f"<details><summary>per tensor</summary>\n\n| tensor | lambda |\n|---|---|\n{rows}\n\n"
        "</details>\n"
    )


@contextmanager
def collect() -> Iterator[list[tuple[str, float | None]]]:
    """(tensor, scale) of every choice auto makes inside the block, in order, in or out
    of a mergekit executor."""
    collected: list[tuple[str, float | None]] = []
    with _LOCK:
        _COLLECTORS.append(collected)
    try:
        yield collected
    finally:
        with _LOCK:
            _COLLECTORS.remove(collected)
