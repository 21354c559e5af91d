"""Every model a config names is found before anything is loaded or written (issue 14).

A miss is one line naming the path, the folder it was resolved against and, where the
other folder a user may have meant holds it, that folder. A name that can only be a
Hub id fails at once, without huggingface_hub's ~27 s of retries, when the Hub cannot
be reached or HF_HUB_OFFLINE is set. Each command keeps its own rule: ``merge`` reads
relative paths from the working directory (as mergekit-yaml does), ``evolve`` from the
YAML's folder.
"""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from conftest import check, last_error_line, run_tool, write

from mergekit_pcb.cli import main as cli


def merge_config(base, *models) -> str:
    lines = ["merge_method: pcb", f"base_model: {base}", "models:"]
    lines += [f"  - model: {model}" for model in models]
    return "\n".join(lines) + "\nparameters: {pcb_ratio: 0.2}\n"


def invoke(*args, env: dict | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    return result.exit_code, result.stderr


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("Error: "), stderr
    return stderr.strip()


def test_merge_names_a_missing_absolute_path(family, tmp_path):
    """Row 1: was "OSError: Repo id must be in the form 'repo_name'..."."""
    missing = tmp_path / "data" / "models" / "expert-x"
    config = write(tmp_path / "c.yml", merge_config(family.base, missing, family.experts[1]))
    code, stderr = invoke("merge", config, tmp_path / "out")
    assert code != 0
    assert one_error_line(stderr) == (
        f"Error: models[0].model: model '{missing}': no such local folder {missing}"
    )
    assert not (tmp_path / "out").exists()


def test_merge_fails_at_once_for_an_unknown_hub_id_offline(family, tmp_path):
    """Row 2 with HF_HUB_OFFLINE: the Hub is not asked, and the line says why."""
    config = write(tmp_path / "c.yml", merge_config(family.base, "m/nothere", family.experts[1]))
    code, stderr = invoke("merge", config, tmp_path / "out", env={"HF_HUB_OFFLINE": "1"})
    assert code != 0
    line = one_error_line(stderr)
    assert line.startswith("Error: models[0].model: model 'm/nothere': no local folder ")
    assert "as a Hugging Face Hub id it needs the Hub" in line
    assert line.endswith("but HF_HUB_OFFLINE is set, so the Hub was not asked")
    assert not (tmp_path / "out").exists()


def test_merge_asks_an_unreachable_hub_once_without_retries(family, tmp_path):
    """Row 2 without HF_HUB_OFFLINE: one request to an endpoint that refuses, no retries
    (huggingface_hub's own client printed five "Retrying in Ns" warnings, twice each)."""
    config = write(tmp_path / "c.yml", merge_config(family.base, "m/nothere", family.experts[1]))
    endpoint = "http://127.0.0.1:9"  # the discard port: refused at once, on any machine
    result = run_tool(
        "mergekit-pcb",
        "merge",
        config,
        tmp_path / "out",
        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint},
    )
    assert result.returncode != 0
    assert "Retry" not in result.stderr and "Traceback" not in result.stderr
    line = last_error_line(result.stderr)
    assert line.startswith("Error: models[0].model: model 'm/nothere': no local folder ")
    assert f"the Hugging Face Hub ({endpoint}) could not be reached" in line
    assert "set HF_HUB_OFFLINE=1" in line
    assert not (tmp_path / "out").exists()


def test_merge_reads_relative_paths_from_the_working_directory(family, tmp_path, monkeypatch):
    """Row 10: the rule stays mergekit-yaml's; a miss names the YAML's folder that has it."""
    x, y = tmp_path / "x", tmp_path / "y"
    x.mkdir()
    y.mkdir()
    (y / "fam").symlink_to(family.root, target_is_directory=True)
    names = [f"./fam/{path.name}" for path in family.models]
    config = write(y / "c.yml", merge_config(names[0], *names[1:3]))
    monkeypatch.chdir(x)
    code, stderr = invoke("merge", config, x / "out")
    assert code != 0
    assert one_error_line(stderr) == (
        f"Error: base_model: model './fam/base': no such local folder {x}/fam/base "
        f"(relative paths are read from the working directory {x}, as mergekit-yaml does); "
        f"the YAML's folder {y} has one: write it as {y}/fam/base"
    )
    assert not (x / "out").exists()
    monkeypatch.chdir(y)  # from the YAML's folder the same config merges
    code, stderr = invoke("merge", config, x / "out")
    assert code == 0, stderr
    assert (x / "out" / "model.safetensors").exists()


def search_yml(folder, base, models) -> dict:
    (folder / "val.jsonl").write_text(json.dumps({"text": "abc"}) + "\n")
    return {
        "base_model": str(base),
        "models": [str(m) for m in models],
        "evaluation": {"tasks": [{"name": "t", "type": "loss", "data": "val.jsonl"}]},
    }


def test_evolve_names_a_missing_model_before_writing(tmp_path):
    """Row 3: was a traceback from evolve/layout.py, with run.json left in OUT_DIR."""
    cfg = search_yml(tmp_path, "./models/base", ["./models/a", "./models/b"])
    yml = write(tmp_path / "s.yml", yaml.safe_dump(cfg))
    out = tmp_path / "out"
    code, stderr = invoke("evolve", yml, out)
    assert code != 0
    assert one_error_line(stderr) == (
        f"Error: base_model: model './models/base': no such local folder {tmp_path}/models/base "
        f"(relative paths are read from the YAML's folder {tmp_path})"
    )
    assert not out.exists()


def test_evolve_reads_relative_paths_from_the_yaml_folder(tmp_path, monkeypatch):
    """Row 10 for evolve: the rule stays the YAML's folder; a miss names the working
    directory that has the folder."""
    x, y = tmp_path / "x", tmp_path / "y"
    for name in ("base", "a", "b"):
        (x / "m" / name).mkdir(parents=True)
    y.mkdir()
    yml = write(y / "s.yml", yaml.safe_dump(search_yml(y, "m/base", ["m/a", "m/b"])))
    monkeypatch.chdir(x)
    code, stderr = invoke("evolve", yml, x / "out", env={"HF_HUB_OFFLINE": "1"})
    assert code != 0
    assert one_error_line(stderr) == (
        f"Error: base_model: model 'm/base': no such local folder {y}/m/base (relative paths "
        f"are read from the YAML's folder {y}); the working directory {x} has one: "
        f"write it as {x}/m/base"
    )
    assert not (x / "out").exists()


def test_existing_local_folders_pass(family, tmp_path):
    """The check lets a normal merge through (the errors above are real misses)."""
    config = write(tmp_path / "c.yml", merge_config(family.base, *family.experts[:2]))
    check(run_tool("mergekit-pcb", "merge", config, tmp_path / "out", "--no-copy-tokenizer"))


def test_evolve_reads_every_relative_path_of_its_yaml_from_the_yaml_folder(tmp_path, monkeypatch):
    """Issue 25, item 4: ``cache.dir`` too (one that did not exist yet was left relative to
    the working directory), and a missing data file names the folder it was read from."""
    from mergekit_pcb.evolve.config import EvolveConfigError, load_config

    x, y = (tmp_path / "x").resolve(), (tmp_path / "y").resolve()
    x.mkdir()
    y.mkdir()
    search = {**search_yml(y, "m/base", ["m/a", "m/b"]), "cache": {"dir": "statistics"}}
    yml = write(y / "s.yml", yaml.safe_dump(search))
    monkeypatch.chdir(x)
    loaded = load_config(yml)
    assert loaded.cache.dir == str(y / "statistics")
    assert loaded.evaluation.tasks[0].data == str(y / "val.jsonl")
    search["evaluation"]["tasks"][0]["data"] = "nope.jsonl"
    write(yml, yaml.safe_dump(search))
    with pytest.raises(EvolveConfigError) as error:
        load_config(yml)
    assert str(error.value) == (
        "task 't': data file 'nope.jsonl' does not exist "
        f"(relative paths are read from the YAML's folder {y})"
    )
