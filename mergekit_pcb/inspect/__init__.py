"""``mergekit-pcb inspect``: where the experts agree, conflict or do nothing, before a merge.

The config is planned by mergekit exactly as a merge plans it (:mod:`.planning`),
every tensor's group goes through PCB's own kernel steps (:mod:`.measure`), and the
counts become report.json (:mod:`.numbers`, :mod:`.summary`, :mod:`.report`), PNGs
(:mod:`.plots`) and one self-contained page (:mod:`.page`). No model is written.

Memory: one tensor's task vectors and scores at a time (as a stored-tau merge) plus a
bounded sample of positions; ``pcb_scope: model`` first runs the whole-model
statistics passes of :mod:`mergekit_pcb.model_scope`, as the merge does.

Submodules are imported when :func:`run` is called, so that the CLI can check for
matplotlib (:func:`mergekit_pcb.inspect.plots.require`) before loading torch and mergekit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DEFAULT_SAMPLE = 4096  # positions per tensor kept for the histograms (and model-scope sweep)


class InspectError(ValueError):
    """A config or option that inspect cannot run on; the message is one line."""


def run(
    config: Any,
    out: Path,
    *,
    config_path: str,
    device: str = "cpu",
    pattern: str | None = None,
    sample: int = DEFAULT_SAMPLE,
    trust_remote_code: bool = False,
    progress: Callable[[Iterator, int, str], Iterator] | None = None,
) -> dict:
    """Inspect ``config`` (a validated ``MergeConfiguration``) into ``out``; the report."""
    from mergekit.options import MergeOptions

    from mergekit_pcb import model_scope
    from mergekit_pcb.inspect import measure as _measure
    from mergekit_pcb.inspect import page, planning, plots
    from mergekit_pcb.inspect import report as _report

    plots.require()
    options = MergeOptions(device=device, trust_remote_code=trust_remote_code, quiet=True)
    plan = planning.plan(config, options)
    if not plan.tensors:
        raise InspectError(
            f"{config_path}: no tensor is merged by pcb; allowed: a config with merge_method: pcb"
        )
    ratio_auto = [t.name for t in plan.tensors if t.task.parameters["pcb_ratio"] == "auto"]
    if ratio_auto:  # its sweep and histograms are per level; not built for a chosen level
        raise InspectError(
            f"{config_path}: pcb_ratio is auto for '{ratio_auto[0]}', which inspect does not "
            "take yet; allowed: a number for pcb_ratio (inspect's sweep shows every level)"
        )
    selected = planning.select(plan.tensors, pattern)
    if not selected:
        example = plan.tensors[0].name
        raise InspectError(
            f"--tensors {pattern!r} matches none of the {len(plan.tensors)} tensors pcb "
            f"merges (e.g. '{example}'); allowed: a Python regular expression found in "
            "a tensor name"
        )

    def bar(total: int, title: str):
        if progress is None:
            return None
        return lambda items: progress(items, total, title)

    statistics = None
    if plan.scope == "model":  # over every pcb tensor, whatever --tensors selects
        statistics = model_scope.compute(
            plan.executor,
            [t.task for t in plan.tensors],
            each_pass=bar(len(plan.tensors), "pcb_scope: model statistics pass"),
        )
    index = {model: i for i, model in enumerate(plan.experts)}
    samples = _measure.Sample(sample)
    records = [
        _measure.measure(planned, group, index, samples, statistics)
        for planned, group in planning.groups(plan, selected, bar(len(selected), "inspect"))
    ]
    order = {t.name: i for i, t in enumerate(plan.tensors)}
    records.sort(key=lambda r: order[r.name])
    report = _report.build(
        plan, records, samples, config_path=config_path, pattern=pattern, statistics=statistics
    )
    out.mkdir(parents=True, exist_ok=True)
    report["images"] = plots.draw(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    page.write(report, out)
    return report


__all__ = ["DEFAULT_SAMPLE", "InspectError", "run"]
