"""The speed machinery of the kernel, checked against plain sorts and the float64 reference.

Chunks, block extremes, threads, the fast tanh, reusable buffers and the sampled
content key all change *how* the numbers are computed, never *which* numbers: every
test here compares with an obviously-correct computation, or with the same merge
computed another way (one chunk vs many, one thread vs two), which must agree bit
for bit.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import assert_close_to_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit.merge_methods import merge_tensors
from reference import reference_merge
from strategies import matrices

import mergekit_pcb  # noqa: F401  (registers pcb)
from mergekit_pcb.kernel import experts, runtime, selection, torch_ops


@pytest.fixture
def threads(monkeypatch):
    """Restore torch's thread count whatever a test sets; even a few chunks go to the
    pool, so that two threads really run."""
    monkeypatch.setattr(runtime, "MIN_CHUNKS_PER_THREAD", 1)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def merge(base, experts, **parameters):
    return merge_tensors([base, *experts], "pcb", base_index=0, parameters=parameters)


def family(d: int, n: int, seed: int, *, zeros: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g)
    tau = 0.02 * torch.randn(n, d, generator=g)
    tau *= torch.rand(n, d, generator=g) >= zeros  # exact zeros, as in bf16 fine-tunes
    tau[:, :: max(1, d // 7)] *= 50  # outliers for the clip
    return base, [base + row for row in tau]


@pytest.mark.parametrize("d,n,zeros", [(20_000, 3, 0.0), (9_001, 2, 0.6), (4_099, 5, 0.95)])
def test_many_chunks_and_block_extremes_match_reference(monkeypatch, threads, d, n, zeros):
    """Chunks of a few blocks (the last one partial), extreme clip ranks by blocks."""
    base, experts = family(d, n, seed=d, zeros=zeros)
    params = {"pcb_ratio": 0.2, "clamp_ratio": 5e-4, "lambda": 1.1}
    # rank int(d * 5e-4) is extreme for d >= 1024 * (rank + 1): the block path runs.
    assert selection._is_extreme(int(d * 5e-4), d) == "low"
    whole = merge(base, experts, **params)
    monkeypatch.setattr(runtime, "CHUNK_ELEMENTS", 7 * runtime.BLOCK * n + 5)
    assert len(runtime.column_chunks(n, d)) >= 9
    for count in (1, 2):
        torch.set_num_threads(count)
        chunked = merge(base, experts, **params)
        assert torch.equal(chunked, whole), f"{count} thread(s)"
    expected = reference_merge(base, experts, pcb_ratio=0.2, clamp_ratio=5e-4, lam=1.1)
    assert_close_to_reference(whole, expected)


@settings(max_examples=40, deadline=None)
@given(matrices(), st.sampled_from([1, 2, 4]), st.integers(1, 5))
def test_row_selection_equals_sort_for_any_chunking(case, block, chunk_blocks):
    """Small blocks make the block path run for small d; chunks arrive shuffled."""
    x, ranks = case
    n, d = x.shape
    original = selection.BLOCK
    selection.BLOCK = runtime.BLOCK = block
    try:
        columns = runtime.column_chunks(1, d, chunk_blocks * block)
        pick = selection.RowSelection(n, d, x.dtype, ranks)
        for cols in reversed(columns):  # any order
            pick.feed(cols, x[:, cols])
        got = pick.finish(
            columns, lambda c: x[:, c], lambda i, c: x[i].index_select(0, c), x.device
        )
    finally:
        selection.BLOCK = runtime.BLOCK = original
    want = torch.sort(x, dim=1).values[:, ranks]
    assert torch.equal(got, want)


@settings(max_examples=40, deadline=None)
@given(matrices(), st.integers(1, 5), st.floats(0.0, 1.0))
def test_sampled_cut_equals_sort(case, chunk_blocks, share):
    """One radix rank of a float32 row: the sampled first pass and its window (or the
    fallback when the sample misleads) give exactly the sorted value, for any data."""
    x, _ = case
    x = x.float()
    n, d = x.shape
    rank = min(int(d * share), d - 1)
    columns = runtime.column_chunks(1, d, chunk_blocks * runtime.BLOCK)
    original = selection._SAMPLE_MIN_COLUMNS
    selection._SAMPLE_MIN_COLUMNS = 1  # sample rows of any length
    try:
        pick = selection.RowSelection(n, d, x.dtype, [rank])
        for cols in columns:
            pick.feed(cols, x[:, cols])
        got = pick.finish(columns, lambda c: x[:, c], lambda i, c: x[i].index_select(0, c), "cpu")
    finally:
        selection._SAMPLE_MIN_COLUMNS = original
    assert pick._sampled or selection._is_extreme(rank, d)
    assert torch.equal(got, torch.sort(x, dim=1).values[:, [rank]])


def _keep_cut(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, selection.RowSelection]:
    n, d = x.shape
    columns = runtime.column_chunks(n, d)
    pick = selection.RowSelection(n, d, x.dtype, [rank])
    for cols in columns:
        pick.feed(cols, x[:, cols])
    got = pick.finish(columns, lambda c: x[:, c], lambda i, c: x[i].index_select(0, c), "cpu")
    return got, pick


def test_sampled_cut_needs_one_reread_on_a_long_row():
    """The fast path is really taken: the full radix selectors never leave their
    first digit, and the value is the sorted one."""
    x = torch.randn(3, 1 << 20, generator=torch.Generator().manual_seed(3)).abs()
    rank = int(x.shape[1] * 0.8)
    got, pick = _keep_cut(x, rank)
    assert pick._sampled and all(s.level == 0 for s in pick._selectors)
    assert torch.equal(got, torch.sort(x, dim=1).values[:, [rank]])


def test_a_misleading_sample_falls_back_to_the_full_radix():
    """Every sampled column (every 4th from a chunk start) is large, the rest small:
    the sample's window lies among the large values, the rank among the small ones."""
    d = 1 << 18
    x = torch.rand(2, d, generator=torch.Generator().manual_seed(4))
    x[:, :: selection._SAMPLE_STRIDE] += 10
    rank = int(d * 0.5)
    got, pick = _keep_cut(x, rank)
    assert pick._sampled and all(s.done for s in pick._selectors)  # the fallback ran
    assert torch.equal(got, torch.sort(x, dim=1).values[:, [rank]])


def test_block_path_with_a_mostly_zero_row():
    """Thousands of tied zero block minima: the answer is the bound itself, no gather."""
    d = 64 * 400
    x = torch.zeros(2, d)
    x[0, 5] = -1.0  # one element below every block minimum of 0
    x[1, ::97] = torch.arange(1, len(range(0, d, 97)) + 1, dtype=torch.float32)
    ranks = [0, 1, 20, d - 1, d - 3]
    assert torch.equal(torch_ops.order_statistics(x, ranks), torch.sort(x, dim=1).values[:, ranks])


def _tanh(x: torch.Tensor) -> torch.Tensor:
    return torch_ops._tanh_(x.clone(), torch.empty_like(x), torch.empty_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_within_two_ulp(dtype):
    """Cubic (float32, |x| < 1/64), x^7 polynomial (< 0.125), expm1 form elsewhere:
    each within 2 ulp, also on both sides of each switch."""
    tiny = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-8, -3e-6], dtype=dtype)
    spread = torch.logspace(-20, 2, 4000, dtype=torch.float64).to(dtype)
    edges = [
        torch.linspace(limit * 0.9, limit * 1.1, 2001, dtype=torch.float64).to(dtype)
        for limit in (torch_ops._TANH_CUBIC_LIMIT, torch_ops._TANH_POLY_LIMIT)
    ]
    x = torch.cat(
        [tiny, spread, -spread, *edges, *(-e for e in edges)]
        + [torch.tensor([19.9, 20.0, 25.0, 1e30, -1e30], dtype=dtype)]
    )
    got = _tanh(x)
    exact = torch.tanh(x.double())
    ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=torch.finfo(dtype).tiny)
    assert torch.all((got.double() - exact).abs() <= 2 * ulp)
    assert torch.equal(torch.signbit(got[:2]), torch.signbit(x[:2]))  # tanh(-0) = -0


def test_tanh_formula_depends_only_on_the_entry():
    """Chunks with and without entries past the polynomial's range give each entry
    the same bits as it gets alone, so results cannot depend on chunking."""
    x = torch.cat([torch.randn(500) * 1e-3, torch.randn(500) * 0.05, torch.randn(500)]).float()
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    together = _tanh(x)
    alone = torch.cat([_tanh(x[i : i + 1]) for i in range(len(x))])
    halves = torch.cat([_tanh(x[:300]), _tanh(x[300:])])
    cubic_only = x.abs() < torch_ops._TANH_CUBIC_LIMIT  # a chunk that takes the one-formula path
    assert torch.equal(_tanh(x[cubic_only]), together[cubic_only])
    assert torch.equal(together, alone) and torch.equal(together, halves)


def test_map_chunks_restores_threads_keeps_order_and_raises(threads):
    torch.set_num_threads(2)
    seen = runtime.map_chunks(lambda i: (i, torch.get_num_threads()), list(range(9)), "cpu")
    assert [i for i, _ in seen] == list(range(9))
    assert all(inner == 1 for _, inner in seen)  # the pool's ops run single-threaded
    assert torch.get_num_threads() == 2
    nested = runtime.map_chunks(
        lambda i: runtime.map_chunks(lambda j: j * i, [1, 2], "cpu"), [1, 2, 3], "cpu"
    )
    assert nested == [[1, 2], [2, 4], [3, 6]]

    def fail(i):
        raise ValueError(f"chunk {i}")

    with pytest.raises(ValueError, match="chunk"):
        runtime.map_chunks(fail, [1, 2], "cpu")
    assert torch.get_num_threads() == 2


def test_workers_follow_work_size_and_thread_budget():
    """The thread count grows with the tensor up to the budget; below two thread shares
    of chunks everything stays on the calling thread."""
    before = torch.get_num_threads()
    least = runtime.MIN_CHUNKS_PER_THREAD
    try:
        for budget in (1, 2, 3, 16):
            torch.set_num_threads(budget)
            for chunks in (0, 1, least, 2 * least - 1, 2 * least, 5 * least + 1, 1000):
                expected = max(1, min(budget, chunks // least))
                assert runtime.workers(chunks) == expected, (budget, chunks)
    finally:
        torch.set_num_threads(before)


def test_few_chunks_stay_on_the_calling_thread_many_share_it():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        few = runtime.MIN_CHUNKS_PER_THREAD * 2 - 1
        seen = runtime.map_chunks(lambda i: threading.get_ident(), list(range(few)), "cpu")
        assert set(seen) == {threading.get_ident()}
        # The first two items wait for each other: two threads must hold them at once,
        # and the caller is one of the workers.
        meet = threading.Barrier(2)

        def item(i: int) -> int:
            if i < 2:
                meet.wait(timeout=30)
            return threading.get_ident()

        many = runtime.map_chunks(item, list(range(few + 1)), "cpu")
        assert len(set(many)) == 2 and threading.get_ident() in set(many)
    finally:
        torch.set_num_threads(before)


def test_kernel_entry_runs_ops_single_threaded_and_keeps_the_budget():
    """Inside the kernel torch's own threads are off (no per-op barriers, which stall on
    a busy machine), while map_chunks still spreads chunks over the caller's budget."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    seen = {}

    @runtime.owns_threads
    def entry(nested: bool) -> None:
        seen["ops"], seen["budget"] = torch.get_num_threads(), runtime.threads()
        if nested:
            entry(False)  # an entry point called from another one keeps the budget

    try:
        entry(True)
        assert seen == {"ops": 1, "budget": 3}
        assert torch.get_num_threads() == 3 and runtime.threads() == 3

        @runtime.owns_threads
        def fails() -> None:
            raise ValueError("inside")

        with pytest.raises(ValueError, match="inside"):
            fails()
        assert torch.get_num_threads() == 3 and runtime.threads() == 3
    finally:
        torch.set_num_threads(before)


def test_buffers_reuse_small_ones_only(monkeypatch):
    cpu = torch.device("cpu")

    def run() -> None:  # a fresh thread: no buffers yet
        a = runtime.buffer(runtime.Role.SCORES, 1000, torch.float32, cpu)
        b = runtime.buffer(runtime.Role.SCORES, 500, torch.float32, cpu)
        assert b.data_ptr() == a.data_ptr()  # the same memory, reused
        c = runtime.buffer(runtime.Role.SCORES, 4000, torch.float32, cpu)
        assert c.numel() == 4000  # grown
        other = runtime.buffer(runtime.Role.WEIGHTS, 10, torch.float32, cpu)
        assert other.data_ptr() != c.data_ptr()
        monkeypatch.setattr(runtime, "MAX_BUFFER_BYTES", 1024)
        big = runtime.buffer(runtime.Role.SCORES, 1000, torch.float32, cpu)
        again = runtime.buffer(runtime.Role.SCORES, 1000, torch.float32, cpu)
        assert big.data_ptr() != again.data_ptr()  # too big to hold: fresh each time
        # The streamed path's stored B is kept up to its own, larger limit, and no further.
        monkeypatch.setattr(runtime, "MAX_STORED_SCORES_BYTES", 8192)
        kept = runtime.buffer(runtime.Role.STORED_SCORES, 2000, torch.float32, cpu)
        assert runtime.buffer(runtime.Role.STORED_SCORES, 2000, torch.float32, cpu).data_ptr() == (
            kept.data_ptr()
        )
        runtime.release(runtime.Role.STORED_SCORES)  # a phase over: freed, made afresh
        assert runtime.buffer(runtime.Role.STORED_SCORES, 2000, torch.float32, cpu).data_ptr() != (
            kept.data_ptr()
        )
        huge = runtime.buffer(runtime.Role.STORED_SCORES, 2049, torch.float32, cpu)
        assert runtime.buffer(runtime.Role.STORED_SCORES, 2049, torch.float32, cpu).data_ptr() != (
            huge.data_ptr()
        )

    errors = []
    thread = threading.Thread(target=lambda: _record(run, errors))
    thread.start()
    thread.join()
    assert not errors, errors[0]


def _record(fn, errors: list) -> None:
    try:
        fn()
    except BaseException as error:
        errors.append(error)


def test_sampled_content_keys_fall_back_to_full_keys():
    """Experts equal on every sampled entry still get distinct keys, so a fixed order."""
    d = 64 * 1024
    step = d // experts._KEY_SAMPLE
    base = torch.zeros(d)
    a, b = base.clone(), base.clone()
    a[1], b[2] = 0.5, -0.25  # off the sample grid (multiples of step)
    assert step > 2
    keys = experts.content_keys([a, b])
    assert keys[0] != keys[1]
    full = [(float(t.double().sum()), float(t.double().norm())) for t in (a, b)]
    assert keys == full
    for order in ([a, b], [b, a]):
        out = merge(base, order, pcb_ratio=1.0, clamp_ratio=0.0)
        assert torch.equal(out, merge(base, [a, b], pcb_ratio=1.0, clamp_ratio=0.0))


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 20_000),
    st.integers(1, 5),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    st.integers(0, 2**16),
)
def test_sampled_content_keys_are_float64_sums_and_norms(d, n, dtype, seed):
    """The keys (all read in one transfer) against each tensor's own float64 sum and
    norm of every step-th entry, the sample the keys are defined on."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(d, generator=g).to(dtype) for _ in range(n)]
    step = max(1, d // experts._KEY_SAMPLE)
    expected = [
        (float(t[::step].double().sum()), float(t[::step].double().norm())) for t in tensors
    ]
    assert experts.content_keys(tensors) == expected
    assert experts.content_keys([]) == []


def test_task_vectors_round_wider_inputs_first_and_flag_content():
    base = torch.tensor([1.0, 2.0, 3.0])
    wide = torch.tensor([1.0 + 1e-12, 2.5, 3.0], dtype=torch.float64)
    vectors = experts.task_vectors(base, [wide, base.clone()])
    assert vectors.tau.dtype == torch.float32
    assert torch.equal(vectors.tau[0], wide.float() - base)  # round(expert) - base
    assert vectors.finite and vectors.changed
    same = experts.task_vectors(base, [base.clone()])
    assert same.finite and not same.changed
    bad = experts.task_vectors(base, [torch.tensor([1.0, float("nan"), 3.0])])
    assert not bad.finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_task_vector_equals_the_three_steps(monkeypatch, threads, dtype):
    """pcb_task_vector (cut taken from chunks in cache, W never stored) gives the very
    floats of scores -> drop_weights -> combine, which the evolve cache and the model
    scope call separately."""
    monkeypatch.setattr(runtime, "CHUNK_ELEMENTS", 3 * 64 * 9)
    g = torch.Generator().manual_seed(3)
    tau = (0.01 * torch.randn(3, 12_345, generator=g)).to(dtype)
    tau *= torch.rand(3, 12_345, generator=g) > 0.3
    coefficients = torch.tensor([0.7, 1.0, 1.3], dtype=dtype)
    for count in (1, 2):
        torch.set_num_threads(count)
        fused = torch_ops.pcb_task_vector(
            tau.clone(), coefficients, pcb_ratio=0.15, clamp_ratio=1e-3
        )
        clipped, score = torch_ops.scores(tau.clone(), clamp_ratio=1e-3)
        weights = torch_ops.drop_weights(score, 0.15)
        assert torch.equal(fused, torch_ops.combine(clipped, weights, coefficients))
        assert fused.dtype == dtype


def test_reread_joins_only_adjacent_ranges_up_to_the_factor():
    """The radix re-read joins chunks for fewer histograms; a gap must never be bridged."""
    runs = [slice(0, 64), slice(64, 128), slice(128, 192), slice(256, 320), slice(320, 330)]
    assert selection._coarser(runs, 2) == [
        slice(0, 128),
        slice(128, 192),
        slice(256, 330),
    ]
    assert selection._coarser(runs, 1) == runs
    assert selection._coarser([], 4) == []
