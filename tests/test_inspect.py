"""``mergekit-pcb inspect``: its numbers against an independent PCB, its page in a browser.

The reference here is written from the spec (float64, full sorts, the config's
parameters resolved by tests/expected.py's own reading of mergekit's rules); it
shares no code with the kernel. The inputs are the checkpoints, aligned to the
output vocabulary where the config asks for a tokenizer union, exactly as the merge
tests compare mergekit-yaml's output.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    NUM_LAYERS,
    check,
    load_tensors,
    run_tool,
    write,
)
from expected import LAYER, AlignedCheckpoints, Checkpoints, resolve, vocabulary
from reference import minmax_rows

from mergekit_pcb.inspect.measure import SWEEP

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# ------------------------------------------------------------------ the reference


def parts(tau: torch.Tensor, pcb_ratio: float, clamp_ratio: float):
    """Spec steps 2-9 on float64 rows: T~, B, and W at pcb_ratio (sort-based)."""
    tau = tau.to(torch.float64)
    n, d = tau.shape
    lo, hi = int(d * clamp_ratio), int(d * (1 - clamp_ratio) - 1)
    magnitude = tau.abs()
    ordered = magnitude.sort(dim=1).values
    clipped_abs = torch.clamp(magnitude, ordered[:, lo : lo + 1], ordered[:, hi : hi + 1])
    clipped = tau.sign() * clipped_abs
    score = torch.exp(n * minmax_rows(clipped_abs) ** 2) * torch.tanh(tau * tau.sum(0))
    return clipped, score


def weights_at(score: torch.Tensor, pcb_ratio: float, ordered=None) -> torch.Tensor:
    """Step 9: W from the cut at sorted(B)[int(d (1 - r))] (``ordered``: B sorted by row)."""
    d = score.shape[1]
    cut = int(d * (1 - pcb_ratio))
    ordered = score.sort(dim=1).values if ordered is None else ordered
    threshold = ordered[:, cut : cut + 1]
    top = ordered[:, -1:]
    return minmax_rows(torch.clamp(score, threshold, top))


def counts(tau, clipped, weights, coefficients) -> dict:
    """What the report states for one tensor, from float64 T~, W (rows as given)."""
    keep = weights > 0
    signs = clipped.sign()
    positive, negative = tau > 0, tau < 0
    top = weights.max(dim=0)
    wins = [int(((top.indices == i) & (top.values > 0)).sum()) for i in range(len(tau))]
    coefficient = torch.tensor(coefficients, dtype=torch.float64)[:, None]
    merged = (coefficient * weights * clipped).sum(0) / weights.sum(0).clamp(min=1e-12)
    return {
        "kept": keep.sum(1).tolist(),
        "wins": wins,
        "none_kept": int((~keep.any(0)).sum()),
        "conflict": int((positive.any(0) & negative.any(0)).sum()),
        "kept_conflict": int(((keep & (signs > 0)).any(0) & (keep & (signs < 0)).any(0)).sum()),
        "abs_sum": tau.abs().sum(1).tolist(),
        "gram": (tau @ tau.T).tolist(),
        "merged_sq": float((merged**2).sum()),
    }


def sweep_counts(tau, clipped, score) -> tuple[list, list]:
    kept, conflict = [], []
    ordered = score.sort(dim=1).values
    for ratio in SWEEP:
        keep = weights_at(score, ratio, ordered) > 0
        kept.append(keep.sum(1).tolist())
        signs = clipped.sign()
        conflict.append(int(((keep & (signs > 0)).any(0) & (keep & (signs < 0)).any(0)).sum()))
    return [list(row) for row in zip(*kept, strict=True)], conflict


def settings(config: dict, name: str, experts: list[str]) -> dict:
    """The tensor's parameters by tests/expected.py's reading of mergekit's rules."""
    match = LAYER.match(name)
    t = int(match.group(1)) / (NUM_LAYERS - 1) if match else 0.0
    top = config.get("parameters")
    per_model = {m["model"]: m.get("parameters") for m in config["models"]}
    return {
        **{k: resolve(k, [top], name, t) for k in ("pcb_ratio", "clamp_ratio", "lambda")},
        "weights": [resolve("weight", [per_model[e], top], name, t) for e in experts],
    }


def expert_rows(report: dict, record: dict) -> list[str]:
    """The model path of each row of a tensor record."""
    return [report["experts"][e]["model"] for e in record["experts"]]


def close(actual, expected, rel=1e-6, what=""):
    assert actual == pytest.approx(expected, rel=rel, abs=1e-12), what


def inspect(tmp_path: Path, name: str, text: str, *extra) -> tuple[dict, Path]:
    out = tmp_path / name
    config = write(tmp_path / f"{name}.yml", text)
    check(run_tool("mergekit-pcb", "inspect", config, out, "--no-progress", *extra))
    return json.loads((out / "report.json").read_text()), out


# ------------------------------------------------------------------ tensor scope


@pytest.fixture(scope="module")
def union(tmp_path_factory, family, big_vocab):
    """Tensor scope with a tokenizer union (two vocabulary sizes in), filtered ratios, a
    weight gradient and a bfloat16 output; inspected, and merged by mergekit-yaml. The
    filtered clamp_ratio sends attention tensors through the merge's stored path and the
    rest through its streamed path."""
    tmp = tmp_path_factory.mktemp("inspect_union")
    e0, e1 = family.experts[:2]
    text = f"""merge_method: pcb
base_model: {family.base}
models:
  - model: {e0}
    parameters: {{weight: 0.7}}
  - model: {e1}
    parameters: {{weight: [0.5, 1.0]}}
  - model: {big_vocab}
    parameters: {{weight: 1.3}}
parameters:
  pcb_ratio: [{{filter: mlp, value: 0.2}}, {{value: 0.35}}]
  clamp_ratio: [{{filter: self_attn, value: 0.01}}, {{value: 1e-4}}]
  lambda: 1.2
tokenizer_source: union
dtype: float32
out_dtype: bfloat16
"""
    report, folder = inspect(tmp, "report", text)
    merged = tmp / "merged"
    check(run_tool("mergekit-yaml", tmp / "report.yml", merged, "--quiet"))
    loader = AlignedCheckpoints(vocabulary(merged), [family.base, e0, e1, big_vocab])
    return {
        "config": yaml.safe_load(text),
        "report": report,
        "folder": folder,
        "merged": load_tensors(merged),
        "load": loader,
        "base": str(family.base),
    }


def test_tensor_scope_numbers_equal_an_independent_pcb(union):
    report, load, config = union["report"], union["load"], union["config"]
    records = report["tensors"]
    assert {r["name"] for r in records} == {
        n for n, t in union["merged"].items() if t.is_floating_point()
    }
    embed = next(r for r in records if r["name"] == "model.embed_tokens.weight")
    assert embed["elements"] == union["merged"]["model.embed_tokens.weight"].numel()
    wins_off = 0
    for record in records:
        name = record["name"]
        models = expert_rows(report, record)
        want = settings(config, name, models)
        assert (record["pcb_ratio"], record["clamp_ratio"], record["lambda"]) == pytest.approx(
            (want["pcb_ratio"], want["clamp_ratio"], want["lambda"])
        ), name
        assert record["weights"] == pytest.approx(want["weights"]), name
        base = load(union["base"], name).to(torch.float64).reshape(-1)
        tau = torch.stack([load(m, name).to(torch.float64).reshape(-1) - base for m in models])
        assert record["elements"] == tau.shape[1], name
        clipped, score = parts(tau, want["pcb_ratio"], want["clamp_ratio"])
        expected = counts(tau, clipped, weights_at(score, want["pcb_ratio"]), want["weights"])
        for key in ("kept", "none_kept", "conflict", "kept_conflict"):
            assert record[key] == expected[key], f"{name}: {key}"
        wins_off += sum(abs(a - b) for a, b in zip(record["wins"], expected["wins"], strict=True))
        close(record["abs_sum"], expected["abs_sum"], what=name)
        for row, want_row in zip(record["gram"], expected["gram"], strict=True):
            close(row, want_row, rel=1e-5, what=name)
        close(record["merged_sq"], expected["merged_sq"], rel=1e-5, what=name)
        kept, conflict = sweep_counts(tau, clipped, score)
        assert record["sweep_kept"] == kept, name
        assert record["sweep_conflict"] == conflict, name
        pairs = record["sign_pairs"]
        for i in range(len(models)):
            for j in range(len(models)):
                opposed = int(((tau[i] > 0) & (tau[j] < 0)).sum())
                assert pairs[i][j] == opposed, name
    # Which expert carries the largest W may flip where two W agree to float32 rounding.
    assert wins_off <= 2


def test_changed_share_is_the_written_models(union):
    """'changed vs base' counts the entries mergekit-yaml really writes differently."""
    report, merged, load = union["report"], union["merged"], union["load"]
    for record in report["tensors"]:
        written = merged[record["name"]]
        assert written.dtype == torch.bfloat16
        base = load(union["base"], record["name"]).to(torch.bfloat16)
        assert record["changed"] == int((written != base).sum()), record["name"]
    assert 0 < report["whole_model"]["changed"] < 1


def test_report_totals_add_up_from_the_tensors(union):
    """Layer and whole-model shares are the per-tensor counts summed, per expert."""
    report = union["report"]
    records = report["tensors"]
    for layer in report["layers"]:
        mine = [r for r in records if str(r["layer"]) == layer["label"]]
        elements = sum(r["elements"] for r in mine)
        assert layer["elements"] == elements
        assert layer["sign_conflict"] == pytest.approx(sum(r["conflict"] for r in mine) / elements)
        assert layer["no_expert_keeps"] == pytest.approx(
            sum(r["none_kept"] for r in mine) / elements
        )
        for e, expert in enumerate(report["experts"]):
            kept = sum(r["kept"][r["experts"].index(e)] for r in mine)
            assert layer["experts"][expert["label"]]["kept"] == pytest.approx(kept / elements)
    whole = report["whole_model"]
    total = sum(r["elements"] for r in records)
    assert whole["changed"] == pytest.approx(sum(r["changed"] for r in records) / total)
    e = 0
    kept = [r["sweep_kept"][r["experts"].index(e)] for r in records]
    label = report["experts"][e]["label"]
    for k in range(len(SWEEP)):
        assert report["sweep"]["kept"][label][k] == pytest.approx(sum(x[k] for x in kept) / total)
    assert report["sweep"]["exact"]


def test_page_says_what_the_json_holds(union):
    report, folder = union["report"], union["folder"]
    page = html.unescape((folder / "report.html").read_text())
    assert report["summary"]
    for sentence in report["summary"]:
        assert sentence["text"] in page
        for value in sentence["values"]:
            node = report
            for key in value["path"]:
                node = node[key]
            assert node == value["value"]
            assert value["shown"] in sentence["text"]
    # The winner named in the summary is the largest share among the cells it considers.
    cells = [
        (cell["experts"][label]["wins_of_kept"], label, group["label"], name)
        for group in report["groups"]
        for name, cell in group["components"].items()
        if cell["elements"] >= 0.01 * report["whole_model"]["elements"]
        for label in cell["experts"]
    ]
    share, label, where, component = max(cells)
    shown = f"{share:.0%}" if share >= 0.1 else f"{share:.1%}"
    named = [s["text"] for s in report["summary"] if " wins " in s["text"]]
    assert named and named[0].startswith(f"{label} wins {shown} ")
    assert where in named[0] or component in named[0]


@pytest.mark.gpu
def test_cuda_gives_the_cpu_counts(union, tmp_path):
    """--device cuda runs the kernel's torch ops on the GPU: the same counts, except where
    float rounding on the GPU flips an entry that sits exactly on a tie."""
    report, _ = inspect(
        tmp_path, "cuda", (union["folder"].parent / "report.yml").read_text(), "--device", "cuda"
    )
    for cpu, gpu in zip(union["report"]["tensors"], report["tensors"], strict=True):
        assert gpu["name"] == cpu["name"]
        for key in ("kept", "none_kept", "conflict", "kept_conflict", "sweep_kept"):
            assert gpu[key] == cpu[key], f"{cpu['name']}: {key}"
        assert abs(gpu["changed"] - cpu["changed"]) <= max(2, cpu["elements"] // 1000)


# ------------------------------------------------------------------ model scope


def test_model_scope_numbers_equal_the_whole_model_reference(tmp_path, family):
    """Statistics over every tensor of each model, even when --tensors shows only some."""
    ratio, clamp = 0.1, 0.01  # a cut above the zeros: the scopes keep different entries
    lines = "".join(f"  - model: {e}\n" for e in family.experts)
    text = (
        f"merge_method: pcb\nbase_model: {family.base}\nmodels:\n{lines}"
        f"parameters:\n  pcb_ratio: {ratio}\n  clamp_ratio: {clamp}\n  pcb_scope: model\n"
    )
    report, _ = inspect(tmp_path, "model", text, "--tensors", r"layers\.1\.mlp")
    load = Checkpoints()
    base = load_tensors(family.base)
    names = sorted(n for n, t in base.items() if t.is_floating_point())
    models = [str(e) for e in family.experts]
    tau = torch.stack(
        [
            torch.cat([(load(m, n).double() - base[n].double()).reshape(-1) for n in names])
            for m in models
        ]
    )
    clipped, score = parts(tau, ratio, clamp)
    weights = weights_at(score, ratio)
    offsets, start = {}, 0
    for n in names:
        offsets[n] = slice(start, start + base[n].numel())
        start += base[n].numel()
    records = report["tensors"]
    selected = {n for n in names if re.search(r"layers\.1\.mlp", n)}
    assert {r["name"] for r in records} == selected and len(selected) == 3
    assert report["tensors_merged_by_pcb"] == len(names) and report["scope"] == "model"
    differs = False
    for record in records:
        cols = offsets[record["name"]]
        rows = [models.index(m) for m in expert_rows(report, record)]
        expected = counts(tau[rows, cols], clipped[rows, cols], weights[rows, cols], [1.0] * 3)
        for key in ("kept", "none_kept", "conflict", "kept_conflict"):
            assert record[key] == expected[key], f"{record['name']}: {key}"
        own_clipped, own_score = parts(tau[rows, cols], ratio, clamp)  # tensor scope
        own = (weights_at(own_score, ratio) > 0).sum(1).tolist()
        differs |= own != record["kept"]
    assert differs  # this test can tell the scopes apart
    assert not report["sweep"]["exact"] and report["sampled"]["sweep"]


def test_lambda_auto_is_reported_as_the_merge_chooses_it(tmp_path, family):
    """Each tensor's chosen scale against the float64 reference; the spread in the
    report's parameters and the summary; the merge writes what inspect says."""
    from reference import reference_auto_scale, reference_task_vector

    lines = "".join(f"  - model: {e}\n" for e in family.experts)
    lam = "[{filter: mlp, value: auto}, {value: 0.9}]"
    text = (
        f"merge_method: pcb\nbase_model: {family.base}\nmodels:\n{lines}"
        f"parameters:\n  pcb_ratio: 0.3\n  lambda: {lam}\n"
    )
    report, _ = inspect(tmp_path, "auto", text)
    base = load_tensors(family.base)
    experts = [load_tensors(e) for e in family.experts]
    chosen = []
    for record in report["tensors"]:
        name = record["name"]
        if "mlp" not in name:
            assert record["lambda"] == 0.9 and record["lambda_chosen"] is None
            continue
        assert record["lambda"] == "auto"
        tau = torch.stack([(e[name].double() - base[name].double()).flatten() for e in experts])
        if not record["scored"]:
            assert record["lambda_chosen"] is None
            continue
        m = reference_task_vector(tau, [1.0] * 3, 0.3, 1e-4)
        expected = reference_auto_scale(m, tau, [1.0] * 3)
        assert record["lambda_chosen"] == pytest.approx(expected, rel=1e-5), name
        chosen.append(record["lambda_chosen"])
    spread = report["parameters"]["lambda"]
    assert spread["fixed"] == 0.9 and spread["auto"]["tensors"] == 3 * NUM_LAYERS
    assert spread["auto"]["median"] == pytest.approx(sorted(chosen)[len(chosen) // 2])
    assert spread["auto"]["min"] == min(chosen) and spread["auto"]["max"] == max(chosen)
    said = " ".join(s["text"] for s in report["summary"])
    assert f"Configured: lambda auto on {3 * NUM_LAYERS} tensors (chose" in said


# ------------------------------------------------------------------ the example and the page


def localized_example(family) -> str:
    text = (EXAMPLES / "inspect.yml").read_text()
    for name, path in (
        ("examples/models/base", family.base),
        ("examples/models/max", family.experts[0]),
        ("examples/models/cipher", family.experts[1]),
    ):
        assert f": {name}\n" in text
        text = text.replace(f": {name}\n", f": {path}\n")
    return text


@pytest.fixture(scope="module")
def example(tmp_path_factory, family):
    tmp = tmp_path_factory.mktemp("inspect_example")
    return inspect(tmp, "example", localized_example(family))


def test_example_config_validates_and_reports(example):
    from mergekit_pcb.config_check import validate_config

    validate_config((EXAMPLES / "inspect.yml").read_text(), source="examples/inspect.yml")
    report, folder = example
    assert report["parameters"]["pcb_ratio"] == 0.1 and report["scope"] == "tensor"
    for name in ("report.html", "report.json", *report["images"]):
        assert (folder / name).stat().st_size > 0
    page = (folder / "report.html").read_text()
    sources = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "url(" not in page and "<script" not in page.lower()


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if found := shutil.which(name):
            return found
    return None


_PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images).map(i => [i.complete, i.naturalWidth]);
  const loaded = performance.getEntriesByType("resource").map(e => e.name);
  document.body.setAttribute("data-probe", JSON.stringify({images, loaded}));
});
</script>"""


def _load(browser: str, page: Path) -> subprocess.CompletedProcess:
    """The page loaded in headless Chromium: its DOM on stdout, its console on stderr."""
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_page_renders_in_a_headless_browser(example, tmp_path):
    """Every image decodes, nothing is fetched, and the console stays quiet."""
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium)")
    report, folder = example
    page = (folder / "report.html").read_text()
    probed = tmp_path / "probed.html"  # the probe script is the only change
    probed.write_text(page.replace("</body>", _PROBE + "</body>"))
    result = _load(browser, probed)
    assert result.returncode == 0, result.stderr[-2000:]
    probe = re.search(r'data-probe="([^"]*)"', result.stdout)
    assert probe, result.stdout[-2000:]
    seen = json.loads(html.unescape(probe.group(1)))
    assert len(seen["images"]) == len(report["images"]) > 0
    assert all(complete and width > 0 for complete, width in seen["images"]), seen
    assert seen["loaded"] == []
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []


def test_probe_sees_a_broken_page(tmp_path):
    """The browser check above can fail: a page with a broken image and a script error."""
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium)")
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<html><body><img src="missing.png"><script>nothing();</script>' + _PROBE + "</body></html>"
    )
    result = _load(browser, bad)
    seen = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', result.stdout).group(1)))
    assert seen["images"] == [[True, 0]]
    assert any(":CONSOLE" in line and "nothing" in line for line in result.stderr.splitlines())


# ------------------------------------------------------------------ bad input


def invoke(*args) -> tuple[int, str]:
    """The CLI in this process (error paths stop before any model is read), its last line."""
    from click.testing import CliRunner

    from mergekit_pcb.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result.exit_code, lines[-1] if lines else ""


def test_strict_validation_is_merges_and_nothing_is_written(tmp_path, family):
    """The same check and the same one-line error as mergekit-pcb merge, before any file."""
    text = localized_example(family).replace("  pcb_ratio: 0.1", "  pcb_rato: 0.1")
    config = write(tmp_path / "bad.yml", text)
    out = tmp_path / "report"
    code, line = invoke("inspect", config, out)
    assert code != 0 and (code, line) == invoke("merge", config, tmp_path / "merged")
    assert line.startswith("Error: ") and "pcb_rato" in line and "'pcb_ratio'" in line
    assert not out.exists()


def test_other_merge_methods_are_refused(tmp_path, family):
    text = localized_example(family).replace("merge_method: pcb", "merge_method: ties")
    out = tmp_path / "report"
    code, line = invoke("inspect", write(tmp_path / "ties.yml", text), out)
    assert code != 0 and "merge_method is 'ties'; allowed: pcb" in line
    assert not out.exists()


def test_tensors_option_errors(tmp_path, family):
    config = write(tmp_path / "ok.yml", localized_example(family))
    out = tmp_path / "report"
    code, line = invoke("inspect", config, out, "--tensors", "layers.(")
    assert code != 0 and "is not a regular expression" in line, line
    code, line = invoke("inspect", config, out, "--tensors", "nothing_like_this")
    assert code != 0 and "matches none of the 30 tensors pcb merges" in line, line
    assert not out.exists()


def test_missing_matplotlib_names_the_extra(tmp_path, family, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    config = write(tmp_path / "ok.yml", localized_example(family))
    code, line = invoke("inspect", config, tmp_path / "out")
    assert code != 0 and "pip install 'mergekit-pcb[plot]'" in line, line
    assert line.startswith("Error: ")
