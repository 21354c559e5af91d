"""``mergekit-pcb merge`` and ``mergekit-pcb demo``."""

from __future__ import annotations

import re

import torch
from click.testing import CliRunner
from conftest import check, load_tensors, run_tool, write
from expected import Checkpoints, compare_all
from mergekit.scripts.run_yaml import main as mergekit_yaml
from reference import reference_merge

from mergekit_pcb.cli import main as cli
from mergekit_pcb.cli.merge import merge


def option_names(command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def test_merge_accepts_every_mergekit_yaml_option():
    missing = option_names(mergekit_yaml) - option_names(merge)
    assert not missing
    assert {"--lazy-unpickle", "--out-shard-size", "--cuda", "--device"} <= option_names(merge)


def test_group_lists_its_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("merge", "demo", "evolve", "inspect"):
        assert re.search(rf"^\s+{name}\s", result.output, re.MULTILINE), result.output


def test_merge_runs_like_mergekit_yaml_with_its_options(family, tmp_path):
    e0, e1, e2 = family.experts
    config = f"""merge_method: pcb
base_model: {family.base}
models:
  - model: {e0}
    parameters:
      weight: [0.5, 1.0]
  - model: {e1}
  - model: {e2}
    parameters:
      weight:
        - filter: self_attn
          value: 0.4
        - value: 1.2
parameters:
  pcb_ratio: 2e-1
  clamp_ratio: 0.01
  lambda: 0.9
"""
    out = tmp_path / "out"
    path = write(tmp_path / "c.yml", config)
    result = check(
        run_tool(
            "mergekit-pcb", "merge", path, out, "--out-shard-size", "30K", "--no-copy-tokenizer"
        )
    )
    assert str(out) in result.stdout
    assert len(list(out.glob("*.safetensors"))) >= 2
    assert not (out / "tokenizer.json").exists() and (out / "config.json").exists()
    compare_all(config, load_tensors(out), Checkpoints())


def independent_summary(base, experts, pcb_ratio, clamp_ratio):
    """Share of W > 0 per model and share of sign conflicts, straight from the spec in float64."""
    tau = torch.stack([e.double().reshape(-1) - base.double().reshape(-1) for e in experts])
    n, d = tau.shape
    magnitude = tau.abs()
    ordered = magnitude.sort(dim=1).values
    low = ordered[:, int(d * clamp_ratio)][:, None]
    high = ordered[:, int(d * (1 - clamp_ratio) - 1)][:, None]
    a = torch.minimum(torch.maximum(magnitude, low), high)
    span = (a.max(1, keepdim=True).values - a.min(1, keepdim=True).values).clamp(min=1e-300)
    normalized = (a - a.min(1, keepdim=True).values) / span
    score = torch.exp(n * normalized**2) * torch.tanh(tau * tau.sum(0))
    cut = score.sort(dim=1).values[:, int(d * (1 - pcb_ratio))][:, None]
    kept = (score > cut).sum(dim=1) / d
    conflict = ((tau > 0).any(0) & (tau < 0).any(0)).double().mean()
    return [f"{float(k):.1%}" for k in kept], f"{float(conflict):.1%}"


def test_demo_merges_and_summarizes_truthfully(tmp_path):
    out, inputs = tmp_path / "merged", tmp_path / "inputs"
    result = CliRunner().invoke(
        cli, ["demo", str(out), "--inputs", str(inputs), "--pcb-ratio", "0.2"]
    )
    assert result.exit_code == 0, result.output
    assert str(out.resolve()) in result.output
    assert (out / "config.json").exists() and (out / "README.md").exists()
    base = load_tensors(inputs / "base")
    experts = [load_tensors(inputs / f"expert{i}") for i in range(3)]
    merged = load_tensors(out)
    lines = result.output.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[4 : lines.index("")]}
    assert set(rows) == set(merged) == set(base)
    for name, tensor in merged.items():
        # The merge itself: the demo's weights are 1.0, 0.8, 0.6.
        expected = reference_merge(
            base[name],
            [e[name] for e in experts],
            weights=[1.0, 0.8, 0.6],
            pcb_ratio=0.2,
            clamp_ratio=1e-4,
        )
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-7)
        elements, k1, k2, k3, conflict, _changed = rows[name]
        assert int(elements) == tensor.numel()
        kept, expected_conflict = independent_summary(
            base[name], [e[name] for e in experts], 0.2, 1e-4
        )
        if (torch.stack([e[name] for e in experts]) != base[name]).any():
            assert [k1, k2, k3] == kept, name
        assert conflict == expected_conflict, name


def test_merge_writes_the_card_for_local_folders_named_bare(family, tmp_path):
    """`base_model: base` (a local folder, no ./): mergekit asks the Hub about it for the
    model card and, offline, failed after writing the weights. merge does not ask, and
    since issue 25 neither does plain mergekit-yaml for a pcb config."""
    names = [path.name for path in family.models]
    config = "merge_method: pcb\nbase_model: {}\nmodels:\n{}".format(
        names[0], "".join(f"  - model: {name}\n" for name in names[1:])
    )
    path = write(tmp_path / "bare.yml", config)
    for tool, out in (
        ("mergekit-yaml", tmp_path / "plain"),
        ("mergekit-pcb merge", tmp_path / "out"),
    ):
        check(run_tool(*tool.split(), path, out, cwd=family.root))
        card = (out / "README.md").read_text()
        assert (out / "mergekit_config.yml").read_text() == config
        assert "huggingface.co/base" not in card and f"* {names[1]}" in card


def test_demo_keeps_its_inputs_and_ends_with_what_to_run_next(tmp_path):
    """Issue 14, row 12: the saved config pointed at a deleted temporary folder."""
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", str(out)])
    assert result.exit_code == 0, result.output
    inputs = (out / "inputs").resolve()
    assert sorted(p.name for p in inputs.iterdir()) == ["base", "expert0", "expert1", "expert2"]
    saved = (out / "mergekit_config.yml").read_text()
    assert f"base_model: {inputs / 'base'}" in saved
    config = out.resolve() / "mergekit_config.yml"
    last = result.output.rstrip().splitlines()[-1]
    assert last == (
        f"next: edit pcb_ratio, lambda or the weights in {config}, then "
        f"mergekit-pcb merge {config} ./pcb-demo-2"
    )
    # The command it names runs, on the kept inputs, and gives the demo's model again.
    again = tmp_path / "again"
    rerun = CliRunner().invoke(cli, ["merge", str(config), str(again), "--no-copy-tokenizer"])
    assert rerun.exit_code == 0, rerun.output
    first, second = load_tensors(out), load_tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
