"""Plain ``mergekit-yaml``, ``mergekit-multi`` and ``run_merge`` check a pcb config as
``mergekit-pcb merge`` does, before any weight is written (issue 25, items 1 and 2).

Each case runs the installed ``mergekit-yaml`` in a subprocess and demands: a non-zero
exit, exactly one stderr line, ``Error: `` and the very words ``mergekit-pcb merge``
prints for the same file, and no output folder. Other merge methods keep mergekit's
behaviour. The transformers warning "`torch_dtype` is deprecated!" that mergekit's
``_model_out_config`` causes is dropped around that call only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import check, load_tensors, run_python, run_tool, write

from mergekit_pcb.cli import main as cli
from mergekit_pcb.mergekit_internals import TORCH_DTYPE_DEPRECATION
from mergekit_pcb.parameters import PCB_RATIO

ALLOWED_NAMES = "(allowed: pcb_ratio, clamp_ratio, lambda, weight, pcb_scope)"


def pcb_config(family, *, parameters="{pcb_ratio: 0.3}", base=True, first=None, weight="1.0"):
    lines = ["merge_method: pcb"]
    if base:
        lines.append(f"base_model: {family.base}")
    lines += [
        "models:",
        f"  - model: {first or family.experts[0]}",
        f"    parameters: {{weight: {weight}}}",
        f"  - model: {family.experts[1]}",
        f"parameters: {parameters}",
    ]
    return "\n".join(lines) + "\n"


def one_error_line(result) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def pcb_merge_line(config: Path, out: Path) -> str:
    """What ``mergekit-pcb merge`` prints for the same file: the words to match."""
    result = CliRunner().invoke(cli, ["merge", str(config), str(out)])
    assert result.exit_code == 1, result.output
    return result.stderr.strip()


# (case, config keyword arguments, the line mergekit-yaml must print after "Error: ")
CASES = [
    (
        "typo",
        {"parameters": "{pcb_rato: 0.3}"},
        "config.parameters.pcb_rato: unknown pcb parameter 'pcb_rato'; did you mean "
        f"'pcb_ratio'? {ALLOWED_NAMES}",
    ),
    (
        "per-model-typo",
        {"weight": "1.0, wieght: 2"},
        "models[0].parameters.wieght: unknown pcb parameter 'wieght'; did you mean "
        f"'weight'? {ALLOWED_NAMES}",
    ),
    (
        "no-base_model",
        {"base": False},
        "config: 'base_model' is missing; allowed: set base_model to the model the others "
        "were fine-tuned from (pcb merges task vectors taken against it)",
    ),
    (
        "pcb_ratio-20",
        {"parameters": "{pcb_ratio: 20}"},
        f"pcb: config.parameters.pcb_ratio: parameter 'pcb_ratio' got 20; allowed: "
        f"{PCB_RATIO.allowed}",
    ),
    (
        "pcb_ratio-null",  # pydantic's traceback in mergekit's own parsing, before run_merge
        {"parameters": "{pcb_ratio: null}"},
        f"pcb: config.parameters.pcb_ratio: parameter 'pcb_ratio' got null; allowed: "
        f"{PCB_RATIO.allowed}",
    ),
    (
        "clamp_ratio-gradient",
        {"parameters": "{clamp_ratio: [0.1, 0.7]}"},
        "pcb: config.parameters.clamp_ratio[1]: parameter 'clamp_ratio' got 0.7; allowed: "
        "a number in [0, 0.5), the quantile clipped at each end of |task vector|",
    ),
    (
        "pcb_scope",
        {"parameters": "{pcb_scope: layer}"},
        "pcb: config.parameters.pcb_scope: parameter 'pcb_scope' got 'layer'; allowed: one "
        "of tensor, model, where PCB takes its statistics: per tensor, or over all tensors "
        "of each model as in the paper's code",
    ),
]


@pytest.mark.parametrize("case,kwargs,expected", CASES, ids=[c[0] for c in CASES])
def test_mergekit_yaml_prints_pcb_merge_s_line(family, tmp_path, case, kwargs, expected):
    config = write(tmp_path / "c.yml", pcb_config(family, **kwargs))
    out = tmp_path / "out"
    line = one_error_line(run_tool("mergekit-yaml", config, out))
    assert line == f"Error: {expected}"
    assert line == pcb_merge_line(config, out)
    assert not out.exists()


def test_mergekit_yaml_names_a_missing_local_folder_and_its_base(family, tmp_path):
    """Was "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"; a relative
    path is read from the working directory, and the line says so (and where it is)."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    (there / "models").mkdir(parents=True)
    os.symlink(family.experts[0], there / "models" / "e0")
    config = write(there / "c.yml", pcb_config(family, first="models/e0"))
    result = run_tool("mergekit-yaml", config, here / "out", cwd=here)
    assert one_error_line(result) == (
        f"Error: models[0].model: model 'models/e0': no such local folder {here}/models/e0 "
        f"(relative paths are read from the working directory {here}, as mergekit-yaml "
        f"does); the YAML's folder {there} has one: write it as {there}/models/e0"
    )
    assert not (here / "out").exists()
    # From the folder that holds it, the same file merges.
    check(run_tool("mergekit-yaml", config, here / "out", "--quiet", cwd=there))
    assert (here / "out" / "model.safetensors").exists()


def test_mergekit_yaml_without_the_typo_merges_with_the_value_written(family, tmp_path):
    """The typo case's control: the file differs by one letter and merges."""
    config = write(tmp_path / "c.yml", pcb_config(family, parameters="{pcb_ratio: 0.3}"))
    result = check(run_tool("mergekit-yaml", config, tmp_path / "out"))
    assert TORCH_DTYPE_DEPRECATION not in result.stderr  # item 2: no warning the user can't act on
    assert "pcb_ratio: 0.3" in (tmp_path / "out" / "mergekit_config.yml").read_text()


def test_other_methods_keep_mergekit_s_behaviour(family, tmp_path):
    """An unknown parameter of ``linear`` is still ignored silently, as mergekit does."""
    config = write(
        tmp_path / "c.yml",
        f"""merge_method: linear
models:
  - model: {family.experts[0]}
    parameters: {{weight: 1.0}}
  - model: {family.experts[1]}
    parameters: {{weight: 1.0}}
parameters: {{normalise: true}}
""",
    )
    check(run_tool("mergekit-yaml", config, tmp_path / "out", "--quiet"))
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_mergekit_multi_checks_every_document_before_the_first_merge(family, tmp_path):
    config = write(
        tmp_path / "multi.yml",
        f"""name: first
merge_method: pcb
base_model: {family.base}
models:
  - model: {family.experts[0]}
  - model: {family.experts[1]}
parameters: {{pcb_ratio: 0.3}}
---
merge_method: pcb
base_model: {family.base}
models:
  - model: first
  - model: {family.experts[2]}
parameters: {{lamda: 0.5}}
""",
    )
    inter, final = tmp_path / "inter", tmp_path / "final"
    result = run_tool("mergekit-multi", config, "--out-path", final, "-I", inter)
    assert one_error_line(result) == (
        "Error: the final (unnamed) merge: config.parameters.lamda: unknown pcb parameter "
        f"'lamda'; did you mean 'lambda'? {ALLOWED_NAMES}"
    )
    assert not (inter / "first").exists() and not final.exists()  # nothing merged


def test_mergekit_multi_names_a_missing_model_of_a_later_merge(family, tmp_path):
    missing = tmp_path / "nowhere"
    config = write(
        tmp_path / "multi.yml",
        f"""name: first
merge_method: pcb
base_model: {family.base}
models:
  - model: {family.experts[0]}
  - model: {family.experts[1]}
---
merge_method: pcb
base_model: {family.base}
models:
  - model: first
  - model: {missing}
""",
    )
    inter = tmp_path / "inter"
    result = run_tool("mergekit-multi", config, "--out-path", tmp_path / "final", "-I", inter)
    assert one_error_line(result) == (
        f"Error: the final (unnamed) merge: models[1].model: model '{missing}': "
        f"no such local folder {missing}"
    )
    assert not (inter / "first").exists()


RUN_MERGE = """
import json, sys
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
config = MergeConfiguration.model_validate(json.loads(sys.argv[1]))
try:
    run_merge(config, sys.argv[2], options=MergeOptions(quiet=True))
except ValueError as error:
    print(type(error).__name__, "|", error)
"""


def test_python_api_run_merge_raises_a_value_error(family, tmp_path):
    raw = {
        "merge_method": "pcb",
        "base_model": str(family.base),
        "models": [{"model": str(e)} for e in family.experts[:2]],
        "parameters": {"pcb_ratio": 1.5},
    }
    out = tmp_path / "out"
    code = RUN_MERGE.replace("sys.argv[1]", repr(json.dumps(raw))).replace(
        "sys.argv[2]", repr(str(out))
    )
    result = check(run_python(code, env={"HF_HUB_OFFLINE": "1"}))
    assert result.stdout.strip() == (
        "PcbConfigError | pcb: config.parameters.pcb_ratio: parameter 'pcb_ratio' got 1.5; "
        f"allowed: {PCB_RATIO.allowed}"
    )
    assert not out.exists()


SCOPED_WARNING = """
import sys
from transformers import LlamaConfig
from mergekit_pcb.mergekit_internals import without_torch_dtype_deprecation
config = LlamaConfig()
with without_torch_dtype_deprecation():
    config.torch_dtype = "float32"  # the kind of call mergekit makes: dropped
    with without_torch_dtype_deprecation():  # nested: still dropped, then restored
        config.torch_dtype = "float16"
    config.torch_dtype = "float32"
sys.stderr.write("MARK\\n")
sys.stderr.flush()
config.torch_dtype = "bfloat16"  # the user's own call: warned, as transformers does
"""


def test_torch_dtype_warning_dropped_inside_the_block_only():
    result = check(run_python(SCOPED_WARNING))
    inside, outside = result.stderr.split("MARK")
    assert TORCH_DTYPE_DEPRECATION not in inside
    assert outside.count(TORCH_DTYPE_DEPRECATION) == 1


MERGE_THEN_USER = """
import sys
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from transformers import LlamaConfig
config = MergeConfiguration.model_validate({raw!r})
run_merge(config, {out!r}, options=MergeOptions(quiet=True))
sys.stderr.write("MARK\\n")
sys.stderr.flush()
LlamaConfig().torch_dtype = "bfloat16"
"""


@pytest.mark.parametrize("method", ["pcb", "linear"])
def test_a_merge_drops_the_warning_and_leaves_it_to_the_user_s_code(family, tmp_path, method):
    """The merge sets ``torch_dtype`` (dtype: float32); the user's own code later in the
    same process still gets transformers' warning: the filter was scoped, not global,
    and did not use up ``warning_once``. (With ``CI=true`` transformers also propagates
    to the root logger, so the one warning may print twice.)"""
    raw = {
        "merge_method": method,
        "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in family.experts[:2]],
        "dtype": "float32",
    }
    if method == "pcb":
        raw["base_model"] = str(family.base)
    out = tmp_path / "out"
    result = check(run_python(MERGE_THEN_USER.format(raw=raw, out=str(out))))
    merge, user = result.stderr.split("MARK")
    assert TORCH_DTYPE_DEPRECATION not in merge
    assert TORCH_DTYPE_DEPRECATION in user
    assert set(load_tensors(out)) == set(load_tensors(family.base))


def test_the_installed_startup_hook_is_this_checkout_s():
    """An install made before the trigger moved to ``import mergekit`` fires on the
    registry, half way through ``mergekit.merge``: too late to guard ``run_merge``, so
    plain mergekit-yaml would go unchecked. Reinstall (``pip install -e .``) then."""
    import site

    root = Path(__file__).resolve().parents[1]
    installed = [
        Path(folder) / "mergekit_pcb_autoload.pth"
        for folder in site.getsitepackages()
        if (Path(folder) / "mergekit_pcb_autoload.pth").exists()
    ]
    assert installed, "mergekit_pcb_autoload.pth is not installed: pip install -e ."
    expected = (root / "mergekit_pcb_autoload.pth").read_text()
    assert installed[0].read_text() == expected, "a stale startup hook: pip install -e ."


def test_importing_the_plugin_after_mergekit_still_guards_it():
    """With the startup hook opted out, an explicit ``import mergekit_pcb`` after mergekit
    loaded wraps what is already loaded, including the name mergekit-yaml bound."""
    code = """
import mergekit.scripts.run_yaml as run_yaml, mergekit.scripts.multimerge as multi
import mergekit.merge
assert not hasattr(mergekit.merge.run_merge, "mergekit_pcb_guarded")
import mergekit_pcb
print(run_yaml.run_merge is mergekit.merge.run_merge is multi.run_merge,
      run_yaml.run_merge.mergekit_pcb_guarded, run_yaml.main.callback.mergekit_pcb_guarded,
      multi.load_config.mergekit_pcb_guarded)
"""
    result = check(run_python(code, env={"MERGEKIT_PCB_NO_AUTOLOAD": "1"}))
    assert result.stdout.split() == ["True"] * 4
