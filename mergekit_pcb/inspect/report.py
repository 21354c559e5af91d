"""report.json: every number of the page, assembled from the per-tensor records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mergekit_pcb import chosen_scales
from mergekit_pcb.inspect import numbers, summary
from mergekit_pcb.inspect.measure import Sample, TensorRecord
from mergekit_pcb.inspect.planning import EMBEDDINGS, HEAD, Plan, label_models
from mergekit_pcb.kernel.auto_scale import AUTO

FORMAT = 1


def _values(records: Sequence[TensorRecord], key: str) -> Any:
    """One value, or the range where gradients or filters vary it between tensors."""
    found = sorted({getattr(r, key) for r in records})
    if len(found) == 1:
        return found[0]
    return {"min": found[0], "max": found[-1]} if found else None


def _lambda(records: Sequence[TensorRecord]) -> Any:
    """As :func:`_values`; where ``lambda: auto`` ran, the spread of what it chose."""
    auto = [r for r in records if r.lambda_ == AUTO]
    if not auto:
        return _values(records, "lambda_")
    chosen = chosen_scales.spread({r.name: r.lambda_chosen for r in auto}) or {}
    fixed = [r for r in records if r.lambda_ != AUTO]
    return {
        "auto": {"tensors": len(auto), **chosen},
        "fixed": _values(fixed, "lambda_") if fixed else None,
    }


def _groups(records: Sequence[TensorRecord], plan: Plan, labels: Sequence[str]) -> list[dict]:
    modules = len(plan.layers)
    out = []
    for module, count in plan.layers.items():
        prefix = f"{module}/" if modules > 1 else ""
        mine = [r for r in records if r.module == module]
        parts = [(EMBEDDINGS, [EMBEDDINGS])]
        parts += numbers.layer_groups(count)
        parts.append((HEAD, [HEAD]))
        for label, members in parts:
            subset = [r for r in mine if r.layer in members]
            if not subset:
                continue
            group = {"label": prefix + label, "layers": members, **numbers.totals(subset, labels)}
            components = dict.fromkeys(r.component for r in subset)
            group["components"] = {
                c: numbers.totals([r for r in subset if r.component == c], labels)
                for c in components
            }
            out.append(group)
    return out


def build(
    plan: Plan,
    records: Sequence[TensorRecord],
    sample: Sample,
    *,
    config_path: str,
    pattern: str | None,
    statistics: dict | None,
) -> dict[str, Any]:
    labels = label_models(plan.experts)
    modules = len(plan.layers)
    layers = []
    for module, layer in numbers.ordered_layers(records):
        subset = [r for r in records if (r.module, r.layer) == (module, layer)]
        layers.append(
            {
                "label": numbers.layer_label(module, layer, modules),
                "module": module,
                "layer": layer,
                **numbers.totals(subset, labels),
            }
        )
    model_cuts = None
    if statistics is not None:
        model_cuts = {}
        for e, model in enumerate(plan.experts):
            row = statistics.get(model)
            if row is not None:
                model_cuts[e] = row.threshold / row.top if row.top > 0 else None
    weights = {
        label: sorted({r.weights[i] for r in records for i, x in enumerate(r.experts) if x == e})
        for e, label in enumerate(labels)
    }
    whole = numbers.totals(records, labels)
    ratios = [v["merged_norm_ratio"] for v in whole["experts"].values() if v["merged_norm_ratio"]]
    # The lambda that would give the merged task vector the experts' mean norm.
    whole["lambda_for_mean_norm"] = sum(1 / r for r in ratios) / len(ratios) if ratios else None
    elements = sum(r.elements for r in records)
    report: dict[str, Any] = {
        "format": FORMAT,
        "tool": "mergekit-pcb inspect",
        "config": config_path,
        "scope": plan.scope,
        "tensors_pattern": pattern,
        "tensors_inspected": len(records),
        "tensors_merged_by_pcb": len(plan.tensors),
        "experts": [
            {
                "label": label,
                "model": str(model),
                "weight": (w[0] if len(w) == 1 else {"min": w[0], "max": w[-1]}) if w else None,
            }
            for label, model, w in zip(labels, plan.experts, weights.values(), strict=True)
        ],
        "base_model": [str(b) for b in plan.base_models],
        "parameters": {
            "pcb_ratio": _values(records, "pcb_ratio"),
            "clamp_ratio": _values(records, "clamp_ratio"),
            "lambda": _lambda(records),
            "pcb_scope": plan.scope,
        },
        "whole_model": whole,
        "layers": layers,
        "groups": _groups(records, plan, labels),
        "components": {
            c: numbers.totals([r for r in records if r.component == c], labels)
            for c in dict.fromkeys(r.component for r in records)
        },
        "sweep": numbers.sweep(records, sample, labels, exact=statistics is None),
        "scores": numbers.histograms(records, sample, labels, model_cuts),
        "sampled": {
            "positions": sample.positions,
            "per_tensor": sample.per_tensor,
            "elements": elements,
            "histograms": True,
            "sweep": statistics is not None,
        },
        "tensors": [r.to_json() for r in records],
    }
    report["summary"] = summary.sentences(report)
    return report
