"""``lambda: auto`` (issue 22): the scale, its invariants, YAML, and what the user sees."""

from __future__ import annotations

import pytest
import torch
from conftest import check, last_error_line, load_tensors, run_tool, write
from expected import Checkpoints, compare_all
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from mergekit.merge_methods import merge_tensors
from reference import reference_auto_scale, reference_task_vector
from test_properties import merges

import mergekit_pcb  # noqa: F401  (registers pcb in this process)
from mergekit_pcb import chosen_scales, kernel
from mergekit_pcb.kernel import known_cuts
from mergekit_pcb.parameters import LAMBDA

SETTINGS = settings(max_examples=30, deadline=None)
PATHS = {"streamed": kernel.merge_streamed, "stored": kernel.merge_stored}


def _auto(path, base, experts, weights, ratio=0.2, clamp=1e-4):
    told: list[float] = []
    out = PATHS[path](
        base,
        experts,
        weights,
        pcb_ratio=ratio,
        clamp_ratio=clamp,
        scale="auto",
        on_scale=told.append,
    )
    return out, told


def _family(shape, n, dtype, seed=0, shared=0.5):
    """Experts that partly agree (a shared direction) so the scale is not trivial."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    common = 0.02 * torch.randn(shape, generator=g)
    experts = [base + shared * common + 0.02 * torch.randn(shape, generator=g) for _ in range(n)]
    return base.to(dtype), [e.to(dtype) for e in experts]


@pytest.mark.parametrize(
    "dtype, path",
    [
        (torch.float32, "streamed"),
        (torch.bfloat16, "streamed"),
        (torch.float32, "stored"),
        (torch.float16, "stored"),
        (torch.float64, "stored"),
    ],
)
def test_auto_scale_equals_a_slow_element_by_element_projection(dtype, path):
    base, experts = _family((37, 211), 3, dtype)
    weights = [0.7, 1.0, 1.3]
    if path == "streamed":
        assert kernel.streams(base, experts, 1e-4)
    out, (scale,) = _auto(path, base, experts, weights)
    tau = torch.stack([(e.double() - base.double()).flatten() for e in experts])
    merged = reference_task_vector(tau, weights, 0.2, 1e-4)
    expected = reference_auto_scale(merged, tau, weights)
    assert abs(expected - 1) > 0.05  # partly agreeing experts: a scale a test can tell from 1
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert scale == pytest.approx(expected, rel=tolerance)
    # and the output is base + that scale * m (the fixed-lambda merge at that very scale)
    fixed = PATHS[path](base, experts, weights, pcb_ratio=0.2, clamp_ratio=1e-4, scale=scale)
    assert torch.equal(out, fixed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_path_chooses_the_same_scale_to_the_bit(dtype):
    """Streamed, stored and the search's known-cut merge: same chunks, same sums."""
    base, experts = _family((64, 700), 4, dtype, seed=3)
    weights = [1.0, 0.5, 1.5, 1.0]
    a, (scale_a,) = _auto("streamed", base, experts, weights, ratio=0.3)
    b, (scale_b,) = _auto("stored", base, experts, weights, ratio=0.3)
    assert scale_a == scale_b and torch.equal(a, b)
    d = base.numel()
    stats = known_cuts.statistics(base, experts, 1e-4, [kernel.cut_index(d, 0.3)])
    told: list[float] = []
    c = known_cuts.merge(base, experts, weights, stats, 0, scale="auto", on_scale=told.append)
    assert told == [scale_a] and torch.equal(c, a.reshape(-1))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weights", [[1.0], [1.0, 1.0], [1.0, 3.0], [1.0] * 5, [0.5, 2.0, 1.5]])
def test_equal_experts_come_back_scaled_by_their_weights(path, weights):
    """Hand-worked: n equal task vectors tau (no clipping), weights w_i. On the kept
    entries m = (sum w / n) tau, 0 elsewhere, and s = (sum w) tau, so the projection is n;
    E / |s|^2 = sum w^2 / (sum w)^2; Lambda = n sum w^2 / (sum w)^2, and the merge writes
    base + (sum w^2 / sum w) tau there: the expert itself for weights 1 (also for one
    expert alone, on the entries it keeps: the drop step zeroes the others, the
    documented reason a single expert does not come back whole)."""
    n = len(weights)
    base = torch.zeros(16, 64)
    tau = torch.arange(1, 1025, dtype=torch.float32).reshape(16, 64) / 1024  # dyadic
    assert path != "streamed" or kernel.streams(base, [base + tau] * n, 0.0)
    out, (scale,) = _auto(path, base, [base + tau] * n, weights, ratio=0.5, clamp=0.0)
    squares, total = sum(w * w for w in weights), sum(weights)
    assert scale == pytest.approx(n * squares / total**2, rel=1e-6)  # rounded in float32
    kept = out != 0
    torch.testing.assert_close(out[kept], squares / total * tau[kept], rtol=1e-6, atol=0)
    assert kept.sum() == 1024 - 512 - 1  # above the cut sorted(B)[int(d (1 - r))]


@pytest.mark.parametrize("path", PATHS)
def test_cancelling_experts_keep_the_base(path):
    """Hand-worked: tau and -tau sum to 0, so every C_i = tanh(tau_i * 0) = 0, B = 0, W = 0
    and m = 0: the merge keeps the base, and the scale is 1 (nothing to scale)."""
    g = torch.Generator().manual_seed(1)
    base = torch.round(16 * torch.randn(16, 64, generator=g)) / 16  # dyadic: the mirror is exact
    tau = torch.round(64 * torch.randn(16, 64, generator=g)) / 1024
    e, mirror = base + tau, base - tau
    out, (scale,) = _auto(path, base, [e, mirror], [1.0, 1.0], ratio=0.5, clamp=0.0)
    assert scale == 1.0 and torch.equal(out, base)


def test_the_rule_floors_at_zero_and_adds_chunks_in_order():
    """Hand-worked partial sums (<m, s>, |m|^2, |s|^2, E) per chunk, keyed by first column."""
    from mergekit_pcb.kernel.auto_scale import scale_of

    assert scale_of({64: (3.0, 1.0, 4.0, 4.0), 0: (1.0, 1.0, 4.0, 4.0)}) == 2.0
    assert scale_of({0: (4.0, 1.0, 8.0, 2.0)}) == 1.0  # 4 x (E/|s|^2 = 1/4)
    assert scale_of({0: (4.0, 1.0, 2.0, 8.0)}) == 4.0  # E > |s|^2 (opposed experts): capped 1
    assert scale_of({0: (-1.0, 2.0, 1.0, 1.0)}) == 0.0  # m against the sum: not turned around
    assert scale_of({0: (0.0, 0.0, 1.0, 1.0)}) == 1.0  # m = 0: nothing to scale
    assert scale_of({0: (1e-300, 1e-300, 1.0, 1.0), 64: (1.0, 2.0, 0.0, 0.0)}) == 0.5


@SETTINGS
@given(case=merges(), data=st.data())
def test_model_order_does_not_matter(case, data):
    base, experts, parameters = case
    parameters = {**parameters, "lambda": "auto"}
    order = data.draw(st.permutations(range(len(experts))))
    shuffled = {**parameters, "weight": [parameters["weight"][i] for i in order]}
    with chosen_scales.collect() as first_scales:
        first = merge_tensors([base, *experts], "pcb", base_index=0, parameters=parameters)
    with chosen_scales.collect() as second_scales:
        second = merge_tensors(
            [base, *[experts[i] for i in order]], "pcb", base_index=0, parameters=shuffled
        )
    assert torch.equal(first, second)
    assert first_scales == second_scales


@SETTINGS
@given(case=merges())
def test_unchanged_tensor_stays_base_and_outputs_are_finite(case):
    base, experts, parameters = case
    parameters = {**parameters, "lambda": "auto"}
    same = merge_tensors(
        [base, *[base.clone() for _ in experts]], "pcb", base_index=0, parameters=parameters
    )
    assert torch.equal(same, base)
    with chosen_scales.collect() as scales:
        out = merge_tensors([base, *experts], "pcb", base_index=0, parameters=parameters)
    assert torch.isfinite(out).all() and out.shape == base.shape
    assert all(s is None or s >= 0 for _, s in scales)


@SETTINGS
@given(case=merges())
def test_negated_task_vectors_negate_the_merged_task_vector(case):
    """Scaling every task vector by c scales Lambda m by c only where PCB's m scales by c:
    its inter-balancing tanh(tau_i sum_k tau_k) is not homogeneous, so for general c
    neither m nor the scale follows (docs/lambda-auto.md). For c = -1 it does: m flips,
    s flips, Lambda stays."""
    base, experts, parameters = case
    mirrored = [2 * base - e for e in experts]
    exact = (torch.equal(m - base, -(e - base)) for m, e in zip(mirrored, experts, strict=True))
    assume(all(exact))  # 2 base - e is rounded in float32 unless the values are dyadic
    parameters = {**parameters, "lambda": "auto"}
    with chosen_scales.collect() as scales:
        out = merge_tensors([base, *experts], "pcb", base_index=0, parameters=parameters)
        flipped = merge_tensors([base, *mirrored], "pcb", base_index=0, parameters=parameters)
    (_, first), (_, second) = scales  # equal up to the order of additions (expert order)
    assert (first is None) == (second is None)
    assert first is None or first == pytest.approx(second, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(flipped - base, -(out - base), rtol=1e-6, atol=1e-6)


def test_lambda_accepts_auto_numbers_and_negatives_and_names_what_is_allowed():
    assert LAMBDA.check("auto") == "auto"
    assert LAMBDA.check(-0.5) == -0.5  # task negation stays legal
    for bad in ("autoo", "AUTO", float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="parameter 'lambda' got .*allowed: a finite number"):
            LAMBDA.check(bad)


def _config(family, lam: str, extra: str = "") -> str:
    e0, e1, e2 = family.experts
    return f"""merge_method: pcb
base_model: {family.base}
models:
  - model: {e0}
    parameters:
      weight: 0.8
  - model: {e1}
  - model: {e2}
parameters:
  pcb_ratio: 0.3
  lambda: {lam}
{extra}"""


@pytest.mark.parametrize(
    "lam",
    ["auto", "[{filter: self_attn, value: auto}, {value: 1.2}]"],
    ids=["auto", "filtered"],
)
def test_auto_through_plain_mergekit_yaml(family, tmp_path, lam):
    """Every tensor equals the float64 reference with its own projection; the line on
    stderr and the model card give the spread of the chosen scales."""
    config = _config(family, lam)
    out = tmp_path / "out"
    result = check(run_tool("mergekit-yaml", write(tmp_path / "c.yml", config), out))
    written = load_tensors(out)
    compare_all(config, written, Checkpoints())
    line = [x for x in result.stderr.splitlines() if "lambda: auto chose" in x]
    assert len(line) == 1, result.stderr
    card = (out / "README.md").read_text()
    assert "### lambda: auto" in card
    rows = [r for r in card.splitlines() if r.startswith("| `")]
    auto_tensors = [n for n in written if lam == "auto" or "self_attn" in n]
    changed = [r for r in rows if "unchanged" not in r]
    assert {r.split("`")[1] for r in rows} == set(auto_tensors)
    assert changed and f"over {len(changed)} tensors" in line[0]
    unchanged = len(rows) - len(changed)
    assert not unchanged or line[0].endswith(f"; {unchanged} unchanged tensors kept the base")


def test_auto_with_whole_model_statistics(family, tmp_path):
    out = tmp_path / "out"
    config = _config(family, "auto", "  pcb_scope: model\n")
    check(run_tool("mergekit-yaml", write(tmp_path / "c.yml", config), out, "--quiet"))
    card = (out / "README.md").read_text()
    assert "### lambda: auto" in card


@pytest.mark.parametrize("value", ["autoo", ".nan"])
def test_bad_lambda_is_refused_naming_the_key(family, tmp_path, value):
    config = write(tmp_path / "c.yml", _config(family, value))
    out = tmp_path / "out"
    result = run_tool("mergekit-pcb", "merge", config, out)
    assert result.returncode != 0
    assert "parameter 'lambda' got" in result.stderr
    assert "allowed: a finite number or auto" in result.stderr
    assert not out.exists() or not list(out.glob("*.safetensors"))
    plain = run_tool("mergekit-yaml", config, tmp_path / "plain")
    assert plain.returncode != 0
    assert "allowed: a finite number or auto" in last_error_line(plain.stderr)
    assert not list((tmp_path / "plain").glob("*.safetensors"))


# ------------------------------------------------------------------ pcb_ratio: auto


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", ["auto", 1.3])
def test_ratio_auto_picks_the_level_most_along_the_sum(dtype, scale):
    """The level whose m has the largest cosine with s, as the float64 reference picks
    it; the output is the fixed-ratio merge at that level, bit for bit."""
    from reference import reference_ratio_auto

    base, experts = _family((64, 700), 3, dtype, seed=5)
    weights = [1.0, 0.8, 1.2]
    levels, scales = [], []
    out = kernel.merge_ratio_auto(
        base, experts, weights, clamp_ratio=1e-4, scale=scale,
        on_ratio=levels.append, on_scale=scales.append,
    )  # fmt: skip
    tau = torch.stack([(e.double() - base.double()).flatten() for e in experts])
    s = (torch.tensor(weights, dtype=torch.float64)[:, None] * tau).sum(0)
    cosines = {}
    for ratio in (0.1, 0.2, 0.4, 0.7):
        m = reference_task_vector(tau, weights, ratio, 1e-4)
        cosines[ratio] = float(m @ s / (m.norm() * s.norm()))
    ranked = sorted(cosines.values())
    assert ranked[-1] - ranked[-2] > 1e-4  # not a near tie: float32 and float64 agree
    assert levels == [max(cosines, key=cosines.get)]
    expected = reference_ratio_auto(tau, weights, 1e-4)
    assert torch.equal(expected, reference_task_vector(tau, weights, levels[0], 1e-4))
    fixed = kernel.merge_stored(
        base, experts, weights, pcb_ratio=levels[0], clamp_ratio=1e-4, scale=scale
    )
    assert torch.equal(out, fixed)
    assert len(scales) == (scale == "auto")
    if kernel.streams(base, experts, 1e-4):  # the compiled path, tau never stored: same bits
        told = {"ratio": [], "scale": []}
        again = kernel.merge_streamed(
            base, experts, weights, pcb_ratio="auto", clamp_ratio=1e-4, scale=scale,
            on_ratio=told["ratio"].append, on_scale=told["scale"].append,
        )  # fmt: skip
        assert told == {"ratio": levels, "scale": scales} and torch.equal(again, out)


def test_ratio_auto_is_refused_where_it_cannot_apply(family, tmp_path):
    """A gradient point (mergekit interpolates numbers), pcb_scope: model (one rank for
    every tensor): one line naming the key, before anything is written."""
    from mergekit_pcb.parameters import PCB_RATIO

    assert PCB_RATIO.check("auto") == "auto"
    with pytest.raises(ValueError, match="allowed: a number in \\(0, 1\\] or auto"):
        PCB_RATIO.check("autoo")
    gradient = write(tmp_path / "g.yml", _config(family, "1.0").replace(
        "pcb_ratio: 0.3", "pcb_ratio: [0.1, auto]"))  # fmt: skip
    result = run_tool("mergekit-pcb", "merge", gradient, tmp_path / "g")
    assert result.returncode != 0
    assert "pcb_ratio[1]: got 'auto' in a per-layer gradient" in result.stderr
    scoped = write(tmp_path / "m.yml", _config(family, "1.0", "  pcb_scope: model\n").replace(
        "pcb_ratio: 0.3", "pcb_ratio: auto"))  # fmt: skip
    result = run_tool("mergekit-pcb", "merge", scoped, tmp_path / "m")
    assert result.returncode != 0
    assert "parameter 'pcb_ratio' is auto" in result.stderr and "pcb_scope: tensor" in result.stderr
    assert not list((tmp_path / "m").glob("*.safetensors"))


def test_both_auto_through_plain_mergekit_yaml(family, tmp_path):
    """pcb_ratio: auto and lambda: auto: every tensor against the float64 reference (which
    picks its own level), the line and the card's two columns."""
    config = _config(family, "auto").replace("pcb_ratio: 0.3", "pcb_ratio: auto")
    out = tmp_path / "out"
    result = check(run_tool("mergekit-yaml", write(tmp_path / "c.yml", config), out))
    compare_all(config, load_tensors(out), Checkpoints())
    (line,) = [x for x in result.stderr.splitlines() if "pcb_ratio: auto chose" in x]
    assert line.startswith("pcb: lambda: auto chose")
    card = (out / "README.md").read_text()
    assert "| tensor | lambda | pcb_ratio |" in card
