"""Every file in ``examples/`` runs through ``mergekit-yaml`` as written.

Only the model ids are replaced by tiny local models (4 layers standing in for
Mistral's 32, so layer ranges are divided by 8); every output tensor is then
compared with the reference.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import build, check, load_tensors, run_tool, write
from expected import Checkpoints, compare_all

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY_LAYERS = 4
REAL_LAYERS = 32


@pytest.fixture(scope="module")
def family4(tmp_path_factory):
    return build(tmp_path_factory.mktemp("family4"), n_experts=3, seed=3, num_layers=TINY_LAYERS)


def localize(text: str, family) -> str:
    config = yaml.safe_load(text)
    names = [config["base_model"]]
    for item in config.get("models") or []:
        names.append(item["model"])
    for piece in config.get("slices") or []:
        names += [source["model"] for source in piece["sources"]]
    distinct = list(dict.fromkeys(names))
    assert len(distinct) <= 1 + len(family.experts)
    for name, path in zip(distinct, family.models, strict=False):
        text = re.sub(rf"(?<=: ){re.escape(name)}(?=\s)", str(path), text)

    def scale(match: re.Match) -> str:
        start, stop = (int(v) * TINY_LAYERS // REAL_LAYERS for v in match.groups())
        return f"layer_range: [{start}, {stop}]"

    return re.sub(r"layer_range: \[(\d+), (\d+)\]", scale, text)


@pytest.mark.parametrize("name", ["pcb.yml", "pcb-gradient.yml", "pcb-slices.yml"])
def test_example_runs_and_matches_reference(family4, tmp_path, name):
    text = localize((EXAMPLES / name).read_text(), family4)
    assert "Mistral" not in text.split("\n", 1)[1].split("merge_method")[1]
    config = write(tmp_path / name, text)
    out = tmp_path / "out"
    check(run_tool("mergekit-yaml", config, out, "--quiet"))
    import torch

    # The examples merge in bfloat16: one bfloat16 rounding of the float32 result.
    compare_all(
        text,
        load_tensors(out),
        Checkpoints(),
        num_layers=TINY_LAYERS,
        out_dtype=torch.bfloat16,
        rounding=2**-8,
    )


def test_examples_document_every_parameter_and_default():
    text = (EXAMPLES / "pcb.yml").read_text()
    for words in ("pcb_ratio: 0.1", "clamp_ratio: 1e-4", "lambda: 1.0", "weight: 1.0"):
        assert words in text
    assert sorted(p.name for p in EXAMPLES.glob("*.yml")) == [
        "evolve.yml",  # a search config, not a merge config: tests/test_evolve_config.py
        "inspect.yml",  # the demo models' config for mergekit-pcb inspect: tests/test_inspect.py
        "pcb-gradient.yml",
        "pcb-slices.yml",
        "pcb.yml",
    ]


def test_readme_config_example_lists_every_parameter_with_its_default():
    """The README's YAML must stay valid and in step with the method's own specs."""
    from mergekit_pcb.config_check import validate_config
    from mergekit_pcb.method import pcb

    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme.split("<!-- section:config")[1].split("<!-- /section:config")[0]
    text = section.split("```yaml\n")[1].split("```")[0]
    config = validate_config(text, source="README")
    values = {**config.parameters, **config.models[0].parameters}
    for spec in pcb.spec.parameters:
        assert spec.name in values, spec.name
        assert spec.validate(values[spec.name]) == spec.default, spec.name
