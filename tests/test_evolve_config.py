"""Bad search configs fail with a clear message before any model is loaded.

Every config here names models that do not exist: reaching the model-loading
stage would fail differently, so each expected message proves the check ran first.
"""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import run_tool

from mergekit_pcb.evolve.config import EvolveConfigError, load_config


def _write(tmp_path, cfg: dict, name="s.yml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def good(tmp_path) -> dict:
    (tmp_path / "val.jsonl").write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
    return {
        "base_model": "no/such-base",
        "models": ["no/such-a", "no/such-b"],
        "search": {"pcb_ratio": [0.05, 0.5], "lambda": [0.5, 2.0], "weight": 1.0},
        "evaluation": {"tasks": [{"name": "em", "type": "exact_match", "data": "val.jsonl"}]},
    }


def _error(tmp_path, cfg) -> str:
    with pytest.raises(EvolveConfigError) as info:
        load_config(_write(tmp_path, cfg))
    return str(info.value)


def test_good_config_resolves_paths(tmp_path, good):
    cfg = load_config(_write(tmp_path, good))
    assert cfg.evaluation.tasks[0].data == str((tmp_path / "val.jsonl").resolve())
    assert cfg.search.range("weight") == (1.0, 1.0)
    assert cfg.search.range("lambda") == (0.5, 2.0)


@pytest.mark.parametrize(
    "where,key,expected",
    [
        ((), "optimiser", "did you mean 'optimizer'"),
        (("search",), "pcb_ratoi", "did you mean 'pcb_ratio'"),
        (("search",), "lamda", "did you mean 'lambda'"),
        (("evaluation", "tasks", 0), "test_dta", "did you mean 'test_data'"),
    ],
)
def test_unknown_keys_suggest(tmp_path, good, where, key, expected):
    node = good
    for step in where:
        node = node[step]
    node[key] = 1
    message = _error(tmp_path, good)
    assert f"unknown key '{key}'" in message and expected in message


@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("pcb_ratio", [0.5, 0.1], "low > high"),
        ("pcb_ratio", [0.0, 0.5], "low end 0.0 is outside a number in (0, 1]"),
        ("pcb_ratio", [0.1, 1.5], "high end 1.5 is outside a number in (0, 1]"),
        ("pcb_ratio", 0, "outside a number in (0, 1]"),
        ("lambda", [2.0, 1.0], "search.lambda: range [2.0, 1.0] has low > high"),
        ("weight", [1, 2, 3], "search.weight: got [1, 2, 3]"),
        ("weight", "heavy", "search.weight: got 'heavy'"),
    ],
)
def test_ranges(tmp_path, good, name, value, expected):
    good["search"][name] = value
    assert expected in _error(tmp_path, good)


def test_clamp_ratio_domain(tmp_path, good):
    good["parameters"] = {"clamp_ratio": 0.5}
    assert "parameters.clamp_ratio" in _error(tmp_path, good)


def test_missing_data_file(tmp_path, good):
    good["evaluation"]["tasks"][0]["test_data"] = "nope.jsonl"
    message = _error(tmp_path, good)
    assert "test_data file 'nope.jsonl' does not exist" in message


@pytest.mark.parametrize(
    "line,expected",
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "a"}', '"answer" is missing'),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, good, line, expected):
    ok = json.dumps({"prompt": "a", "answer": "b"})
    (tmp_path / "val.jsonl").write_text(f"{ok}\n\n{ok}\n{line}\n")
    message = _error(tmp_path, good)
    assert "val.jsonl:4: " in message and expected in message


def test_choice_rows_are_checked(tmp_path, good):
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"prompt": "p", "choices": ["a", "b"], "label": 2}) + "\n"
    )
    good["evaluation"]["tasks"] = [{"name": "c", "type": "choice", "data": "c.jsonl"}]
    assert "c.jsonl:1" in _error(tmp_path, good)


def test_python_target_must_import(tmp_path, good):
    good["evaluation"]["tasks"] = [
        {"name": "p", "type": "python", "function": "no_such_module_xyz:score"}
    ]
    assert "cannot import module 'no_such_module_xyz'" in _error(tmp_path, good)
    (tmp_path / "my_scores.py").write_text("def score(model, tokenizer):\n    return 1.0\n")
    good["evaluation"]["tasks"][0]["function"] = "my_scores:missing"
    assert "has no callable 'missing'" in _error(tmp_path, good)
    good["evaluation"]["tasks"][0]["function"] = "my_scores:score"
    assert load_config(_write(tmp_path, good)).evaluation.tasks[0].function == "my_scores:score"


def test_task_type_fields(tmp_path, good):
    good["evaluation"]["tasks"][0]["higher_is_better"] = False
    assert "higher_is_better is fixed" in _error(tmp_path, good)
    good["evaluation"]["tasks"] = [{"name": "x", "type": "loss"}]
    assert "needs 'data'" in _error(tmp_path, good)


def test_cli_reports_error_without_loading(tmp_path, good):
    good["search"]["pcb_ratio"] = [0.5, 0.1]
    result = run_tool("mergekit-pcb", "evolve", _write(tmp_path, good), tmp_path / "out")
    assert result.returncode != 0
    assert "search.pcb_ratio: range [0.5, 0.1] has low > high" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_example_search_config_is_valid():
    """examples/evolve.yml parses, and its data files exist and are well-formed."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "evolve.yml"
    cfg = load_config(example)
    assert [t.type for t in cfg.evaluation.tasks] == ["exact_match", "loss"]
    assert all(t.has_test for t in cfg.evaluation.tasks)
    assert cfg.base_model.endswith("models/base")


def test_example_label_free_search_config_is_valid():
    """examples/evolve-label-free.yml parses; its prompts are keyed by the resolved models."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "evolve-label-free.yml"
    cfg = load_config(example)
    (task,) = cfg.evaluation.tasks
    assert task.type == "agreement" and not task.has_test
    assert sorted(task.prompts) == sorted(cfg.models)
    assert all(Path(p).is_file() for p in task.prompts.values())


def test_python_kwargs_are_checked_against_the_function(tmp_path, good):
    (tmp_path / "scorers_kw.py").write_text(
        "def score(model, tokenizer, task, n=3):\n    return 0.0\n"
    )
    task = {"name": "p", "type": "python", "function": "scorers_kw:score"}
    ok = load_config(
        _write(tmp_path, {**good, "evaluation": {"tasks": [{**task, "kwargs": {"task": "max"}}]}})
    )
    (spec,) = ok.evaluation.tasks
    assert spec.call_kwargs("search") == {"task": "max"}
    assert spec.call_kwargs("test") == {"task": "max"}  # test_kwargs default to kwargs
    msg = _error(tmp_path, {**good, "evaluation": {"tasks": [{**task, "kwargs": {"tsk": "max"}}]}})
    assert "task 'p'" in msg and "tsk" in msg and "scorers_kw:score" in msg
    msg = _error(tmp_path, {**good, "evaluation": {"tasks": [task]}})  # 'task' is required
    assert "task 'p'" in msg and "missing" in msg
    bad_test = {
        **task,
        "kwargs": {"task": "a"},
        "test_function": "scorers_kw:score",
        "test_kwargs": {"n": 1},
    }
    assert "missing" in _error(tmp_path, {**good, "evaluation": {"tasks": [bad_test]}})
    loss = {"name": "em", "type": "exact_match", "data": "val.jsonl", "kwargs": {"a": 1}}
    assert "only for type python" in _error(tmp_path, {**good, "evaluation": {"tasks": [loss]}})


@pytest.mark.parametrize(
    "optimizer,expected",
    [
        ({"budget": 4, "sweep": [2, 2]}, "optimizer.budget: 4 is less than the 5"),
        ({"budget": 5, "sweep": [2, 2], "start": {"lambda": 1.0}}, "at least 6"),
        ({"sweep": [2]}, "optimizer.sweep"),
        ({"sweep": [0, 2]}, "optimizer.sweep"),
        ({"start": {"lambda": 2.5}}, "optimizer.start.lambda: 2.5 is outside search.lambda"),
        ({"start": {"pcb_ratio": 0.01}}, "optimizer.start.pcb_ratio"),
        ({"start": {"weight": [1.0]}}, "1 values for 2 models"),
        ({"start": {"weight": 1.2}}, "optimizer.start.weight: 1.2 is outside search.weight"),
        ({"start": {"lamda": 1.0}}, "did you mean 'lambda'"),
    ],
)
def test_start_and_sweep_are_checked(tmp_path, good, optimizer, expected):
    assert expected in _error(tmp_path, {**good, "optimizer": optimizer})


def test_sweep_over_a_fixed_quantity(tmp_path, good):
    cfg = {**good, "search": {**good["search"], "lambda": 1.0}, "optimizer": {"sweep": [3, 2]}}
    assert "search.lambda is fixed" in _error(tmp_path, cfg)
    cfg["optimizer"]["sweep"] = [1, 2]
    assert load_config(_write(tmp_path, cfg)).optimizer.warmup == 3


def test_new_keys_keep_old_fingerprints(tmp_path, good):
    """Searches that use none of the later keys resume across the upgrade."""
    import hashlib

    cfg = load_config(_write(tmp_path, good))
    # The fingerprint as computed before tokenizer/start/sweep/kwargs existed.
    old = cfg.model_dump(
        mode="json",
        by_alias=True,
        exclude={
            "cache": True,
            "tokenizer": True,
            "optimizer": {
                "budget",
                "budget_examples",
                "method",
                "fidelity",
                "start",
                "sweep",
                "rescore",
            },
            "evaluation": {
                "tasks": {
                    "__all__": {
                        "kwargs",
                        "test_kwargs",
                        "rescore_data",
                        "rescore_kwargs",
                        "examples",
                        "prompts",  # agreement's keys
                        "top_k",
                        "cache_max_gb",
                        "cache_dtype",
                    }
                }
            },
        },
    )
    old["optimizer"]["sigma"] = 0.2  # its default before it became optional (cmaes only)
    expected = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.fingerprint() == expected
    swept = {**good, "optimizer": {"sweep": [2, 2]}}
    assert load_config(_write(tmp_path, swept)).fingerprint() != expected
    task = {**good["evaluation"]["tasks"][0], "limit": 1}
    rescored = {**good, "optimizer": {"rescore": 2}, "evaluation": {"tasks": [task]}}
    limited = {**good, "evaluation": {"tasks": [task]}}
    fingerprint = load_config(_write(tmp_path, rescored)).fingerprint()
    assert fingerprint != load_config(_write(tmp_path, limited)).fingerprint()
    # The budget's unit may change on resume; the optimizer and the schedule may not.
    for optimizer in ({"budget_examples": 500}, {"sigma": 0.2}, {"method": "cmaes"}):
        same = {**good, "optimizer": optimizer}
        assert load_config(_write(tmp_path, same)).fingerprint() == expected
    for optimizer in ({"method": "tpe"}, {"fidelity": {"rungs": 2}}, {"sigma": 0.3}):
        other = {**good, "optimizer": optimizer}
        assert load_config(_write(tmp_path, other)).fingerprint() != expected


def _available() -> list[str]:
    """Devices torch offers here, listed independently of the code under test."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


@pytest.mark.parametrize("device", ["cuda", "cuda:99"])
def test_unavailable_device_fails_before_out_dir(tmp_path, good, device):
    """Issue 14, row 4: was an AssertionError traceback from load_model, run.json left."""
    import torch
    from click.testing import CliRunner

    from mergekit_pcb.cli import main as cli

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    for name in ("base", "a", "b"):  # folders are enough: the device fails before loading
        (tmp_path / "m" / name).mkdir(parents=True)
    good["base_model"], good["models"] = "m/base", ["m/a", "m/b"]
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["evolve", str(_write(tmp_path, good)), str(out), "--device", device]
    )
    assert result.exit_code != 0
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, result.stderr
    assert line.startswith(f"Error: device: '{device}' is not available (")
    assert line.endswith(f"); allowed here: {', '.join(_available())}")
    if not torch.cuda.is_available():
        assert f"torch {torch.__version__} " in line
    assert not out.exists()


def test_device_that_is_not_a_torch_device(tmp_path, good):
    good["device"] = "gpu"
    assert "device: 'gpu' is not a torch device; allowed: cpu, cuda, cuda:N, mps" in _error(
        tmp_path, good
    )


def test_command_line_overrides_are_validated(tmp_path, good):
    """--budget is checked like optimizer.budget in the YAML: it must fit the warm-up."""
    good["optimizer"] = {"budget": 10, "sweep": [2, 2]}
    result = run_tool(
        "mergekit-pcb", "evolve", _write(tmp_path, good), tmp_path / "out", "--budget", "3"
    )
    assert result.returncode != 0
    assert "command-line options: config: optimizer.budget: 3 is less than" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_lambda_auto_is_a_fixed_search_value_or_a_clear_error(tmp_path, good):
    """search.lambda: auto (issue 22's per-tensor scale) is fixed, never searched; a version
    of pcb without lambda: auto refuses it in one line naming the key."""
    from mergekit_pcb.evolve.candidate import Genome
    from mergekit_pcb.evolve.config import auto_lambda_available
    from mergekit_pcb.evolve.layout import Layout, merge_config

    auto = {**good, "search": {**good["search"], "lambda": "auto"}}
    start = {**good, "optimizer": {"start": {"lambda": "auto"}}}
    if not auto_lambda_available():
        assert "search.lambda: auto needs pcb's own lambda: auto" in _error(tmp_path, auto)
        assert "optimizer.start.lambda: auto needs" in _error(tmp_path, start)
        return
    cfg = load_config(_write(tmp_path, auto))
    genome = Genome.of(cfg.search, 2, 1)
    assert [c.kind for c in genome.coordinates] == ["pcb_ratio"]  # weights fixed at 1.0
    values = genome.decode([0.5])
    assert values.lambda_ == "auto"
    assert merge_config(cfg.inputs, values, Layout(1, 1, (), ()))["parameters"]["lambda"] == "auto"
    swept = {**auto, "optimizer": {"sweep": [2, 2]}}
    assert "optimizer.sweep: 2 lambda points, but search.lambda is fixed at auto" in _error(
        tmp_path, swept
    )
