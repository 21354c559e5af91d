"""Every file in ``examples/`` runs through ``mergekit-yaml`` as written.

Only the model ids are replaced by tiny local models (4 layers standing in for
Mistral's 32, so layer ranges are divided by 8); every output tensor is then
compared with the reference. The examples with relative paths run, from the
repository root, with exactly the commands README.md and their own headers give.
"""

from __future__ import annotations

import re
import shutil
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
        "evolve-label-free.yml",  # a search config too (test_evolve_config.py)
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


# Issue 25, item 4: every command README.md and the examples' own headers give for an
# example with relative paths runs as written from the repository root.
RUN_COMMAND = re.compile(
    r"(?P<tool>mergekit-yaml|mergekit-pcb (?:merge|inspect|evolve)) "
    r"(?P<yml>examples/[\w./-]+\.yml)(?P<rest>(?: +[^\s#(`]+)*)"
)
MAKE_MODELS = re.compile(r"python (examples/data/make_models\.py) +([^\s#(`]+)")


def documented_commands() -> tuple[set[str], set[tuple[str, ...]]]:
    """(make_models.py's folders, the commands on example YAMLs) in README and examples/."""
    texts = [(EXAMPLES.parent / "README.md").read_text()]
    texts += [path.read_text() for path in sorted(EXAMPLES.glob("*.yml"))]
    folders, commands = set(), set()
    for text in texts:
        folders |= {match.group(2) for match in MAKE_MODELS.finditer(text)}
        for match in RUN_COMMAND.finditer(text):
            commands.add((*match["tool"].split(), match["yml"], *match["rest"].split()))
    return folders, commands


def stand_in_models(folder: Path) -> None:
    """What make_models.py writes (same architecture and tokenizer), without its ~45 s of
    training: the paths, not the scores, are under test here."""
    import toy

    from mergekit_pcb.tiny import make_experts, new_llama, save_model, tiny_llama_config

    tokenizer = toy.toy_tokenizer()
    config = tiny_llama_config(
        len(tokenizer), hidden_size=48, num_layers=2, max_position_embeddings=32
    )
    base = new_llama(config, seed=0)
    save_model(base, folder / "base", tokenizer)
    for name, expert in zip(("max", "cipher"), make_experts(base, 2, seed=1), strict=True):
        save_model(expert, folder / name, tokenizer)


def yml_of(command: tuple[str, ...]) -> str:
    return command[2] if command[0] == "mergekit-pcb" else command[1]


def local_references(yml: Path, root: Path) -> list[str]:
    """The model references of an example that name a local folder, as its command reads
    them (a search config from its own folder, a merge config from the working directory)."""
    raw = yaml.safe_load(yml.read_text())
    names = [raw.get("base_model"), *(raw.get("models") or [])]
    for piece in raw.get("slices") or []:
        names += [source["model"] for source in piece["sources"]]
    names = [n["model"] if isinstance(n, dict) else n for n in names if n]
    base = yml.parent if "evaluation" in raw else root
    return [n for n in names if (base / n).is_dir()]


def test_every_relative_path_example_runs_from_the_repository_root(tmp_path):
    root = tmp_path / "repository"
    shutil.copytree(EXAMPLES, root / "examples", ignore=shutil.ignore_patterns("models", "out"))
    folders, commands = documented_commands()
    assert folders == {"examples/models"}, folders  # where every example's YAML looks
    stand_in_models(root / "examples" / "models")
    relative = {c for c in commands if local_references(root / yml_of(c), root)}
    ymls = {yml_of(command) for command in relative}
    assert {
        "examples/inspect.yml",
        "examples/evolve.yml",
        "examples/evolve-label-free.yml",
    } <= ymls, commands
    # mergekit-yaml reads a merge config by the same rule as mergekit-pcb merge.
    relative.add(("mergekit-yaml", "examples/inspect.yml", "out/plain"))
    for command in sorted(relative):
        result = run_tool(*command, cwd=root, timeout=600)
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr
    for done in (
        "out/inspect/report.html",
        "out/evolve/best.yml",
        "out/evolve-label-free/best.yml",
        "out/plain/config.json",
    ):
        assert (root / done).exists(), done
