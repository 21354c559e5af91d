"""``mergekit-pcb merge`` and the output folder (issue 14, rows 7 and 8), and the same
rule for every command that writes a folder (issue 25, item 3).

mergekit writes into whatever OUT_PATH holds: a stale index of an earlier sharded
merge makes the new folder unloadable, and a killed merge's temporary shards survive
a rerun. ``mergekit-pcb merge`` refuses a folder holding a model unless
``--overwrite`` and removes the temporary shards it recognises; the unmodified
``mergekit-yaml`` keeps mergekit's behaviour (shown here, as the README says).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import load_tensors, run_python, run_tool, write
from mergekit.scripts.run_yaml import main as mergekit_yaml
from safetensors.torch import save_file

from mergekit_pcb.cli import main as cli
from mergekit_pcb.output_folder import is_model_file


@pytest.fixture
def config(family, tmp_path):
    e0, e1 = family.experts[:2]
    text = (
        f"merge_method: pcb\nbase_model: {family.base}\nmodels:\n  - model: {e0}\n"
        f"  - model: {e1}\nparameters: {{pcb_ratio: 0.3}}\n"
    )
    return write(tmp_path / "c.yml", text)


def invoke(command, *args) -> tuple[int, str]:
    result = CliRunner().invoke(command, [str(a) for a in args])
    return result.exit_code, result.stderr


def snapshot(folder) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture
def fresh(config, tmp_path):
    """What a merge into an empty folder leaves: file names and tensors."""
    out = tmp_path / "fresh"
    code, stderr = invoke(cli, "merge", config, out, "--no-copy-tokenizer")
    assert code == 0, stderr
    return sorted(os.listdir(out)), load_tensors(out)


def test_a_folder_holding_a_model_is_refused_unless_overwrite(config, fresh, tmp_path):
    """Row 7: a stale index and shards of an earlier, sharded merge."""
    out = tmp_path / "out"
    code, stderr = invoke(cli, "merge", config, out, "--out-shard-size", "30K")
    assert code == 0, stderr
    assert (out / "model.safetensors.index.json").exists()
    before = snapshot(out)

    code, stderr = invoke(cli, "merge", config, out, "--no-copy-tokenizer")
    assert code != 0 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith(
        f"Error: output folder {out} already holds model files (model-00001-of-"
    )
    assert stderr.rstrip().endswith(
        "mergekit would write the new model among them. Allowed: --overwrite (removes those "
        "weights and index files first) or another folder"
    )
    assert snapshot(out) == before  # nothing touched

    code, stderr = invoke(cli, "merge", config, out, "--no-copy-tokenizer", "--overwrite")
    assert code == 0, stderr
    names, tensors = fresh
    left = os.listdir(out)  # the first merge's tokenizer files stay: not model files
    assert set(names) <= set(left)
    assert [n for n in left if is_model_file(n)] == ["model.safetensors"]
    loaded = load_tensors(out)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # loads: no stale index points elsewhere


def test_plain_mergekit_yaml_writes_among_a_stale_model(config, tmp_path):
    """mergekit's own behaviour, which the README describes: rc 0, the stale index stays
    and loaders follow it to the old shards."""
    out = tmp_path / "out"
    assert invoke(cli, "merge", config, out, "--out-shard-size", "30K")[0] == 0
    code, stderr = invoke(mergekit_yaml, config, out, "--no-copy-tokenizer")
    assert code == 0, stderr
    assert (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").exists()


KILL_AFTER_THIRD_SHARD = """
import os, signal, sys
from mergekit.io import tensor_writer

# SIGKILL this process right after mergekit wrote its third temporary shard: the state
# a merge killed mid-write leaves, every time (an outside kill would race the writer).
write_shard = tensor_writer.TensorWriter._write_shard_task

def write_then_die(self, shard_data, shard_index, shard_path):
    write_shard(self, shard_data, shard_index, shard_path)
    if shard_index == 2:
        os.kill(os.getpid(), signal.SIGKILL)

tensor_writer.TensorWriter._write_shard_task = write_then_die
from mergekit_pcb.cli import main
sys.argv = ["mergekit-pcb", "merge", {config!r}, {out!r}, "--out-shard-size", "30K",
            "--no-copy-tokenizer"]
main()
"""


@pytest.fixture
def killed(config, tmp_path):
    out = tmp_path / "killed"
    result = run_python(KILL_AFTER_THIRD_SHARD.format(config=str(config), out=str(out)))
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert sorted(os.listdir(out)) == [f"model-{i}.safetensors" for i in (1, 2, 3)]
    return out


def test_rerun_after_a_killed_merge_leaves_only_the_new_model(config, fresh, killed, caplog):
    """Row 8: the rerun (default shard size: one shard) left model-2 and model-3 behind."""
    with caplog.at_level(logging.WARNING, logger="mergekit_pcb"):
        code, stderr = invoke(cli, "merge", config, killed, "--no-copy-tokenizer")
    assert code == 0, stderr
    assert (
        f"removed 3 temporary shard(s) that an interrupted merge left in {killed}: "
        "model-1.safetensors, model-2.safetensors, model-3.safetensors"
    ) in caplog.text
    names, tensors = fresh
    assert sorted(os.listdir(killed)) == names
    loaded = load_tensors(killed)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_plain_mergekit_yaml_keeps_a_killed_merge_s_shards(config, killed):
    code, stderr = invoke(mergekit_yaml, config, killed, "--no-copy-tokenizer")
    assert code == 0, stderr
    assert {"model-2.safetensors", "model-3.safetensors"} <= set(os.listdir(killed))


def test_files_mergekit_did_not_write_are_never_removed(config, tmp_path, family):
    """A temporary shard's name is not enough: its metadata must be mergekit's."""
    out = tmp_path / "out"
    out.mkdir()
    save_file({"x": torch.zeros(2)}, out / "model-1.safetensors", metadata={"format": "mine"})
    (out / "notes.txt").write_text("keep me")
    code, stderr = invoke(cli, "merge", config, out)
    assert code != 0 and "already holds model files (model-1.safetensors)" in stderr
    assert sorted(os.listdir(out)) == ["model-1.safetensors", "notes.txt"]
    # An input model's own folder is refused even with --overwrite.
    code, stderr = invoke(cli, "merge", config, family.experts[0], "--overwrite")
    assert code != 0
    assert f"is the folder of input model '{family.experts[0]}'" in stderr
    assert (family.experts[0] / "model.safetensors").exists()


# Issue 25, item 3: one rule for every command that writes a folder, in the same words.
PREVIOUS_RUN = re.compile(
    r"Error: output folder (?P<folder>\S+) already holds (?P<what>[a-z ]+) "
    r"\((?P<files>[^)]*)\); (?P<why>[^.]+)\. "
    r"Allowed: (?P<option>--overwrite|--resume) \([^)]*\) or another folder"
)


def previous_run(code: int, stderr: str, folder, option: str = "--overwrite") -> dict:
    assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
    match = PREVIOUS_RUN.fullmatch(stderr.strip())
    assert match, stderr
    assert match["folder"] == str(folder) and match["option"] == option
    return match.groupdict()


def test_merge_refuses_in_the_shared_words(config, tmp_path):
    out = tmp_path / "out"
    assert invoke(cli, "merge", config, out, "--no-copy-tokenizer")[0] == 0
    found = previous_run(*invoke(cli, "merge", config, out), out)
    assert (found["what"], found["files"]) == ("model files", "model.safetensors")


def test_demo_refuses_an_earlier_demo_unless_overwrite(tmp_path):
    """demo wrote over its earlier model silently; now it refuses, as merge does."""
    out = tmp_path / "demo"

    def demo(*options) -> tuple[int, str]:  # a process per run, as a user runs it
        result = run_tool("mergekit-pcb", "demo", out, "--experts", "1", *options)
        return result.returncode, result.stderr

    assert demo()[0] == 0
    first, before = load_tensors(out), snapshot(out)
    found = previous_run(*demo("--seed", "1"), out)
    assert (found["what"], found["files"]) == ("model files", "model.safetensors")
    assert found["why"] == "mergekit would write the new model among them"
    assert snapshot(out) == before  # nothing touched, inputs included
    code, stderr = demo("--seed", "1", "--overwrite")
    assert code == 0, stderr
    second = load_tensors(out)
    assert [n for n in os.listdir(out) if is_model_file(n)] == ["model.safetensors"]
    assert not all(torch.equal(first[k], second[k]) for k in first)  # seed 1's model now


def test_inspect_refuses_an_earlier_report_unless_overwrite(config, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "notes.txt").write_text("mine")
    assert invoke(cli, "inspect", config, report, "--no-progress")[0] == 0
    before = snapshot(report)
    found = previous_run(*invoke(cli, "inspect", config, report, "--no-progress"), report)
    assert found["what"] == "a report"
    assert found["files"].startswith("report.html, report.json, experts.png, layers.png and ")
    assert snapshot(report) == before
    code, stderr = invoke(cli, "inspect", config, report, "--no-progress", "--overwrite")
    assert code == 0, stderr
    after = snapshot(report)
    assert after.keys() == before.keys() and after["notes.txt"] == before["notes.txt"]
    assert after["report.json"][1] > before["report.json"][1]  # written again


def test_evolve_refuses_an_earlier_search_unless_resume(family, tmp_path):
    data = write(tmp_path / "d.jsonl", json.dumps({"text": "abc"}) + "\n")
    search = {
        "base_model": str(family.base),
        "models": [str(p) for p in family.experts[:2]],
        "evaluation": {"tasks": [{"name": "t", "type": "loss", "data": str(data)}]},
    }
    yml = write(tmp_path / "s.yml", yaml.safe_dump(search))
    out = tmp_path / "search"
    out.mkdir()
    (out / "history.jsonl").write_text('{"member": 0}\n')
    before = snapshot(out)
    found = previous_run(*invoke(cli, "evolve", yml, out, "--no-progress"), out, "--resume")
    assert (found["what"], found["files"]) == ("a search", "history.jsonl")
    assert snapshot(out) == before
