"""``pcb`` is found by mergekit's unmodified tools and APIs without the user importing anything.

Every check runs in a fresh interpreter of this venv, where the only thing that
can register ``pcb`` is the installed ``mergekit_pcb_autoload.pth`` hook.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_close_to_reference,
    check,
    last_error_line,
    load_tensors,
    run_python,
    run_tool,
    write,
)
from reference import reference_merge

ROOT = Path(__file__).resolve().parents[1]
OPT_OUT = {"MERGEKIT_PCB_NO_AUTOLOAD": "1"}


def test_python_apis_find_pcb_without_import():
    code = """
import json, sys, torch
assert "mergekit_pcb" not in sys.modules
from mergekit.merge_methods import merge_state_dicts, merge_tensors, registered_methods
g = torch.Generator().manual_seed(0)
base = torch.randn(40, generator=g)
experts = [base + 0.1 * torch.randn(40, generator=g) for _ in range(2)]
a = merge_tensors([base, *experts], "pcb", base_index=0, parameters={"pcb_ratio": 0.3})
b = merge_state_dicts({"b": {"w": base}, "x": {"w": experts[0]}, "y": {"w": experts[1]}},
                      "pcb", base="b", parameters={"pcb_ratio": 0.3})["w"]
names = [m.spec.name for m in registered_methods()]
print(json.dumps({"inputs": [t.tolist() for t in (base, *experts)], "a": a.tolist(),
                  "b": b.tolist(), "count": names.count("pcb")}))
"""
    result = json.loads(check(run_python(code)).stdout.strip().splitlines()[-1])
    assert result["count"] == 1
    base, *experts = (torch.tensor(v) for v in result["inputs"])
    expected = reference_merge(base, experts, pcb_ratio=0.3)
    assert_close_to_reference(torch.tensor(result["a"]), expected)
    assert_close_to_reference(torch.tensor(result["b"]), expected)


def test_opt_out_disables_the_hook():
    probe = (
        "from mergekit.merge_methods import registered_methods as r; "
        "print(sorted(m.spec.name for m in r()))"
    )
    # (With the hook on, test_python_apis_find_pcb_without_import shows pcb registered.)
    off = check(run_python(probe, env=OPT_OUT)).stdout
    assert "'ties'" in off and "'pcb'" not in off
    armed = "import sys; print(any(getattr(f, 'mergekit_pcb', 0) for f in sys.meta_path))"
    for value, expected in [
        ("0", "True"),
        ("false", "True"),
        ("no", "True"),
        ("", "True"),
        ("1", "False"),
        ("yes", "False"),
        ("TRUE", "False"),
    ]:
        env = {"MERGEKIT_PCB_NO_AUTOLOAD": value}
        assert check(run_python(armed, env=env)).stdout.strip() == expected, value
    # An explicit import (before mergekit loads) still registers: the variable only
    # stops the automatic hook.
    explicit = check(run_python("import mergekit_pcb; " + probe, env=OPT_OUT)).stdout
    assert "'pcb'" in explicit


def test_opt_out_mergekit_yaml_does_not_know_pcb(family, tmp_path):
    config = write(
        tmp_path / "c.yml",
        f"""merge_method: pcb
base_model: {family.base}
models:
  - model: {family.experts[0]}
""",
    )
    result = run_tool("mergekit-yaml", config, tmp_path / "out", env=OPT_OUT)
    assert result.returncode != 0
    assert "pcb" in last_error_line(result.stderr)
    assert not (tmp_path / "out" / "config.json").exists()


def test_import_is_cheap_and_repeatable():
    code = """
import sys
assert not any(getattr(f, "mergekit_pcb", False) for f in sys.meta_path[1:]), "hook armed twice"
import mergekit_pcb
assert "torch" not in sys.modules and "mergekit" not in sys.modules, sorted(sys.modules)
import importlib
importlib.reload(mergekit_pcb)
import mergekit_pcb
mergekit_pcb.arm()
from mergekit.merge_methods import registered_methods, get
mergekit_pcb.register()
importlib.reload(mergekit_pcb)
assert [m.spec.name for m in registered_methods()].count("pcb") == 1
print(get("pcb").spec.pretty_name)
"""
    assert check(run_python(code)).stdout.strip() == "PCB"


def test_import_after_mergekit_registers_once():
    code = """
from mergekit.merge_methods import registered_methods
import mergekit_pcb, mergekit_pcb.method
import mergekit_pcb
assert [m.spec.name for m in registered_methods()].count("pcb") == 1
print("ok")
"""
    assert check(run_python(code)).stdout.strip() == "ok"
    # And with the hook off, importing after mergekit registers at once.
    code_off = code.replace("print", "import sys; print")
    assert check(run_python(code_off, env=OPT_OUT)).stdout.strip() == "ok"


def test_importing_the_method_module_first_registers():
    """Regression: method.py's own mergekit import fires the hook while it is half-initialized."""
    code = """
from mergekit_pcb.method import pcb
from mergekit.merge_methods import get, registered_methods
assert get("pcb") is pcb and [m.spec.name for m in registered_methods()].count("pcb") == 1
print("ok")
"""
    assert check(run_python(code)).stdout.strip() == "ok"


def test_two_hooks_in_this_style_do_not_recurse(tmp_path):
    """Regression: a second finder that, like ours, asks every other finder (another
    plugin, or a second copy of this one) made the two call each other until
    RecursionError, and importing the module failed. Both actions must run once."""
    (tmp_path / "probe_target.py").write_text("VALUE = 7\n")
    code = f"""
import sys
sys.path.insert(0, {str(tmp_path)!r})
from mergekit_pcb._autoload import _AfterImportFinder
ran = []
first = _AfterImportFinder("probe_target", lambda: ran.append("first"))
second = _AfterImportFinder("probe_target", lambda: ran.append("second"))
sys.meta_path[:0] = [first, second]
import probe_target
print(probe_target.VALUE, sorted(ran))
"""
    assert check(run_python(code)).stdout.strip() == "7 ['first', 'second']"


def test_interpreter_start_imports_nothing():
    code = (
        "import sys; print(sorted(m for m in sys.modules if m.startswith(('mergekit', 'torch'))))"
    )
    assert check(run_python(code)).stdout.strip() == "[]"


def test_mergekit_pytorch_finds_pcb(family, tmp_path):
    files = [m / "model.safetensors" for m in family.models]
    config = write(
        tmp_path / "raw.yml",
        f"""merge_method: pcb
base_model: {files[0]}
models:
  - model: {files[1]}
    parameters: {{weight: 0.6}}
  - model: {files[2]}
parameters: {{pcb_ratio: 0.25, clamp_ratio: 0.01}}
""",
    )
    check(run_tool("mergekit-pytorch", config, tmp_path / "out", "--quiet"))
    out = load_tensors(tmp_path / "out")
    inputs = [load_tensors(m) for m in family.models[:3]]
    assert set(out) == set(inputs[0])
    for name, tensor in out.items():
        expected = reference_merge(
            inputs[0][name],
            [inputs[1][name], inputs[2][name]],
            weights=[0.6, 1.0],
            pcb_ratio=0.25,
            clamp_ratio=0.01,
        )
        assert_close_to_reference(tensor, expected, name)


def test_mergekit_multi_finds_pcb(family, tmp_path):
    config = write(
        tmp_path / "multi.yml",
        f"""name: first
merge_method: pcb
base_model: {family.base}
models:
  - model: {family.experts[0]}
  - model: {family.experts[1]}
parameters: {{pcb_ratio: 0.3}}
dtype: float32
---
merge_method: pcb
base_model: {family.base}
models:
  - model: first
  - model: {family.experts[2]}
parameters: {{pcb_ratio: 0.5}}
dtype: float32
""",
    )
    check(
        run_tool(
            "mergekit-multi",
            config,
            "--out-path",
            tmp_path / "final",
            "-I",
            tmp_path / "inter",
            "--quiet",
        )
    )
    base, e0, e1, e2 = (load_tensors(m) for m in family.models)
    first = load_tensors(tmp_path / "inter" / "first")
    final = load_tensors(tmp_path / "final")
    for name in base:
        step = reference_merge(base[name], [e0[name], e1[name]], pcb_ratio=0.3)
        assert_close_to_reference(first[name], step, name)
        # The second merge reads the float32 intermediate, exactly as written.
        expected = reference_merge(base[name], [first[name], e2[name]], pcb_ratio=0.5)
        assert_close_to_reference(final[name], expected, name)


def test_wheel_ships_the_startup_hook(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0 and "hatchling" in result.stderr:
        pytest.skip("hatchling is not installed in this environment")
    check(result)
    (wheel,) = tmp_path.glob("mergekit_pcb-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "mergekit_pcb_autoload.pth" in names  # at the root: site-packages runs it
        assert "mergekit_pcb/__init__.py" in names and "mergekit_pcb/method.py" in names
        shipped = archive.read("mergekit_pcb_autoload.pth").decode()
    assert shipped == (ROOT / "mergekit_pcb_autoload.pth").read_text()
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    # Only the package's own modules: the toy tasks and training loop are benchmark code.
    modules = {n for n in names if n.endswith(".py")}
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mergekit_pcb").rglob("*.py")}
    assert modules == source
    assert "mergekit_pcb/toy.py" not in names
    assert not any("import peft" in archive_text for archive_text in _texts(wheel, modules))


def _texts(wheel, names):
    with zipfile.ZipFile(wheel) as archive:
        return [archive.read(name).decode() for name in sorted(names)]
