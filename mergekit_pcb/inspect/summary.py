"""The plain-language summary at the top of the page, written from report.json's numbers.

Every sentence records the JSON paths of the numbers it states (``values``), so a
test can check that the page says what the JSON holds.
"""

from __future__ import annotations

import math
from typing import Any

# A layer group x component cell must hold at least this share of the model's entries
# to be named in the summary (tiny norm vectors would win trivially).
MIN_CELL_SHARE = 0.01


def percent(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == 0 or value >= 0.1:
        return f"{value:.0%}"
    if value >= 0.01:
        return f"{value:.1%}"
    return f"{value:.2%}"


def number(value: float | None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def ratio_text(value: Any) -> str:
    if isinstance(value, dict) and "auto" in value:  # lambda: auto, and what it chose
        auto = value["auto"]
        text = f"auto on {auto['tensors']} tensors"
        if "median" in auto:
            text += f" (chose {auto['median']:.3g}, from {auto['min']:.3g} to {auto['max']:.3g})"
        return text + (f", else {ratio_text(value['fixed'])}" if value["fixed"] is not None else "")
    if isinstance(value, dict):
        return f"{value['min']:g}-{value['max']:g} (varies by tensor)"
    return f"{value:g}"


def get(report: dict, path: list) -> Any:
    node = report
    for key in path:
        node = node[key]
    return node


class _Sentence:
    def __init__(self, report: dict):
        self.report = report
        self.values: list[dict] = []

    def take(self, path: list, form=percent) -> str:
        value = get(self.report, path)
        shown = form(value)
        self.values.append({"path": path, "value": value, "shown": shown})
        return shown

    def done(self, text: str) -> dict:
        return {"text": text, "values": self.values}


def _entries(component: str) -> str:
    """'MLP entries', or 'entries of the embeddings' for the weights outside the layers."""
    if component in ("embeddings", "head"):
        return f"entries of the {component}"
    return f"{component} entries"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _kept(report: dict) -> dict:
    s = _Sentence(report)
    parts = [
        f"{label} {s.take(['whole_model', 'experts', label, 'kept'])}"
        for label in report["whole_model"]["experts"]
    ]
    nobody = s.take(["whole_model", "no_expert_keeps"])
    changed = s.take(["whole_model", "changed"])
    return s.done(
        f"PCB keeps (W > 0) {_join(parts)} of each expert's entries at pcb_ratio "
        f"{ratio_text(report['parameters']['pcb_ratio'])}; {nobody} of all entries are kept "
        f"by no expert and stay at the base value, and the merge changes {changed} of them."
    )


def _below_ratio(report: dict) -> list[dict]:
    """Experts that keep clearly fewer entries than pcb_ratio because their cut is a tie."""
    ratio = report["parameters"]["pcb_ratio"]
    if isinstance(ratio, dict):
        return []
    s = _Sentence(report)
    found = []
    for label, numbers in report["whole_model"]["experts"].items():
        cut = report["scores"]["cuts"].get(label, {})
        at = cut.get("exact", cut.get("median"))
        if numbers["kept"] is not None and numbers["kept"] < 0.9 * ratio and at == 0:
            found.append(f"{label} {s.take(['whole_model', 'experts', label, 'kept'])}")
    if not found:
        return []
    return [
        s.done(
            f"Fewer entries than pcb_ratio {ratio:g} are kept ({_join(found)}): the cut falls "
            "on a tie at score 0 (entries an expert left unchanged score 0), and every entry "
            "tied at the cut is dropped."
        )
    ]


def _winners(report: dict) -> list[dict]:
    experts = report["whole_model"]["experts"]
    if len(experts) < 2:
        return []
    s = _Sentence(report)
    parts = [
        f"{label}'s on {s.take(['whole_model', 'experts', label, 'wins_of_kept'])}"
        for label in experts
    ]
    overall = s.done(
        f"Where some expert keeps an entry, the largest weight W is {_join(parts)} of them."
    )
    elements = report["whole_model"]["elements"]
    best = None
    for g, group in enumerate(report["groups"]):
        for name, cell in group["components"].items():
            if cell["elements"] < MIN_CELL_SHARE * elements:
                continue
            for label, values in cell["experts"].items():
                value = values["wins_of_kept"]
                if value is not None and (best is None or value > best[0]):
                    best = (value, g, name, label)
    if best is None:
        return [overall]
    _, g, name, label = best
    s = _Sentence(report)
    won = s.take(["groups", g, "components", name, "experts", label, "wins_of_kept"])
    where = report["groups"][g]["label"]
    if where in ("embeddings", "head"):
        text = f"{label} wins {won} of the {_entries(where)} that some expert keeps."
    else:
        text = f"{label} wins {won} of the {_entries(name)} that some expert keeps in {where}."
    cell = s.done(text)
    return [overall, cell]


def _conflicts(report: dict) -> list[dict]:
    labels = [e["label"] for e in report["experts"]]
    if len(labels) < 2:
        return []
    elements = report["whole_model"]["elements"]
    best = None
    for name, cell in report["components"].items():
        if cell["elements"] < MIN_CELL_SHARE * elements:
            continue
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                value = cell["pair_sign_conflict"][i][j]
                if value is not None and (best is None or value > best[0]):
                    best = (value, name, i, j)
    s = _Sentence(report)
    before = s.take(["whole_model", "sign_conflict"])
    after = s.take(["whole_model", "conflict_after_drop"])
    text = (
        f"Before the drop, the experts' task vectors disagree in sign on {before} of all "
        f"entries; among the experts that keep an entry, they disagree on {after}."
    )
    if best is not None:
        _, name, i, j = best
        pair = s.take(["components", name, "pair_sign_conflict", i, j])
        text += f" {labels[i]} and {labels[j]} conflict in sign on {pair} of {_entries(name)}."
    return [s.done(text)]


def _similarity(report: dict) -> list[dict]:
    labels = [e["label"] for e in report["experts"]]
    pairs = [
        (report["whole_model"]["cosine"][i][j], i, j)
        for i in range(len(labels))
        for j in range(i + 1, len(labels))
        if report["whole_model"]["cosine"][i][j] is not None
    ]
    if not pairs:
        return []
    s = _Sentence(report)
    high, i, j = max(pairs)
    shown = s.take(["whole_model", "cosine", i, j], number)
    if abs(high) < 0.1:
        meaning = "nearly orthogonal: the experts changed unrelated directions"
    elif high > 0.5:
        meaning = "similar: they moved the base in much the same direction"
    else:
        meaning = "partly aligned"
    text = f"Task-vector cosine similarity: {labels[i]}-{labels[j]} {shown} ({meaning})"
    if len(pairs) > 1:
        low, a, b = min(pairs)
        text += (
            f"; lowest {labels[a]}-{labels[b]} {s.take(['whole_model', 'cosine', a, b], number)}"
        )
    return [s.done(text + ".")]


def _norms(report: dict) -> list[dict]:
    experts = report["whole_model"]["experts"]
    ratios = {k: v["merged_norm_ratio"] for k, v in experts.items() if v["merged_norm_ratio"]}
    if not ratios:
        return []
    s = _Sentence(report)
    parts = [
        f"{s.take(['whole_model', 'experts', label, 'merged_norm_ratio'], number)}x {label}'s"
        for label in ratios
    ]
    matching = s.take(["whole_model", "lambda_for_mean_norm"], lambda v: f"{v:.1f}")
    text = (
        f"At lambda 1 the merged task vector has {_join(parts)} norm; lambda multiplies "
        f"it, so lambda near {matching} would give it the experts' mean norm."
    )
    lam = report["parameters"]["lambda"]
    if not isinstance(lam, dict) or "auto" in lam:
        text += f" Configured: lambda {ratio_text(lam)}."
    return [s.done(text)]


def sentences(report: dict) -> list[dict]:
    if not report["whole_model"]["elements"]:
        return [{"text": "No tensor was inspected.", "values": []}]
    found = [_kept(report)]
    found += _below_ratio(report)
    found += _winners(report)
    found += _conflicts(report)
    found += _similarity(report)
    found += _norms(report)
    return [f for f in found if not any(_bad(v["value"]) for v in f["values"])]


def _bad(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))
