"""The package's shape: what imports what, where mergekit's private API is used, and
that every consumer of a parameter fact reads it from ``mergekit_pcb.parameters``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mergekit_pcb"
# The one documented cycle: the registration hook imports the method, and the method
# registers itself when it is imported first (see mergekit_pcb/_autoload.py).
ALLOWED_CYCLE = {"mergekit_pcb._autoload", "mergekit_pcb.method"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules this file imports, at module level or inside functions."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in modules:
                    targets.add(submodule)
                elif node.module in modules:
                    targets.add(node.module)
    return targets


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return components


def test_no_import_cycle_but_the_registration_hook():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    assert "mergekit_pcb.method" in graph["mergekit_pcb._autoload"]  # the checker sees it
    assert _cycles(graph) == [ALLOWED_CYCLE]


def test_kernel_is_free_of_mergekit():
    for path in (PACKAGE / "kernel").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] != "mergekit", f"{path.name} imports {name}"


PRIVATE = {"_plan", "_tensors", "_run", "_to_torch", "is_hf", "_getframe", "_model_out_config"}


def test_mergekit_private_api_only_in_its_module():
    """A mergekit upgrade has one module to audit: mergekit_internals."""
    for path in PACKAGE.rglob("*.py"):
        if path.name == "mergekit_internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE:
                where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
                pytest.fail(f"{where} uses mergekit's .{node.attr}: move it to mergekit_internals")


def test_this_mergekit_has_what_the_internals_module_relies_on():
    from mergekit_pcb import mergekit_internals

    mergekit_internals.check()


def test_missing_private_api_fails_naming_the_module(monkeypatch):
    from mergekit.plan import MergePlanner

    from mergekit_pcb import mergekit_internals

    monkeypatch.delattr(MergePlanner, "_plan")
    with pytest.raises(RuntimeError, match=r"mergekit_pcb/mergekit_internals\.py") as info:
        mergekit_internals.check()
    assert "MergePlanner._plan" in str(info.value)


# Changes every default in parameters.py before anything else imports it, then reads the
# default back from every consumer.
_PROBE = r"""
import dataclasses, json, sys
import mergekit_pcb.parameters as P
P.PCB_RATIO = dataclasses.replace(P.PCB_RATIO, default=0.37)
P.CLAMP_RATIO = dataclasses.replace(P.CLAMP_RATIO, default=0.003)
P.LAMBDA = dataclasses.replace(P.LAMBDA, default=1.25)
P.WEIGHT = dataclasses.replace(P.WEIGHT, default=0.75)
P.ALL = (P.PCB_RATIO, P.CLAMP_RATIO, P.LAMBDA, P.WEIGHT, P.PCB_SCOPE)

from mergekit.merge_methods import get
import mergekit_pcb
mergekit_pcb.register()
specs = {p.name: p.default for p in get("pcb").spec.parameters}

from mergekit_pcb.cli.demo import demo
options = {o.name: o.default for o in demo.params if o.name in ("pcb_ratio", "clamp_ratio")}

from mergekit_pcb.evolve.config import EvolveConfig, FixedParameters
from mergekit_pcb.evolve.layout import default_values
from mergekit_pcb.evolve.cache import searched_ratios
cfg = EvolveConfig.model_validate({
    "base_model": "b", "models": ["a"], "search": {"pcb_ratio": [0.5, 0.6]},
    "evaluation": {"tasks": [{"name": "t", "type": "python", "function": "m:f"}]},
})
values = default_values(cfg.inputs, 2)

from mergekit.evo.genome import ModelGenome, ModelGenomeDefinition
from mergekit_pcb import evolve_compat
family = json.loads(sys.argv[1])
definition = ModelGenomeDefinition.model_validate(
    {"models": family["experts"], "base_model": family["base"], "merge_method": "pcb"}
)
x0 = ModelGenome(definition).initial_genotype()
print(json.dumps({
    "specs": specs,
    "demo": options,
    "fixed_clamp": FixedParameters().clamp_ratio,
    "baseline": [list(values.pcb_ratio), values.lambda_, list(values.weights)],
    "searched": list(searched_ratios(cfg.search)),
    "genome_ratio": float(x0[..., evolve_compat.PARAMS.index("pcb_ratio")].flatten()[0]),
}))
"""


def test_every_consumer_follows_a_changed_default(family):
    """A default is one line in parameters.py: the method's spec, the demo's options,
    the search's baseline and fixed values, and the mergekit-evolve patch all follow."""
    paths = {"base": str(family.base), "experts": [str(e) for e in family.experts]}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["specs"] == {
        "pcb_ratio": 0.37,
        "clamp_ratio": 0.003,
        "lambda": 1.25,
        "weight": 0.75,
        "pcb_scope": "tensor",
    }
    assert seen["demo"]["pcb_ratio"] == 0.37 and seen["demo"]["clamp_ratio"] == 0.003
    assert seen["fixed_clamp"] == 0.003
    assert seen["baseline"] == [[0.37, 0.37], 1.25, [0.75]]
    assert seen["searched"] == [0.37, 0.6]  # the default is always scored: in the range
    assert seen["genome_ratio"] == pytest.approx(0.37)


def test_the_cycle_finder_finds_cycles():
    """A hand-made graph: the checker above could fail."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _cycles(graph) == [{"a", "b", "c"}]
    assert _cycles({"a": {"b"}, "b": set()}) == []
