"""Bad input fails clearly: the last message line names the culprit and what is allowed.

Config errors must fail before any weights are written; data errors must not
leave an output directory that looks like a finished model (no config.json).
Both the unmodified ``mergekit-yaml`` and ``mergekit-pcb merge`` are checked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import last_error_line, load_tensors, run_tool, write

from mergekit_pcb.cli import main as cli
from mergekit_pcb.config_check import ConfigError, validate_config
from mergekit_pcb.parameters import PCB_RATIO


def config_text(
    family,
    *,
    parameters: str = "{}",
    weight: str = "1.0",
    base: bool = True,
    expert=None,
    extra: str = "",
) -> str:
    lines = ["merge_method: pcb"]
    if base:
        lines.append(f"base_model: {family.base}")
    lines += [
        "models:",
        f"  - model: {expert or family.experts[0]}",
        f"    parameters: {{weight: {weight}}}",
        f"  - model: {family.experts[1]}",
        f"parameters: {parameters}",
    ]
    return "\n".join(lines) + "\n" + extra


# (case id, config keyword arguments, words the last line must contain)
CONFIG_ERRORS = [
    ("pcb_ratio-0", {"parameters": "{pcb_ratio: 0}"}, ["pcb_ratio", "(0, 1]"]),
    ("pcb_ratio-1.5", {"parameters": "{pcb_ratio: 1.5}"}, ["pcb_ratio", "(0, 1]"]),
    ("pcb_ratio-string", {"parameters": "{pcb_ratio: lots}"}, ["pcb_ratio", "'lots'", "(0, 1]"]),
    ("clamp_ratio-0.7", {"parameters": "{clamp_ratio: 0.7}"}, ["clamp_ratio", "[0, 0.5)"]),
    ("lambda-nan", {"parameters": "{lambda: .nan}"}, ["lambda", "finite"]),
    ("weight-inf", {"weight": ".inf"}, ["weight", "finite"]),
    ("no-base_model", {"base": False}, ["base_model", "allowed"]),
]


def no_weights_written(out: Path) -> bool:
    return not out.exists() or not any(
        p.suffix in {".safetensors", ".bin", ".json"} for p in out.iterdir()
    )


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stderr if hasattr(result, "stderr") else result.output


@pytest.mark.parametrize("case,kwargs,words", CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors_in_mergekit_yaml(family, tmp_path, case, kwargs, words):
    config = write(tmp_path / "c.yml", config_text(family, **kwargs))
    result = run_tool("mergekit-yaml", config, tmp_path / "out", "--quiet")
    assert result.returncode != 0
    line = last_error_line(result.stderr)
    assert all(word in line for word in words), line
    # Issue 25: one line, as mergekit-pcb merge prints it (was a 35-53 line traceback).
    assert "Traceback" not in result.stderr and result.stderr.strip() == line, result.stderr
    assert line.startswith("Error: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case,kwargs,words", CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors_in_mergekit_pcb_merge(family, tmp_path, case, kwargs, words):
    config = write(tmp_path / "c.yml", config_text(family, **kwargs))
    code, stderr = invoke("merge", config, tmp_path / "out")
    assert code != 0
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert all(word in stderr for word in words), stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "parameters,expected",
    [
        ("{pcb_rato: 0.2}", "did you mean 'pcb_ratio'"),
        ("{clamp: 0.01}", "did you mean 'clamp_ratio'"),
        ("{lamda: 1.0}", "did you mean 'lambda'"),
        ("{pcb_ratio: [{filter: mlp, value: 2}, {value: 0.1}]}", "parameters.pcb_ratio[0]"),
        ("{pcb_ratio: [0.1, 0.5, 1.2]}", "parameters.pcb_ratio[2]"),
        ("{pcb_ratio: true}", "pcb_ratio"),
    ],
)
def test_strict_names_and_values_at_top_level(family, parameters, expected):
    with pytest.raises(ConfigError, match=r"allowed") as error:
        validate_config(config_text(family, parameters=parameters))
    assert expected in str(error.value)


def test_strict_checks_every_place_parameters_appear(family):
    e0, e1 = family.experts[:2]
    per_model = config_text(family, weight="1.0, wieght: 2")
    with pytest.raises(ConfigError, match=r"models\[0\].parameters.wieght.*did you mean 'weight'"):
        validate_config(per_model)
    shared_per_model = config_text(family, weight="1.0, pcb_ratio: 0.3")
    with pytest.raises(ConfigError, match=r"models\[0\].parameters.pcb_ratio.*shared"):
        validate_config(shared_per_model)
    slices = f"""merge_method: pcb
base_model: {family.base}
slices:
  - sources:
      - model: {family.base}
        layer_range: [0, 3]
      - model: {e0}
        layer_range: [0, 3]
        parameters: {{weigth: [{{filter: mlp, value: 1}}]}}
      - model: {e1}
        layer_range: [0, 3]
"""
    with pytest.raises(ConfigError, match=r"slices\[0\].sources\[1\].parameters.weigth.*'weight'"):
        validate_config(slices)
    slice_level = slices.replace("weigth", "weight") + "    parameters: {pcb_ration: 0.2}\n"
    with pytest.raises(ConfigError, match=r"slices\[0\].parameters.pcb_ration.*'pcb_ratio'"):
        validate_config(slice_level)
    on_base = config_text(family).replace(
        "models:\n", f"models:\n  - model: {family.base}\n    parameters: {{weight: 0.5}}\n"
    )
    with pytest.raises(ConfigError, match=r"no effect on the base model"):
        validate_config(on_base)


def test_strict_checks_schema_and_method(family):
    with pytest.raises(ConfigError, match=r"unknown key 'paramters'.*did you mean 'parameters'"):
        validate_config(config_text(family).replace("parameters: {}", "paramters: {}"))
    with pytest.raises(ConfigError, match=r"merge_method 'pbc'.*did you mean 'pcb'"):
        validate_config(config_text(family).replace("merge_method: pcb", "merge_method: pbc"))
    with pytest.raises(ConfigError, match=r"models"):
        validate_config(config_text(family) + "models: 3\n")
    with pytest.raises(ConfigError, match=r"mapping"):
        validate_config("- just\n- a list\n")


def test_numeric_strings_stay_valid(family):
    """PyYAML reads 1e-4 (no dot) as a string; mergekit accepts it, so must we."""
    config = validate_config(config_text(family, parameters="{clamp_ratio: 1e-4, pcb_ratio: 5e-1}"))
    assert config.parameters["clamp_ratio"] == "1e-4"


@pytest.fixture(scope="module")
def broken(tmp_path_factory, family):
    """An expert with one NaN, a base with one Inf, and an expert with a wider MLP."""
    root = tmp_path_factory.mktemp("broken")
    from safetensors.torch import save_file

    def variant(source: Path, name: str, edit) -> Path:
        target = root / name
        shutil.copytree(source, target)
        tensors = load_tensors(source)
        edit(tensors)
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
        return target

    def nan(t):
        t["model.layers.1.mlp.down_proj.weight"][3, 4] = float("nan")

    def inf(t):
        t["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("inf")

    def wider(t):
        t["model.layers.2.mlp.up_proj.weight"] = torch.zeros(70, 32)

    return {
        "nan": variant(family.experts[1], "nan_expert", nan),
        "inf_base": variant(family.base, "inf_base", inf),
        "shape": variant(family.experts[2], "odd_shape", wider),
    }


def test_nan_in_expert_names_tensor_and_model(family, broken, tmp_path):
    config = write(tmp_path / "c.yml", config_text(family, expert=broken["nan"]))
    result = run_tool("mergekit-yaml", config, tmp_path / "a", "--quiet")
    line = last_error_line(result.stderr)
    assert result.returncode != 0
    assert "model.layers.1.mlp.down_proj.weight" in line and str(broken["nan"]) in line, line
    assert "finite" in line
    assert not (tmp_path / "a" / "config.json").exists()
    # The same through mergekit-pcb, as a real process: one line, no traceback.
    result = run_tool("mergekit-pcb", "merge", config, tmp_path / "b", "--quiet")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    line = last_error_line(result.stderr)
    assert line.startswith("Error:") and "down_proj" in line and str(broken["nan"]) in line
    assert not (tmp_path / "b" / "config.json").exists()


def test_inf_in_base_names_the_base(family, broken, tmp_path):
    config = write(
        tmp_path / "c.yml",
        config_text(family).replace(
            f"base_model: {family.base}", f"base_model: {broken['inf_base']}"
        ),
    )
    code, stderr = invoke("merge", config, tmp_path / "out", "--quiet")
    assert code != 0 and "Traceback" not in stderr
    assert "q_proj" in stderr and "base model" in stderr and str(broken["inf_base"]) in stderr
    assert not (tmp_path / "out" / "config.json").exists()


def test_mismatched_shapes_without_tokenizer_alignment(family, broken, tmp_path):
    config = write(tmp_path / "c.yml", config_text(family, expert=broken["shape"]))
    result = run_tool("mergekit-yaml", config, tmp_path / "a", "--quiet")
    assert result.returncode != 0
    line = last_error_line(result.stderr)
    assert "model.layers.2.mlp.up_proj.weight" in line and "(70, 32)" in line, line
    assert not (tmp_path / "a" / "config.json").exists()
    code, stderr = invoke("merge", config, tmp_path / "b", "--quiet")
    assert code != 0 and "Traceback" not in stderr and "up_proj" in stderr
    assert not (tmp_path / "b" / "config.json").exists()


def test_valid_config_still_merges_after_errors(family, tmp_path):
    """Sanity: the same helper config without the error merges (the errors were real)."""
    config = write(tmp_path / "c.yml", config_text(family, parameters="{pcb_ratio: 0.2}"))
    code, _ = invoke("merge", config, tmp_path / "out", "--quiet")
    assert code == 0 and (tmp_path / "out" / "config.json").exists()


# Issue 14: settings strict validation let through, or answered with a pydantic dump.
SHAPE_ERRORS = [
    # `[]` gives no value: mergekit silently merged with the default 0.1.
    (
        "pcb_ratio-empty",
        {"parameters": "{pcb_ratio: []}"},
        "pcb: config.parameters.pcb_ratio: parameter 'pcb_ratio' got [] (no value: mergekit "
        f"would use the default); allowed: {PCB_RATIO.allowed}",
    ),
    (
        "pcb_ratio-null",
        {"parameters": "{pcb_ratio: null}"},
        f"pcb: config.parameters.pcb_ratio: parameter 'pcb_ratio' got null; allowed: "
        f"{PCB_RATIO.allowed}",
    ),
    (
        "filter-key-typo",
        {"parameters": "{pcb_ratio: [{filter: mlp, valeu: 0.2}, {value: 0.1}]}"},
        "config.parameters.pcb_ratio[0]: unknown key 'valeu' in a filter entry; did you mean "
        "'value'? (allowed keys: value, filter)",
    ),
    (
        "filter-without-value",
        {"parameters": "{pcb_ratio: [{filter: mlp}]}"},
        "config.parameters.pcb_ratio[0]: filter entry without 'value'; allowed: "
        "{filter: ..., value: ...}",
    ),
    (
        "weight-null-per-model",
        {"weight": "null"},
        "pcb: models[0].parameters.weight: parameter 'weight' got null; allowed: a finite "
        "number, this model's task coefficient",
    ),
    (
        "nested-gradient",
        {"parameters": "{lambda: [[1.0, 2.0]]}"},
        "config.parameters.lambda[0]: got [1.0, 2.0]; allowed: a number or string, or a "
        "gradient (a flat list of them)",
    ),
    (
        "dtype-float8",
        {"extra": "dtype: float8\n"},
        "{config}: dtype: 'float8' is not a dtype mergekit merges in (allowed: bfloat16, "
        "float16, float32, float64)",
    ),
    (
        "out_dtype-int64",
        {"extra": "out_dtype: int64\n"},
        "{config}: out_dtype: 'int64' is not a dtype mergekit merges in (allowed: bfloat16, "
        "float16, float32, float64)",
    ),
]


@pytest.mark.parametrize("case,kwargs,message", SHAPE_ERRORS, ids=[c[0] for c in SHAPE_ERRORS])
def test_settings_mergekit_would_mangle_are_one_line(family, tmp_path, case, kwargs, message):
    """Rows 5, 6, 11 of issue 14: each is one line naming the key, before anything is written."""
    config = write(tmp_path / "c.yml", config_text(family, **kwargs))
    code, stderr = invoke("merge", config, tmp_path / "out")
    assert code != 0
    assert stderr == f"Error: {message.replace('{config}', str(config))}\n", stderr
    assert not (tmp_path / "out").exists()


def test_every_dtype_allowed_is_one_mergekit_merges_in(family, tmp_path):
    """The allowed list is asked of mergekit, so each entry must really merge."""
    from mergekit_pcb.config_check import merge_dtypes

    assert merge_dtypes() == ["bfloat16", "float16", "float32", "float64"]
    for dtype in ("torch.float16", "bfloat16"):  # mergekit accepts the torch. prefix too
        validate_config(config_text(family, extra=f"dtype: {dtype}\n"))


@pytest.fixture(scope="module")
def large(tmp_path_factory, family):
    """Base and two experts whose final norm weights sit near float16's limit (65504):
    base 40000, experts up to 60000, so base + 2 * m reaches ~80000."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("large")
    generator = torch.Generator().manual_seed(0)
    paths = []
    for source in family.models[:3]:
        target = root / source.name
        shutil.copytree(source, target)
        tensors = load_tensors(source)
        norm = torch.full_like(tensors["model.norm.weight"], 40000.0)
        if source != family.base:
            norm += 20000 * torch.rand(norm.shape, generator=generator)
        tensors["model.norm.weight"] = norm
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
        paths.append(target)
    return paths


def large_config(large, extra: str) -> str:
    base, e0, e1 = large
    return (
        f"merge_method: pcb\nbase_model: {base}\nmodels:\n  - model: {e0}\n  - model: {e1}\n"
        f"parameters: {{lambda: 2.0, pcb_ratio: 0.5}}\n{extra}\n"
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            "dtype: float16",
            "the merged values exceed float16's range (+-65504) and would be written as inf; "
            "allowed: values within it (set dtype: bfloat16 or dtype: float32)",
        ),
        (
            "out_dtype: float16",
            "the merged values reach {peak}, beyond float16's range (+-65504) and would be "
            "written as inf; allowed: values within it (set out_dtype: bfloat16 or "
            "out_dtype: float32)",
        ),
    ],
    ids=["dtype", "out_dtype"],
)
def test_float16_overflow_names_tensor_dtype_and_fix(large, tmp_path, extra, message):
    """Row 9 of issue 14: mergekit wrote inf with exit status 0."""
    # The same merge in float32 is finite and really exceeds float16's range.
    code, stderr = invoke(
        "merge", write(tmp_path / "f32.yml", large_config(large, "")), tmp_path / "a"
    )
    assert code == 0, stderr
    norm = load_tensors(tmp_path / "a")["model.norm.weight"]
    peak = float(norm.abs().max())
    assert torch.isfinite(norm).all() and peak > 65520  # 65520 and above round to inf
    config = write(tmp_path / "c.yml", large_config(large, extra))
    code, stderr = invoke("merge", config, tmp_path / "b", "--no-copy-tokenizer")
    assert code != 0 and "Traceback" not in stderr
    expected = message.format(peak=f"{peak:.6g}")
    assert (
        last_error_line(stderr) == f"Error: ValueError: pcb: tensor 'model.norm.weight': {expected}"
    )
    assert not (tmp_path / "b" / "config.json").exists()


def test_float16_overflow_through_mergekit_yaml(large, tmp_path):
    """The check is the method's, so the unmodified mergekit-yaml stops too."""
    config = write(tmp_path / "c.yml", large_config(large, "dtype: float16"))
    result = run_tool("mergekit-yaml", config, tmp_path / "out", "--quiet")
    assert result.returncode != 0
    line = last_error_line(result.stderr)
    assert "model.norm.weight" in line and "float16" in line and "dtype: float32" in line, line
    assert not (tmp_path / "out" / "config.json").exists()
