"""The bounded-memory path for large tensors (kernel/recomputed.py): B is never stored.

A tensor whose scores B would exceed ``streamed.STORED_SCORES_BYTES`` makes B again
in each pass that reads it. That must change how much memory the merge holds, never
a single bit of what it writes: every test merges through mergekit with the limit
forced to 0 (every tensor recomputes) and with it out of reach (every tensor
stores B, the path that existed before), on tensors large enough for the cut's
sample (d >= 65536) and cut into dozens of small chunks, and compares bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_reference
from mergekit.merge_methods import merge_tensors
from reference import reference_merge

import mergekit_pcb  # noqa: F401  (registers pcb)
from mergekit_pcb.kernel import recomputed, runtime, selection, streamed

D = 200_003  # >= selection._SAMPLE_MIN_COLUMNS: the keep cut is sampled


def family(d: int, n: int, seed: int, dtype: torch.dtype, shape=None):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g)
    tau = 0.02 * torch.randn(n, d, generator=g)
    tau *= torch.rand(n, d, generator=g) >= 0.3  # exact zeros, as in bf16 fine-tunes
    tau[:, :: max(1, d // 7)] *= 50  # outliers for the clip
    shape = shape or (d,)
    return base.to(dtype).reshape(shape), [(base + r).to(dtype).reshape(shape) for r in tau]


def merge(base, experts, **parameters):
    return merge_tensors([base, *experts], "pcb", base_index=0, parameters=parameters)


@pytest.fixture
def small_chunks(monkeypatch):
    """Dozens of chunks of a few blocks each, two threads sharing them."""
    monkeypatch.setattr(runtime, "CHUNK_ELEMENTS", 3 * runtime.BLOCK * 50 + 7)
    monkeypatch.setattr(runtime, "MIN_CHUNKS_PER_THREAD", 1)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def both_paths(monkeypatch, base, experts, **parameters):
    """(stored B, recomputed B) merges of the same inputs; checks the paths were taken."""
    taken = []
    original = recomputed.merge

    def spy(*args, **kwargs):
        taken.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(recomputed, "merge", spy)
    monkeypatch.setattr(streamed, "STORED_SCORES_BYTES", 1 << 62)
    stored = merge(base, experts, **parameters)
    assert not taken
    monkeypatch.setattr(streamed, "STORED_SCORES_BYTES", 0)
    again = merge(base, experts, **parameters)
    assert taken, "the recomputed path did not run"
    return stored, again


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "pcb_ratio",
    [
        0.2,  # the cut from the sample's window (pass 1 gathers the sampled columns)
        0.9,
        1.0,  # cut rank 0: from block minima (pass 1 reads every chunk)
        0.0005,  # cut rank near d: from block maxima
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_recomputed_equals_stored_bit_for_bit(monkeypatch, small_chunks, dtype, pcb_ratio, threads):
    torch.set_num_threads(threads)
    base, experts = family(D, 3, seed=7, dtype=dtype, shape=(D,))
    assert len(runtime.column_chunks(3, D)) >= 40
    stored, again = both_paths(monkeypatch, base, experts, pcb_ratio=pcb_ratio, weight=0.7)
    assert torch.equal(stored, again)
    assert stored.dtype == dtype
    assert not torch.equal(stored, base)  # the merge did something


def test_recomputed_after_a_missed_window(monkeypatch, small_chunks):
    """A sample whose window misses the cut falls back to full radix passes, which then
    read B made again per chunk: still the same bits."""
    monkeypatch.setattr(selection, "_WINDOW_DIGITS", 0)  # every window is refused
    base, experts = family(D, 4, seed=3, dtype=torch.bfloat16)
    stored, again = both_paths(monkeypatch, base, experts, pcb_ratio=0.3, clamp_ratio=1e-4)
    assert torch.equal(stored, again)


def test_recomputed_matrix_and_weights_match_reference(monkeypatch, small_chunks):
    """A 2-D tensor with per-model weights and lambda, against the float64 reference."""
    base, experts = family(512 * 400, 3, seed=11, dtype=torch.float32, shape=(512, 400))
    params = {"pcb_ratio": 0.15, "clamp_ratio": 2e-4, "lambda": 1.3}
    weights = [0.5, 1.0, 1.7]
    stored, again = both_paths(monkeypatch, base, experts, **params, weight=weights)
    assert torch.equal(stored, again)
    expected = reference_merge(
        base, experts, weights=weights, pcb_ratio=0.15, clamp_ratio=2e-4, lam=1.3
    )
    assert_close_to_reference(again, expected)


@pytest.fixture
def asked(monkeypatch):
    """Every (role, numel) of runtime.buffer, with every tensor on the recomputed path."""
    found = []
    original = runtime.buffer

    def spy(role, numel, dtype, device):
        found.append((role, numel))
        return original(role, numel, dtype, device)

    monkeypatch.setattr(runtime, "buffer", spy)
    monkeypatch.setattr(streamed, "STORED_SCORES_BYTES", 0)
    return found


def test_recomputed_holds_no_n_by_d_buffer(asked, small_chunks):
    """The point of the path: every scratch it asks for is a chunk's, not the tensor's."""
    base, experts = family(D, 3, seed=5, dtype=torch.bfloat16)
    merge(base, experts, pcb_ratio=0.2)
    assert asked
    assert runtime.Role.SCORES not in {role for role, _ in asked}
    # Chunk scratch only: the cut's re-reads join up to 4 chunks (selection._REREAD_FACTOR).
    chunked = [numel for role, numel in asked if role is not runtime.Role.CUT_SAMPLE]
    assert max(chunked) <= 4 * runtime.CHUNK_ELEMENTS < 3 * D // 4
    # The keep cut's sample: every stride-th column, at most _SAMPLE_MAX slots per row.
    sampled = [numel for role, numel in asked if role is runtime.Role.CUT_SAMPLE]
    assert max(sampled) <= 3 * -(-D // selection._SAMPLE_STRIDE)


def test_default_limit_stores_small_tensors_and_recomputes_large(monkeypatch):
    """Under the default limit a layer-sized tensor keeps the stored path; only one whose
    B exceeds it recomputes (checked on the decision, with a tiny limit)."""
    taken = []
    original = recomputed.merge
    monkeypatch.setattr(
        recomputed, "merge", lambda *a, **k: taken.append(True) or original(*a, **k)
    )
    base, experts = family(100_000, 3, seed=2, dtype=torch.bfloat16)
    assert 3 * 100_000 * 4 <= streamed.STORED_SCORES_BYTES
    merge(base, experts, pcb_ratio=0.2)
    assert not taken
    monkeypatch.setattr(streamed, "STORED_SCORES_BYTES", 3 * 100_000 * 4 - 1)
    merge(base, experts, pcb_ratio=0.2)
    assert taken


# ------------------------------------------------ the whole-model scope, piece by piece


def test_model_scope_merge_in_pieces_equals_one_piece(monkeypatch):
    """merge_with_statistics holds one piece of columns at a time: any cut into pieces
    (whole chunks each) gives the floats of the tensor merged at once."""
    from mergekit_pcb.kernel import ModelStatistics, merge_with_statistics

    monkeypatch.setattr(runtime, "CHUNK_ELEMENTS", 3 * runtime.BLOCK * 20 + 5)
    base, experts = family(50_011, 3, seed=13, dtype=torch.bfloat16)
    stats = [
        ModelStatistics(low=1e-4, high=0.5, threshold=t, top=2.0, elements=10**6)
        for t in (0.01, 0.02, 0.015)
    ]

    def run():
        return merge_with_statistics(
            base, experts, [0.6, 1.0, 1.4], stats, pcb_ratio=0.2, scale=1.1
        )

    monkeypatch.setattr(runtime, "PIECE_ELEMENTS", 1 << 40)
    assert len(runtime.column_pieces(3, 50_011)) == 1
    whole = run()
    monkeypatch.setattr(runtime, "PIECE_ELEMENTS", 3 * runtime.BLOCK * 20 * 3)
    assert len(runtime.column_pieces(3, 50_011)) >= 5
    assert torch.equal(run(), whole)
    assert not torch.equal(whole, base)
    # An unchanged tensor is the base itself, in pieces too.
    assert (
        merge_with_statistics(base, [base.clone()] * 3, [1.0] * 3, stats, pcb_ratio=0.2, scale=1.0)
        is base
    )


def test_column_pieces_are_runs_of_whole_chunks(monkeypatch):
    monkeypatch.setattr(runtime, "CHUNK_ELEMENTS", 3 * runtime.BLOCK * 4)
    chunks = runtime.column_chunks(3, 10_000)
    pieces = runtime.column_pieces(3, 10_000, elements=3 * runtime.BLOCK * 4 * 3 + 1)
    starts = {c.start for c in chunks} | {10_000}
    assert pieces[0].start == 0 and pieces[-1].stop == 10_000
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert a.stop == b.start
    for p in pieces:
        assert p.start in starts and p.stop in starts
        assert 3 * (p.stop - p.start) <= 3 * runtime.BLOCK * 4 * 3 + 1
    assert len(pieces) == -(-len(chunks) // 3)


_PIECES = """
import sys
from mergekit_pcb.kernel import runtime
runtime.CHUNK_ELEMENTS = 3 * runtime.BLOCK * 8 + 1
runtime.PIECE_ELEMENTS = int(sys.argv.pop(1))
from mergekit.scripts.run_yaml import main
sys.argv[0] = "mergekit-yaml"
main()
"""


def test_model_scope_statistics_and_merge_in_pieces_through_mergekit(tmp_path, family):
    """pcb_scope: model through mergekit-yaml, every tensor cut into many pieces for the
    statistics' passes and the merge, against the same merge in one piece per tensor."""
    import subprocess
    import sys

    from conftest import load_tensors, write

    models = "".join(f"  - model: {e}\n" for e in family.experts)
    config = write(
        tmp_path / "c.yml",
        f"merge_method: pcb\nbase_model: {family.base}\nmodels:\n{models}"
        "parameters:\n  pcb_ratio: 0.3\n  clamp_ratio: 0.01\n  pcb_scope: model\n",
    )
    outputs = {}
    for pieces in (1 << 40, 3 * runtime.BLOCK * 8 * 2):
        out = tmp_path / f"out{pieces}"
        done = subprocess.run(
            [sys.executable, "-c", _PIECES, str(pieces), config, out, "--no-copy-tokenizer"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[pieces] = load_tensors(out)
    one, many = outputs.values()
    assert set(one) == set(many)
    base = load_tensors(family.base)
    assert any(not torch.equal(one[k], base[k]) for k in one if k in base)
    for name in one:
        assert torch.equal(one[name], many[name]), name


def _auto_merges(monkeypatch, base, experts, weights, pcb_ratio, scale):
    """(stored B, recomputed B, and for pcb_ratio: auto the torch-ops path that stores
    tau), each with what it told of the level and the scale."""
    from mergekit_pcb import kernel

    results = []
    for limit in (1 << 62, 0):
        monkeypatch.setattr(streamed, "STORED_SCORES_BYTES", limit)
        told = {"ratio": [], "scale": []}
        out = kernel.merge_streamed(
            base, experts, weights, pcb_ratio=pcb_ratio, clamp_ratio=1e-4, scale=scale,
            on_scale=told["scale"].append, on_ratio=told["ratio"].append,
        )  # fmt: skip
        results.append((out, told))
    if pcb_ratio == "auto":
        told = {"ratio": [], "scale": []}
        out = kernel.merge_ratio_auto(
            base, experts, weights, clamp_ratio=1e-4, scale=scale,
            on_scale=told["scale"].append, on_ratio=told["ratio"].append,
        )  # fmt: skip
        results.append((out, told))
    return results


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pcb_ratio, scale", [(0.2, "auto"), ("auto", 1.3), ("auto", "auto")])
def test_auto_recomputed_equals_stored_bit_for_bit(
    monkeypatch, small_chunks, dtype, pcb_ratio, scale
):
    """lambda: auto and pcb_ratio: auto on a large tensor: m is never held, B made once
    more per chunk for the sums of every level; the level, the scale and every output
    bit are those of the paths that store B (and, for pcb_ratio: auto, tau)."""
    torch.set_num_threads(2)
    base, experts = family(D, 3, seed=13, dtype=dtype)
    results = _auto_merges(monkeypatch, base, experts, [0.8, 1.0, 1.2], pcb_ratio, scale)
    (first, told), *others = results
    assert len(told["ratio"]) == (pcb_ratio == "auto") and len(told["scale"]) == (scale == "auto")
    for out, also in others:
        assert also == told and torch.equal(out, first)
    assert not torch.equal(first, base)


def test_auto_recomputed_holds_no_n_by_d_buffer(asked, small_chunks):
    """Both autos on the large-tensor path: chunk scratch only (m included)."""
    from mergekit_pcb import kernel

    base, experts = family(D, 3, seed=5, dtype=torch.bfloat16)
    kernel.merge_streamed(
        base, experts, [1.0] * 3, pcb_ratio="auto", clamp_ratio=1e-4, scale="auto"
    )
    assert runtime.Role.STREAMED_MERGED in {role for role, _ in asked}
    assert runtime.Role.SCORES not in {role for role, _ in asked}
    chunked = [numel for role, numel in asked if role is not runtime.Role.CUT_SAMPLE]
    assert max(chunked) <= 4 * runtime.CHUNK_ELEMENTS < 3 * D // 4
