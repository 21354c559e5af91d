"""The GPU path: large chunks, order statistics selected from the whole matrix on the
device, the GPU's own tanh, and one host sync per tensor.

CI has no GPU, so the same torch code runs here on CPU tensors
(``runtime.GPU_STYLE_ON_CPU``, compiled loops off) against the float64 reference and
sort; the ``gpu`` tests repeat the checks on CUDA where one exists.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_close_to_reference
from hypothesis import given, settings
from reference import reference_merge, reference_task_vector
from strategies import matrices

from mergekit_pcb import kernel
from mergekit_pcb.kernel import bindings, runtime, selection


@pytest.fixture
def gpu_style(monkeypatch):
    monkeypatch.setattr(runtime, "GPU_STYLE_ON_CPU", True)
    monkeypatch.setattr(bindings, "enabled", False)


def _family(shape, n, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    experts = []
    for _ in range(n):
        delta = 1e-3 * torch.randn(shape, generator=g)
        delta += (torch.rand(shape, generator=g) < 0.05) * 0.01 * torch.randn(shape, generator=g)
        experts.append((base + delta).to(dtype).to(device))
    return base.to(dtype).to(device), experts


def _assert_close_in(dtype, actual, expected):
    """The float32 result rounded once to the output dtype: within one of its ulps."""
    if dtype in (torch.float32, torch.float64):
        assert_close_to_reference(actual, expected)
    else:
        ulp = torch.finfo(dtype).eps
        scale = float(expected.abs().max())
        torch.testing.assert_close(actual.double(), expected, rtol=ulp, atol=ulp * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,n", [((7,), 1), ((300, 257), 3), ((64, 1000), 5)])
@pytest.mark.parametrize("clamp_ratio", [0.0, 1e-4, 0.02])
def test_gpu_path_matches_the_reference(gpu_style, dtype, shape, n, clamp_ratio):
    base, experts = _family(shape, n, dtype, seed=n + len(shape))
    weights = [0.6 + 0.3 * i for i in range(n)]
    order = kernel.canonical_order(experts, weights)
    out = kernel.merge_stored(
        base,
        [experts[i] for i in order],
        [weights[i] for i in order],
        pcb_ratio=0.2,
        clamp_ratio=clamp_ratio,
        scale=1.1,
    )
    assert out.dtype == dtype and out.shape == base.shape
    expected = reference_merge(
        base, experts, weights=weights, pcb_ratio=0.2, clamp_ratio=clamp_ratio, lam=1.1
    )
    _assert_close_in(dtype, out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_path_with_large_task_vectors(monkeypatch, dtype):
    """tau_i * sum tau far from 0, where tanh saturates and the intra term spreads: the
    GPU path equals the CPU path but where rounding moves an entry across the cut."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(200, 300, generator=g).to(dtype)
    experts = [base + s * torch.randn(200, 300, generator=g).to(dtype) for s in (0.3, 1.0, 2.0)]
    args = {"pcb_ratio": 0.3, "clamp_ratio": 1e-3, "scale": 1.0}
    cpu = kernel.merge_stored(base, experts, [1.0, 1.0, 1.0], **args)
    monkeypatch.setattr(runtime, "GPU_STYLE_ON_CPU", True)
    monkeypatch.setattr(bindings, "enabled", False)
    gpu = kernel.merge_stored(base, experts, [1.0, 1.0, 1.0], **args)
    # Any float32 path can flip the odd entry whose B lies a rounding away from the cut
    # (the CPU path differs from float64 so on one of these 60000 entries): allow 3.
    eps = torch.finfo(torch.float32).eps
    far = (gpu.double() - cpu.double()).abs() > 8 * eps * float(cpu.abs().max())
    assert int(far.sum()) <= 3, int(far.sum())


def test_gpu_path_with_whole_model_statistics(gpu_style):
    """The whole-model passes and the merge with their statistics, against one flat row
    per model (the authors' definition)."""
    shapes = [(40, 30), (1000,), (7, 9)]
    tensors = [_family(shape, 3, torch.float32, seed=i) for i, shape in enumerate(shapes)]
    models = ["a", "b", "c"]

    def rows():
        for base, experts in tensors:
            yield models, kernel.task_vectors(base, experts).tau

    stats = kernel.statistics(rows, pcb_ratio=0.3, clamp_ratio=0.01)
    tau = torch.cat(
        [torch.stack([(e - b).reshape(-1) for e in ex]).double() for b, ex in tensors], dim=1
    )
    merged = reference_task_vector(tau, [1.0, 0.5, 2.0], 0.3, 0.01)
    offset = 0
    for base, experts in tensors:
        out = kernel.merge_with_statistics(
            base, experts, [1.0, 0.5, 2.0], [stats[m] for m in models], pcb_ratio=0.3, scale=1.0
        )
        piece = merged[offset : offset + base.numel()].reshape(base.shape)
        offset += base.numel()
        assert_close_to_reference(out, base.double() + piece)


def test_gpu_chunks_are_large(gpu_style):
    """A few kernels per step on a GPU, not thousands of cache-sized ones."""
    n, d = 3, 65_536_000  # the 32000 x 2048 embedding of three experts
    assert len(runtime.column_chunks(n, d)) <= -(-n * d // runtime.GPU_CHUNK_ELEMENTS) + 1
    runtime.GPU_STYLE_ON_CPU = False
    assert len(runtime.column_chunks(n, d)) > 300  # the CPU's cache-sized chunks


@settings(max_examples=60, deadline=None)
@given(matrices(max_columns=400))
def test_selection_on_the_device_equals_sort(case):
    x, ranks = case
    got = selection._select_on_device(x, ranks)
    assert torch.equal(got, torch.sort(x, dim=1).values[:, ranks])


def test_gpu_style_order_statistics_take_the_device_route(gpu_style, monkeypatch):
    """The in-memory order statistics go through the whole-matrix selection, not chunks."""
    seen = []
    original = selection._select_on_device
    monkeypatch.setattr(
        selection, "_select_on_device", lambda x, r: seen.append(x.shape) or original(x, r)
    )
    x = torch.randn(3, 5000)
    got = selection.order_statistics(x, [10, 2500, 4990])
    assert torch.equal(got, torch.sort(x, dim=1).values[:, [10, 2500, 4990]])
    assert seen == [(3, 5000)]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_merge_equals_the_cpu_merge(dtype):
    """Same inputs on the GPU and on the CPU (compiled loops): both within the CPU paths'
    tolerance of the float64 reference."""
    base, experts = _family((512, 768), 3, dtype, seed=3)
    weights = [1.0, 0.8, 1.2]
    args = {"pcb_ratio": 0.2, "clamp_ratio": 1e-4, "scale": 1.0}
    cpu = kernel.merge_streamed(base, experts, weights, **args)
    gpu = kernel.merge_stored(base.cuda(), [e.cuda() for e in experts], weights, **args).cpu()
    expected = reference_merge(base, experts, weights=weights, pcb_ratio=0.2)
    _assert_close_in(dtype, cpu, expected)
    _assert_close_in(dtype, gpu, expected)


def _syncs(fn) -> list[str]:
    """The host syncs ``fn`` makes on CUDA, as torch's sync debug mode reports them."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.gpu
@cuda
def test_cuda_merge_syncs_with_the_host_once():
    base, experts = _family((2048, 1024), 3, torch.bfloat16, seed=4, device="cuda")
    args = {"pcb_ratio": 0.2, "clamp_ratio": 1e-4, "scale": 1.0}
    kernel.merge_stored(base, experts, [1.0, 1.0, 1.0], **args)  # warm-up
    syncs = _syncs(lambda: kernel.merge_stored(base, experts, [1.0, 1.0, 1.0], **args))
    assert len(syncs) <= 1, syncs


@pytest.mark.gpu
@cuda
def test_cuda_content_keys_sync_once_and_equal_the_cpu_keys():
    """The method orders experts by content keys before the merge: every key comes
    back in one transfer (it was two per expert)."""
    _, experts = _family((2048, 1024), 3, torch.bfloat16, seed=5)
    on_gpu = [e.cuda() for e in experts]
    # float64 sums in another reduction order: equal to ~1e-15, not bit for bit.
    got, want = kernel.content_keys(on_gpu), kernel.content_keys(experts)
    assert [v for k in got for v in k] == pytest.approx([v for k in want for v in k], rel=1e-12)
    assert len(_syncs(lambda: kernel.content_keys(on_gpu))) <= 1
