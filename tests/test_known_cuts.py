"""Merges with known cuts (the search's candidates) equal the merge itself, bit for bit.

:func:`known_cuts.statistics` takes clip bounds, max B and the cut at many ranks
once; :func:`known_cuts.merge` then remakes B chunk by chunk. The reference is
the kernel's own merge (``merge_streamed``/``merge_stored``, the functions
mergekit calls) at the level's ratio, on every path: the compiled loops
(streamed and stored), the torch ops (loops off), the GPU's way on CPU tensors,
float64. The cuts are checked against an independent sort of the order keys.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergekit_pcb import kernel
from mergekit_pcb.kernel import bindings, known_cuts, runtime

# Levels across (0, 1], the search's kind of grid plus both extremes (block-extreme ranks).
LEVELS = [0.0005, 0.001, 0.02, 0.1, 0.137, 0.38, 0.5, 0.75, 0.999, 0.9995, 1.0]
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture
def threads(monkeypatch):
    """Many chunks whose width is no multiple of the loops' blocks, in two threads."""
    monkeypatch.setattr(runtime, "MIN_CHUNKS_PER_THREAD", 1)
    monkeypatch.setattr(runtime, "CHUNK_ELEMENTS", 3 * 64 * 37)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns: equal floats of another sign of zero differ here."""
    return t.view(_BITS[t.element_size()])


def _family(d, n, dtype, seed, *, density=0.3):
    """Experts that change a share of the entries (many exact zeros in tau and B)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g).to(dtype)
    experts = []
    for _ in range(n):
        delta = 1e-2 * torch.randn(d, generator=g) * (torch.rand(d, generator=g) < density)
        experts.append((base.double() + delta.double()).to(dtype))
    return base, experts


def _reference(base, experts, coefficients, ratio, clamp, scale):
    if kernel.streams(base, experts, clamp):
        merge = kernel.merge_streamed
    else:
        merge = kernel.merge_stored
    return merge(
        base, experts, coefficients, pcb_ratio=ratio, clamp_ratio=clamp, scale=scale
    ).reshape(-1)


def _check(
    base, experts, clamp, expected_flavour, same=lambda a, b: torch.equal(_bits(a), _bits(b))
):
    d = base.numel()
    stats = known_cuts.statistics(base, experts, clamp, [kernel.cut_index(d, r) for r in LEVELS])
    assert stats.flavour == expected_flavour
    coefficients = [0.9, 1.2, 0.7][: len(experts)]
    for level, ratio in enumerate(LEVELS):
        expected = _reference(base, experts, coefficients, ratio, clamp, 1.3)
        out = torch.empty_like(base)
        got = known_cuts.merge(base, experts, coefficients, stats, level, scale=1.3, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert same(got, expected), (ratio, clamp)


@pytest.mark.parametrize(
    "dtype,d,clamp,flavour",
    [
        (torch.bfloat16, 70_000, 0.0, "streamed"),
        (torch.float32, 70_000, 1e-4, "streamed"),
        (torch.bfloat16, 70_000, 0.01, "stored"),
        (torch.float16, 70_000, 0.0, "stored"),
        (torch.float64, 20_000, 1e-3, "stored"),
        (torch.float32, 700, 0.0, "stored"),
    ],
)
def test_known_cut_merge_is_the_merge(threads, dtype, d, clamp, flavour):
    base, experts = _family(d, 3, dtype, seed=d % 97)
    _check(base, experts, clamp, flavour)


def test_torch_ops_path(monkeypatch, threads):
    monkeypatch.setattr(bindings, "enabled", False)
    for dtype in (torch.float32, torch.bfloat16):
        base, experts = _family(30_000, 3, dtype, seed=5)
        _check(base, experts, 1e-3, "stored")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gpu_way_on_cpu_tensors(monkeypatch, dtype):
    """The code a CUDA device runs (large chunks, selection from the whole matrix); the
    merge there picks a zero cut by topk, so only values are compared (see known_cuts)."""
    monkeypatch.setattr(runtime, "GPU_STYLE_ON_CPU", True)
    monkeypatch.setattr(bindings, "enabled", False)
    base, experts = _family(40_000, 3, dtype, seed=11)
    _check(base, experts, 1e-3, "stored", same=torch.equal)


def _sorted_by_keys(row: torch.Tensor, ranks) -> torch.Tensor:
    """sorted(row)[k] with -0.0 below +0.0, by numpy on the integer order keys."""
    bits = row.view(torch.int32).numpy().astype(np.int64)
    keys = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    picked = np.sort(keys)[np.asarray(ranks)]
    back = np.where(picked < 0, picked ^ 0x7FFFFFFF, picked).astype(np.int32)
    return torch.from_numpy(back).view(torch.float32)


@pytest.mark.parametrize("d", [1, 5_000, 65_536, 65_537, 400_000])
def test_rank_values_equal_a_sort(d):
    g = torch.Generator().manual_seed(d)
    row = torch.randn(d, generator=g) * 1e-3
    row[torch.rand(d, generator=g) < 0.6] = 0.0  # ties: most scores of a bf16 model
    row[torch.rand(d, generator=g) < 0.2] *= -1  # and -0.0
    row[torch.rand(d, generator=g) < 0.1] = 0.25  # a large run of one other value
    ranks = sorted({0, d - 1, d // 2, *range(0, d, max(1, d // 997))})
    got = bindings.rank_values(row, ranks)
    assert torch.equal(got.view(torch.int32), _sorted_by_keys(row, ranks).view(torch.int32))


def test_cuts_are_the_merges_cuts_and_repeat_for_repeated_ranks():
    score = torch.randn(3, 100_000, generator=torch.Generator().manual_seed(2))
    score[:, ::3] = 0.0
    ranks = [50_000, 99_999, 0, 50_000, 12, 99_990]  # unsorted, repeated, extreme
    cuts = known_cuts.cut_values(score, ranks)
    for i in range(3):
        assert torch.equal(cuts[i], _sorted_by_keys(score[i], ranks))


def test_unchanged_tensor_is_the_base():
    base = torch.randn(5_000).to(torch.bfloat16)
    stats = known_cuts.statistics(base, [base.clone(), base.clone()], 0.0, [10])
    assert not stats.changed
    out = known_cuts.merge(base, [base, base], [1.0, 2.0], stats, 0, scale=1.0)
    assert torch.equal(out, base)


def test_non_finite_input_raises_as_the_merge_does():
    base = torch.zeros(5_000)
    bad = base.clone()
    bad[7] = float("nan")
    with pytest.raises(kernel.NonFiniteTaskVector):
        known_cuts.statistics(base, [bad], 0.0, [10])


def test_rows_follow_a_permutation():
    base, experts = _family(20_000, 3, torch.float32, seed=3)
    ranks = [kernel.cut_index(20_000, r) for r in (0.1, 0.3)]
    stats = known_cuts.statistics(base, experts, 1e-3, ranks)
    order = [2, 0, 1]
    again = known_cuts.statistics(base, [experts[j] for j in order], 1e-3, ranks)
    moved = stats.rows(order)
    for key in ("low", "high", "top"):
        assert torch.equal(getattr(moved, key), getattr(again, key))
    # B's column total adds rows in order: the cuts may move by an ulp, not more.
    torch.testing.assert_close(moved.cuts, again.cuts, rtol=1e-6, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_known_cut_merge_on_cuda_is_the_cuda_merge(dtype):
    """What a search with ``device: cuda`` runs, against ``mergekit-yaml --cuda``'s path."""
    base, experts = _family(300_000, 3, dtype, seed=4)
    _check(base.cuda(), [e.cuda() for e in experts], 1e-4, "stored", same=torch.equal)
