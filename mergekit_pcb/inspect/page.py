"""report.html: one self-contained page (images as data URIs, inline CSS, no script).

Every number shown is read from the report dict that becomes report.json; the page
only formats it.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from mergekit_pcb.inspect.summary import number, percent, ratio_text

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto;
       max-width: 1180px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 0.9em; }
.summary { background: #f4f7fb; border-left: 4px solid #4a78b5; padding: 0.6em 1.2em; }
.summary li { margin: 0.3em 0; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.55em; text-align: right; }
th { background: #f3f3f3; }
td.name, th.name { text-align: left; }
img { max-width: 100%; height: auto; display: block; margin: 0.6em 0; }
.note { color: #555; font-size: 0.88em; }
details { margin: 0.8em 0; }
code { background: #f3f3f3; padding: 0 0.2em; }
.matrices { display: flex; flex-wrap: wrap; gap: 0 2em; }
"""


def _cell(value, form=percent) -> str:
    return f"<td>{escape(form(value))}</td>"


def _sci(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _table(header: list[str], rows: list[str], names: int = 1) -> str:
    head = "".join(
        f'<th class="name">{escape(h)}</th>' if i < names else f"<th>{escape(h)}</th>"
        for i, h in enumerate(header)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _image(folder: Path, name: str, alt: str) -> str:
    data = base64.b64encode((folder / name).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def _experts_table(report: dict) -> str:
    whole = report["whole_model"]["experts"]
    rows = []
    for expert in report["experts"]:
        label = expert["label"]
        numbers = whole.get(label)
        if numbers is None:
            continue
        weight = expert["weight"]
        weight = ratio_text(weight) if weight is not None else "n/a"
        rows.append(
            f'<tr><td class="name">{escape(label)}</td>'
            f'<td class="name">{escape(expert["model"])}</td><td>{escape(weight)}</td>'
            + _cell(numbers["kept"])
            + _cell(numbers["wins"])
            + _cell(numbers["wins_of_kept"])
            + _cell(numbers["mean_abs_tau"], _sci)
            + _cell(numbers["merged_norm_ratio"], number)
            + "</tr>"
        )
    header = [
        "expert",
        "model",
        "weight",
        "kept (W > 0)",
        "largest W",
        "largest W, of kept entries",
        "mean |task vector|",
        "|m| / |task vector| (lambda 1)",
    ]
    return _table(header, rows, names=2)


def _overall_table(report: dict) -> str:
    whole = report["whole_model"]
    row = (
        f"<tr><td>{whole['tensors']}</td><td>{whole['elements']:,}</td>"
        + _cell(whole["sign_conflict"])
        + _cell(whole["conflict_after_drop"])
        + _cell(whole["no_expert_keeps"])
        + _cell(whole["changed"])
        + "</tr>"
    )
    header = [
        "tensors",
        "entries",
        "task vectors disagree in sign",
        "kept entries disagree in sign",
        "no expert keeps",
        "changed vs base",
    ]
    return _table(header, [row], names=0)


def _layer_expert_table(report: dict) -> str:
    labels = [e["label"] for e in report["experts"]]
    header = ["layer", "entries"]
    for label in labels:
        header += [
            f"{label}: kept",
            f"{label}: largest W",
            f"{label}: mean |tau|",
            f"{label}: |m|/|tau|",
        ]
    rows = []
    for layer in report["layers"]:
        cells = f'<td class="name">{escape(layer["label"])}</td><td>{layer["elements"]:,}</td>'
        for label in labels:
            numbers = layer["experts"].get(label, {})
            cells += (
                _cell(numbers.get("kept"))
                + _cell(numbers.get("wins"))
                + _cell(numbers.get("mean_abs_tau"), _sci)
                + _cell(numbers.get("merged_norm_ratio"), number)
            )
        rows.append(f"<tr>{cells}</tr>")
    return _table(header, rows)


def _layer_table(report: dict) -> str:
    header = [
        "layer",
        "task vectors disagree in sign",
        "kept entries disagree in sign",
        "no expert keeps",
        "changed vs base",
    ]
    rows = [
        f'<tr><td class="name">{escape(layer["label"])}</td>'
        + _cell(layer["sign_conflict"])
        + _cell(layer["conflict_after_drop"])
        + _cell(layer["no_expert_keeps"])
        + _cell(layer["changed"])
        + "</tr>"
        for layer in report["layers"]
    ]
    return _table(header, rows)


def _matrix(report: dict, title: str, matrix: list) -> str:
    labels = [e["label"] for e in report["experts"]]
    rows = [
        f'<tr><td class="name">{escape(label)}</td>'
        + "".join(_cell(v, number) for v in row)
        + "</tr>"
        for label, row in zip(labels, matrix, strict=True)
    ]
    return f"<div><p><b>{escape(title)}</b></p>{_table(['', *labels], rows)}</div>"


def _sweep_table(report: dict) -> str:
    data = report["sweep"]
    labels = list(data["kept"])
    header = ["pcb_ratio", *(f"{label}: kept" for label in labels), "kept entries disagree"]
    rows = []
    for k, ratio in enumerate(data["ratios"]):
        rows.append(
            f"<tr><td>{ratio:g}</td>"
            + "".join(_cell(data["kept"][label][k]) for label in labels)
            + _cell(data["conflict_after_drop"][k])
            + "</tr>"
        )
    return _table(header, rows, names=0)


def _cuts_table(report: dict) -> str:
    cuts = report["scores"]["cuts"]
    rows = []
    for label, cut in cuts.items():
        if "exact" in cut:
            text = [_sci(cut["exact"]), "", ""]
        else:
            text = [_sci(cut["median"]), _sci(cut["p10"]), _sci(cut["p90"])]
        rows.append(
            f'<tr><td class="name">{escape(label)}</td>'
            + "".join(f"<td>{escape(t)}</td>" for t in text)
            + "</tr>"
        )
    header = ["expert", "cut t / max B", "10th percentile", "90th percentile"]
    return _table(header, rows)


def _tensor_table(report: dict) -> str:
    labels = [e["label"] for e in report["experts"]]
    header = ["tensor", "layer", "entries", *(f"{label}: kept" for label in labels)]
    header += ["disagree in sign", "kept disagree", "changed"]
    rows = []
    for t in report["tensors"]:
        kept = dict.fromkeys(range(len(labels)))
        for i, e in enumerate(t["experts"]):
            kept[e] = t["kept"][i] / t["elements"] if t["elements"] else None
        d = t["elements"] or 1
        rows.append(
            f'<tr><td class="name">{escape(t["name"])}</td><td>{escape(str(t["layer"]))}</td>'
            f"<td>{t['elements']:,}</td>"
            + "".join(_cell(kept[e]) for e in range(len(labels)))
            + _cell(t["conflict"] / d)
            + _cell(t["kept_conflict"] / d)
            + _cell(t["changed"] / d)
            + "</tr>"
        )
    return _table(header, rows)


def render(report: dict, folder: Path) -> str:
    """The page's HTML; the PNGs named in the report must already be in ``folder``."""
    params = report["parameters"]
    sampled = report["sampled"]
    sample_note = (
        f"The score histograms are drawn from a sample of {sampled['positions']:,} positions "
        f"(up to {sampled['per_tensor']:,} per tensor, chosen uniformly at random and "
        f"weighted by the tensor's size) out of {sampled['elements']:,} entries."
    )
    if sampled["sweep"]:
        sweep_note = (
            "With pcb_scope: model each ratio's cut is taken over the whole model, which would "
            "need another pass over every tensor per ratio: the sweep's cuts and counts come "
            "from the same sample. The numbers at the configured pcb_ratio elsewhere on this "
            "page are exact."
        )
    else:
        sweep_note = "The sweep's counts are exact (each tensor's own cut, from the same scores)."
    scope_note = (
        "pcb_scope: model (clip bounds, cut and max B over each expert's whole model)"
        if report["scope"] == "model"
        else "pcb_scope: tensor (clip bounds, cut and max B per tensor)"
    )
    narrowed = ""
    if report["tensors_pattern"] is not None:
        narrowed = (
            f" Only the {report['tensors_inspected']} of {report['tensors_merged_by_pcb']} "
            f"tensors whose name matches <code>{escape(report['tensors_pattern'])}</code> are "
            "shown."
        )
    summary = "".join(f"<li>{escape(s['text'])}</li>" for s in report["summary"])
    groups = "".join(_matrix(report, g["label"], g["cosine"]) for g in report["groups"])
    image = {name: _image(folder, name, name) for name in report["images"]}
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>PCB inspection: {escape(report["config"])}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>PCB inspection of <code>{escape(report["config"])}</code></h1>
<p class="meta">pcb_ratio {escape(ratio_text(params["pcb_ratio"]))},
clamp_ratio {escape(ratio_text(params["clamp_ratio"]))},
lambda {escape(ratio_text(params["lambda"]))}, {escape(scope_note)}.
Base model: {escape(", ".join(report["base_model"]))}.
{report["tensors_inspected"]} tensors, {report["whole_model"]["elements"]:,} entries.{narrowed}</p>

<h2>Summary</h2>
<ul class="summary">{summary}</ul>

<h2>Whole model</h2>
{_experts_table(report)}
{_overall_table(report)}
<p class="note">PCB gives each expert's entries a balancing score B (its size within the
expert times its agreement with the experts' sum) and keeps the top pcb_ratio share of
them with a weight W &gt; 0. <i>Largest W</i>: entries where this expert carries the largest
weight (ties go to the first expert in PCB's canonical order). <i>Disagree in sign</i>: some
task vector is positive and another negative at that entry; <i>kept entries disagree</i>:
the same among the experts that keep it. <i>Changed vs base</i>: the written value differs
from the base's, both in the output dtype.</p>

<h2>Per layer and expert</h2>
{image["experts.png"]}
{_layer_expert_table(report)}
{image["layers.png"]}
{_layer_table(report)}

<h2>Task-vector similarity</h2>
<p class="note">Cosine similarity of the experts' task vectors (fine-tuned minus base),
over the whole model and per group of layers.</p>
{image["similarity.png"]}
<div class="matrices">
{_matrix(report, "whole model", report["whole_model"]["cosine"])}
{groups}
</div>

<h2>Balancing scores B and the cut</h2>
<p class="note">Each expert's scores over its maximum ({
        escape("the whole model's" if report["scope"] == "model" else "each tensor's")
    }): entries right
of the cut are kept. {escape(sample_note)}</p>
{image["scores.png"]}
{_cuts_table(report)}

<h2>How the kept share and the conflicts move with pcb_ratio</h2>
<p class="note">From the same scores, without another read of the models.
{escape(sweep_note)} A kept share below pcb_ratio means ties at the cut (entries an expert
left unchanged score 0).</p>
{image["sweep.png"]}
{_sweep_table(report)}

<h2>Norm of the merged task vector</h2>
<p class="note">|m| / |expert's task vector| at lambda 1, per layer (the per-layer table
above holds the numbers). PCB keeps each expert's top entries and averages them where
several keep the same one; the merge adds lambda times m to the base, so where this ratio
is below 1 a lambda above 1 brings the merged change to the experts' scale.</p>
{image["norms.png"]}

<h2>Per tensor</h2>
<details><summary>{report["tensors_inspected"]} tensors</summary>
{_tensor_table(report)}
</details>

<p class="note">Written by mergekit-pcb inspect; every number on this page is in
report.json beside it.</p>
</body>
</html>
"""


def write(report: dict, folder: Path) -> Path:
    path = folder / "report.html"
    path.write_text(render(report, folder), encoding="utf-8")
    return path
