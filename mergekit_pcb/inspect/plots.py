"""The report's PNGs, drawn from report.json's numbers (nothing is computed here).

matplotlib's object API (``Figure``) draws without pyplot's global state or a GUI
backend, so this works in threads and on machines without a display.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

MISSING = (
    "mergekit-pcb inspect draws its plots with matplotlib, which is not installed; "
    "allowed: pip install 'mergekit-pcb[plot]'"
)


def require() -> None:
    """Raise ImportError with the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(MISSING) from None


def _figure(width: float, height: float, columns: int = 1, rows: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, [a for row in axes for a in row]


def _percent_axis(ax) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.yaxis.set_major_formatter(PercentFormatter(1.0))


def _values(rows: list, get: Callable) -> list:
    return [float("nan") if (v := get(r)) is None else v for r in rows]


def _layer_axis(ax, labels: list[str]) -> None:
    ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 12 else 0)
    ax.set_xlabel("layer")


def experts(report: dict, path: Path) -> None:
    layers = report["layers"]
    labels = [e["label"] for e in report["experts"]]
    x = list(range(len(layers)))
    figure, axes = _figure(11, 3.6, columns=3)
    panels = (
        ("kept", "entries kept (W > 0)"),
        ("wins", "entries where W is the largest"),
        ("mean_abs_tau", "mean |task vector|"),
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        for label in labels:
            ys = _values(layers, lambda r, lab=label, k=key: r["experts"].get(lab, {}).get(k))
            ax.plot(x, ys, marker="o", markersize=3, label=label)
        ax.set_title(title)
        _layer_axis(ax, [r["label"] for r in layers])
        if key == "mean_abs_tau":
            ax.set_yscale("log")
        else:
            _percent_axis(ax)
    ratio = report["parameters"]["pcb_ratio"]
    if not isinstance(ratio, dict):
        axes[0].axhline(ratio, color="gray", linestyle="--", linewidth=1, label="pcb_ratio")
    for ax in axes[:2]:  # from 0, with room above the highest line
        ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    axes[0].legend(fontsize=8)
    figure.savefig(path)


def layers(report: dict, path: Path) -> None:
    rows = report["layers"]
    x = list(range(len(rows)))
    figure, (ax,) = _figure(8, 3.6)
    series = (
        ("sign_conflict", "task vectors disagree in sign"),
        ("conflict_after_drop", "kept entries disagree in sign"),
        ("no_expert_keeps", "no expert keeps the entry"),
        ("changed", "changed vs base after the merge"),
    )
    for key, label in series:
        ax.plot(x, _values(rows, lambda r, k=key: r[k]), marker="o", markersize=3, label=label)
    _layer_axis(ax, [r["label"] for r in rows])
    _percent_axis(ax)
    ax.set_ylim(0, 1)
    ax.set_title("share of each layer's entries")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.savefig(path)


def similarity(report: dict, path: Path) -> None:
    labels = [e["label"] for e in report["experts"]]
    panels = [("whole model", report["whole_model"]["cosine"])]
    panels += [(g["label"], g["cosine"]) for g in report["groups"]]
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    size = 1.2 + 0.45 * len(labels)
    figure, axes = _figure(columns * size + 1.2, rows * size + 0.4, columns=columns, rows=rows)
    image = None
    for ax, (title, matrix) in zip(axes, panels, strict=False):
        values = [[float("nan") if v is None else v for v in row] for row in matrix]
        image = ax.imshow(values, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if v == v:  # not NaN: a pair that shares no tensor has no similarity
                    color = "white" if abs(v) > 0.6 else "black"
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity")
    figure.savefig(path)


def scores(report: dict, path: Path) -> None:
    data = report["scores"]
    labels = [label for label in (e["label"] for e in report["experts"]) if label in data["counts"]]
    edges = data["edges"]
    figure, axes = _figure(4.2 * max(1, len(labels)), 3.4, columns=max(1, len(labels)))
    for ax, label in zip(axes, labels, strict=False):
        counts = data["counts"][label]
        total = sum(counts) or 1.0
        ax.stairs([c / total for c in counts], edges, fill=True, alpha=0.6)
        cut = data["cuts"][label]
        if cut.get("exact") is not None:
            ax.axvline(cut["exact"], color="crimson", label="cut at pcb_ratio")
        elif cut.get("median") is not None:
            ax.axvspan(cut["p10"], cut["p90"], color="crimson", alpha=0.15, label="cuts, 10-90%")
            ax.axvline(cut["median"], color="crimson", label="median cut")
        ax.set_xscale("symlog", linthresh=1e-8)
        ax.set_yscale("log")
        ax.set_xlim(-1, 1)
        ax.set_xticks([-1, -1e-4, 0, 1e-4, 1], ["-1", "-1e-4", "0", "1e-4", "1"])
        ax.set_title(label)
        ax.set_xlabel("B / max B (kept: right of the cut)")
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("share of entries")
    figure.savefig(path)


def sweep(report: dict, path: Path) -> None:
    data = report["sweep"]
    ratios = data["ratios"]
    figure, axes = _figure(9, 3.6, columns=2)
    for label, kept in data["kept"].items():
        axes[0].plot(ratios, _values(kept, lambda v: v), marker="o", markersize=3, label=label)
    axes[0].plot([0, 1], [0, 1], color="gray", linewidth=0.8, linestyle=":", label="= pcb_ratio")
    axes[0].set_title("entries kept (W > 0)")
    conflict = _values(data["conflict_after_drop"], lambda v: v)
    axes[1].plot(ratios, conflict, marker="o", markersize=3, color="black")
    axes[1].set_title("kept entries that disagree in sign")
    ratio = report["parameters"]["pcb_ratio"]
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("pcb_ratio")
        _percent_axis(ax)
        ax.set_ylim(bottom=0)
        if not isinstance(ratio, dict):
            ax.axvline(ratio, color="crimson", linestyle="--", linewidth=1, label="configured")
    axes[0].legend(fontsize=8)
    figure.savefig(path)


def norms(report: dict, path: Path) -> None:
    rows = report["layers"]
    labels = [e["label"] for e in report["experts"]]
    x = list(range(len(rows)))
    figure, (ax,) = _figure(8, 3.6)
    for label in labels:
        ys = _values(rows, lambda r, lab=label: r["experts"].get(lab, {}).get("merged_norm_ratio"))
        line = ax.plot(x, ys, marker="o", markersize=3, label=label)[0]
        whole = report["whole_model"]["experts"].get(label, {}).get("merged_norm_ratio")
        if whole is not None:
            ax.axhline(whole, color=line.get_color(), linestyle="--", linewidth=1)
    ax.axhline(1, color="gray", linewidth=0.8)
    _layer_axis(ax, [r["label"] for r in rows])
    ax.set_ylim(bottom=0)
    ax.set_title("|merged task vector| / |expert's task vector| at lambda 1 (dashed: whole model)")
    ax.legend(fontsize=8)
    figure.savefig(path)


FIGURES = {
    "experts.png": experts,
    "layers.png": layers,
    "similarity.png": similarity,
    "scores.png": scores,
    "sweep.png": sweep,
    "norms.png": norms,
}


def draw(report: dict, folder: Path) -> list[str]:
    """Write every figure into ``folder``; their file names, in page order."""
    for name, plot in FIGURES.items():
        plot(report, folder / name)
    return list(FIGURES)
