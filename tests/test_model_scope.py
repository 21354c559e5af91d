"""``pcb_scope: model`` end to end: real mergekit-yaml against a whole-model reference.

The reference concatenates, per model, every tensor the merge feeds to pcb into
one row and runs tests/reference.py's sort-based float64 PCB on the n x D
matrix, exactly as the authors' code flattens whole models.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    assert_close_to_reference,
    check,
    last_error_line,
    load_tensors,
    run_tool,
    write,
)
from expected import AlignedCheckpoints, vocabulary
from reference import reference_task_vector

WEIGHTS = (0.7, 1.0, 1.3)
PCB_RATIO, CLAMP_RATIO, LAMBDA = 0.3, 0.01, 1.2


def config(family, *, scope="model", weight0="0.7", body=None, **overrides) -> str:
    models = body or (
        f"models:\n"
        f"  - model: {family.experts[0]}\n    parameters: {{weight: {weight0}}}\n"
        f"  - model: {family.experts[1]}\n"
        f"  - model: {family.experts[2]}\n    parameters: {{weight: 1.3}}\n"
    )
    parameters = {
        "pcb_ratio": PCB_RATIO,
        "clamp_ratio": CLAMP_RATIO,
        "lambda": LAMBDA,
        "pcb_scope": scope,
        **overrides,
    }
    lines = "".join(f"  {k}: {v}\n" for k, v in parameters.items())
    return f"merge_method: pcb\nbase_model: {family.base}\n{models}parameters:\n{lines}"


def merge(tmp_path: Path, text: str, name: str = "out"):
    out = tmp_path / name
    result = run_tool(
        "mergekit-yaml",
        write(tmp_path / f"{name}.yml", text),
        out,
        "--no-copy-tokenizer",
        "--quiet",
    )
    return result, out


def whole_model_reference(
    base: dict, experts: list[dict], plan: list[tuple[str, str]], weights=WEIGHTS
):
    """plan: (output tensor, input tensor) pairs, every pair one tensor fed to pcb."""
    rows = torch.stack(
        [
            torch.cat([(e[src].double() - base[src].double()).reshape(-1) for _, src in plan])
            for e in experts
        ]
    )
    merged = reference_task_vector(rows, weights, PCB_RATIO, CLAMP_RATIO)
    out, offset = {}, 0
    for name, src in plan:
        size = base[src].numel()
        piece = merged[offset : offset + size].reshape(base[src].shape)
        out[name] = base[src].double() + LAMBDA * piece
        offset += size
    return out


def assert_matches(actual: dict, expected: dict) -> None:
    assert set(expected) <= set(actual)
    # The statistics are global, so compare against the largest entry of the whole model.
    for name, want in expected.items():
        assert_close_to_reference(actual[name], want, name)


@pytest.fixture(scope="module")
def inputs(family):
    return load_tensors(family.base), [load_tensors(e) for e in family.experts]


def test_model_scope_equals_whole_model_reference(tmp_path, family, inputs):
    base, experts = inputs
    result, out = merge(tmp_path, config(family))
    check(result)
    plan = [(name, name) for name in sorted(base) if base[name].is_floating_point()]
    assert_matches(load_tensors(out), whole_model_reference(base, experts, plan))


def test_model_scope_with_a_tokenizer_union(tmp_path, family, big_vocab):
    """With ``tokenizer_source: union`` the statistics must see the embeddings as mergekit
    re-aligns them to the output vocabulary (two sizes in, one out), not the checkpoints."""
    e0 = family.experts[0]
    body = f"models:\n  - model: {e0}\n    parameters: {{weight: 0.7}}\n  - model: {big_vocab}\n"
    text = config(family, body=body) + "tokenizer_source: union\ndtype: float32\n"
    out = tmp_path / "out"
    check(run_tool("mergekit-yaml", write(tmp_path / "union.yml", text), out, "--quiet"))
    written = load_tensors(out)
    aligned = AlignedCheckpoints(vocabulary(out), [family.base, e0, big_vocab])
    names = sorted(n for n, t in written.items() if t.is_floating_point())
    base = {n: aligned(str(family.base), n) for n in names}
    experts = [{n: aligned(str(m), n) for n in names} for m in (e0, big_vocab)]
    assert base["model.embed_tokens.weight"].shape[0] > len(vocabulary(family.base))
    plan = [(n, n) for n in names]
    assert_matches(written, whole_model_reference(base, experts, plan, weights=(0.7, 1.0)))


def test_tensor_scope_is_not_model_scope(tmp_path, family, inputs):
    """The scope must change the result (mergekit silently ignores unknown parameters)."""
    base, experts = inputs
    result, out = merge(tmp_path, config(family, scope="tensor"))
    check(result)
    plan = [(name, name) for name in sorted(base) if base[name].is_floating_point()]
    expected = whole_model_reference(base, experts, plan)
    actual = load_tensors(out)
    worst = max((actual[n].double() - expected[n]).abs().max().item() for n in expected)
    assert worst > 1e-4


def test_slices_count_each_tensor_fed_to_pcb(tmp_path, family, inputs):
    """Layer 1 is used by two output layers: its tensors enter the statistics twice."""
    base, experts = inputs

    def sources(lo, hi):
        parts = [f"      - model: {family.base}\n        layer_range: [{lo}, {hi}]\n"]
        for i, e in enumerate(family.experts):
            parts.append(
                f"      - model: {e}\n        layer_range: [{lo}, {hi}]\n"
                f"        parameters: {{weight: {WEIGHTS[i]}}}\n"
            )
        return "".join(parts)

    body = f"slices:\n  - sources:\n{sources(0, 2)}  - sources:\n{sources(1, 2)}"
    result, out = merge(tmp_path, config(family, body=body))
    check(result)
    layer_map = {0: 0, 1: 1, 2: 1}  # output layer -> source layer
    plan = []
    for name in sorted(base):
        if ".layers." not in name:
            plan.append((name, name))
    layer_names = sorted({n.split(".layers.")[1].split(".", 1)[1] for n in base if ".layers." in n})
    for out_layer, src_layer in layer_map.items():
        for suffix in layer_names:
            plan.append(
                (f"model.layers.{out_layer}.{suffix}", f"model.layers.{src_layer}.{suffix}")
            )
    assert_matches(load_tensors(out), whole_model_reference(base, experts, plan))


def test_weight_gradient_is_allowed(tmp_path, family, inputs):
    """weight may vary per layer in model scope: statistics do not depend on it."""
    base, experts = inputs
    result, out = merge(tmp_path, config(family, weight0="[0.7, 0.7]"))
    check(result)
    plan = [(name, name) for name in sorted(base) if base[name].is_floating_point()]
    assert_matches(load_tensors(out), whole_model_reference(base, experts, plan))


@pytest.mark.parametrize(
    "name,value",
    [("pcb_ratio", "[0.2, 0.4]"), ("clamp_ratio", "[{filter: mlp, value: 0.02}, {value: 0.01}]")],
)
def test_varying_ratio_is_an_error(tmp_path, family, name, value):
    result, out = merge(tmp_path, config(family, **{name: value}))
    assert result.returncode != 0
    line = last_error_line(result.stderr)
    assert f"'{name}'" in line and "pcb_scope: model" in line, result.stderr[-2000:]
    assert not list(out.glob("*.safetensors"))


def test_unknown_scope_is_an_error(tmp_path, family):
    result, out = merge(tmp_path, config(family, scope="layer"))
    assert result.returncode != 0
    line = last_error_line(result.stderr)
    assert "pcb_scope" in line and "tensor, model" in line, result.stderr[-2000:]
    assert not list(out.glob("*.safetensors"))


@pytest.mark.gpu
def test_model_scope_on_cuda(tmp_path, family, inputs):
    """Statistics and merge both on the GPU (same device, so the cut stays exact)."""
    base, experts = inputs
    out = tmp_path / "cuda"
    result = run_tool(
        "mergekit-yaml",
        write(tmp_path / "cuda.yml", config(family)),
        out,
        "--no-copy-tokenizer",
        "--quiet",
        "--cuda",
    )
    check(result)
    plan = [(name, name) for name in sorted(base) if base[name].is_floating_point()]
    assert_matches(load_tensors(out), whole_model_reference(base, experts, plan))
