"""What ``lambda: auto`` and ``pcb_ratio: auto`` chose: one line when a merge's last
choice is known, a section of the model card, and :func:`collect` (the scales) for code
that merges in-process.

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
_BY_EXECUTOR: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # -> _Choices
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


def ratio_summary(ratios: dict[str, float | None]) -> str:
    """How often ``pcb_ratio: auto`` chose each level."""
    counts: dict[float, int] = {}
    for value in ratios.values():
        if value is not None:
            counts[value] = counts.get(value, 0) + 1
    if not counts:
        return "pcb_ratio: auto had nothing to choose"
    parts = ", ".join(f"{r:g} for {c}" for r, c in sorted(counts.items(), key=lambda x: -x[1]))
    return f"pcb_ratio: auto chose {parts} tensor{'s' * (sum(counts.values()) != 1)}"


class _Choices:
    """One merge's choices: scales of the tensors that asked lambda: auto, levels of
    those that asked pcb_ratio: auto (None: no expert changed the tensor)."""

    def __init__(self) -> None:
        self.scales: dict[str, float | None] = {}
        self.ratios: dict[str, float | None] = {}
        self.seen: set[str] = set()

    def line(self) -> str:
        parts = [summary(self.scales)] if self.scales else []
        parts += [ratio_summary(self.ratios)] if self.ratios else []
        return "; ".join(parts)


def _expected(executor: Any) -> int:
    count = _EXPECTED.get(executor)
    if count is None:
        count = sum(
            1
            for task in mergekit_internals.merge_method_tasks(executor, "pcb")
            if AUTO in (task.parameters.get("lambda"), task.parameters.get("pcb_ratio"))
        )
        _EXPECTED[executor] = count
    return count


NOT_ASKED = object()  # a parameter that was not auto for this tensor


def record(
    tensor: str,
    scale: float | None | object = NOT_ASKED,
    ratio: float | None | object = NOT_ASKED,
) -> None:
    """Keep what auto chose for ``tensor``: ``scale`` where lambda was auto, ``ratio``
    where pcb_ratio was (``NOT_ASKED`` for a parameter that was not auto; None: no expert
    changed the tensor, the base is kept). The merge's last one writes the line."""
    _, executor = mergekit_internals.running_executor()
    with _LOCK:
        if scale is not NOT_ASKED:
            for collected in _COLLECTORS:
                collected.append((tensor, scale))
        if executor is None:
            return
        if not _BY_EXECUTOR:  # first auto of this process under mergekit: the card learns it
            mergekit_internals.extend_model_card(card_section)
        choices = _BY_EXECUTOR.setdefault(executor, _Choices())
        if scale is not NOT_ASKED:
            choices.scales[tensor] = scale
        if ratio is not NOT_ASKED:
            choices.ratios[tensor] = ratio
        choices.seen.add(tensor)
        done = len(choices.seen) == _expected(executor)
    if done:
        _write(f"pcb: {choices.line()}")


def _write(line: str) -> None:
    from tqdm import tqdm  # above mergekit's progress bar, not through it

    tqdm.write(line, file=sys.stderr)


def of(executor: Any) -> dict[str, float | None]:
    """The scales lambda: auto chose in the merge ``executor`` ran."""
    with _LOCK:
        found = _BY_EXECUTOR.get(executor)
        return dict(found.scales) if found else {}


def _cell(value: float | None | object) -> str:
    if value is NOT_ASKED:
        return "-"
    return "unchanged" if value is None else f"{value:.4g}"


def card_section(executor: Any) -> str:
    """Markdown for the model card of the merge ``executor`` ran ('' without auto)."""
    with _LOCK:
        found = _BY_EXECUTOR.get(executor)
    if not found:
        return ""
    rows = "\n".join(
        f"| `{name}` | {_cell(found.scales.get(name, NOT_ASKED))} | "
        f"{_cell(found.ratios.get(name, NOT_ASKED))} |"
        for name in sorted(found.seen)
    )
    return (
        "\n### lambda: auto\n\n"
        f"pcb's {found.line()}. lambda: auto is, per tensor, the scale at which the merged "
        "task vector best matches the sum of the task vectors, with what the experts share "
        "counted once; pcb_ratio: auto the level whose merge points most along that sum "
        "(docs/lambda-auto.md of mergekit-pcb).\n\n"
        "<details><summary>per tensor</summary>\n\n| tensor | lambda | pcb_ratio |\n"
        f"|---|---|---|\n{rows}\n\n</details>\n"
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
