"""PCB-Merging's arithmetic on n x d task-vector rows, free of any mergekit type.

The algorithm (Du et al., NeurIPS 2024, arXiv 2410.02396; where the paper and the
authors' code differ, the code is the definition). Inputs for one output tensor:
the base theta_0, n fine-tuned theta_1..theta_n, a coefficient lambda_i per model
(``weight``), ``pcb_ratio`` r in (0, 1] (the share each model keeps),
``clamp_ratio`` q in [0, 0.5) and the scale Lambda (``lambda``). Everything is
computed in float32 (float64 stays float64) and cast once at the end.

 1. Task vectors: tau_i = flatten(theta_i - theta_0); d elements, one row per model.
 2. Ranks are 0-based indices into a row sorted ascending, truncated as Python's
    ``int``: lo = int(d q), hi = int(d (1 - q) - 1), cut = int(d (1 - r)); found by
    selection, never a full sort.
 3. Magnitude clip: A_i = clamp(|tau_i|, sorted(|tau_i|)[lo], sorted(|tau_i|)[hi]).
 4. Clipped task vectors: T~_i = sign(tau_i) * A_i (what gets merged).
 5. minmax(x) = (x - min x) / (max x - min x) per row, 0 where max = min.
 6. Intra-balancing: S_i = exp(n minmax(A_i)^2).
 7. Inter-balancing: C_i = tanh(tau_i * sum_k tau_k) (raw tau, all n models).
 8. Scores: B_i = S_i * C_i.
 9. Drop and rescale: t_i = sorted(B_i)[cut], M_i = max B_i,
    W_i = (max(B_i, t_i) - t_i) / (M_i - t_i), 0 where M_i = t_i.
10. Merge: m = sum_i lambda_i W_i T~_i / max(sum_i W_i, 1e-12).
11. Output: theta = theta_0 + Lambda m, in theta_0's shape and the output dtype.

Statistics (steps 2-3 and 9) are taken per tensor, or over each whole model
(``pcb_scope: model``, as the authors' code does: :mod:`.whole_model`).

Modules, from the entry points down:

- :mod:`.paths`: one tensor's merge by one of three paths (streamed from the
  inputs, from stored tau, with whole-model statistics).
- :mod:`.experts`: step 1 and the canonical expert order.
- :mod:`.torch_ops`: steps 2-11 as torch ops over column chunks; the reference for
  the compiled loops, and the path for CUDA and float64.
- :mod:`.bindings` and :mod:`.loops`: the compiled CPU loops (numba, imported on
  the first CPU merge) for float32, and the torch-to-numpy calls into them.
- :mod:`.streamed`: steps 1-11 read from the inputs in three passes.
- :mod:`.recomputed`: the same for a tensor whose scores B would exceed 512 MiB: B is
  made again in each pass that reads it, never stored (the same floats).
- :mod:`.selection` and :mod:`.radix`: exact order statistics from chunks.
- :mod:`.whole_model`: the statistics over all tensors of each model.
- :mod:`.known_cuts`: one tensor's statistics at many ``pcb_ratio`` levels, then
  merges with a known cut in one pass (the search's candidates).
- :mod:`.runtime`: column chunks, the thread pool and per-thread buffers.
"""

from mergekit_pcb.kernel.experts import (
    canonical_order,
    content_keys,
    order_by,
    task_vectors,
)
from mergekit_pcb.kernel.paths import (
    NonFiniteTaskVector,
    merge_ratio_auto,
    merge_stored,
    merge_streamed,
    merge_with_statistics,
    streams,
)
from mergekit_pcb.kernel.runtime import compute_dtype
from mergekit_pcb.kernel.torch_ops import (
    add_scaled,
    combine,
    cut_index,
    drop_weights,
    quantile_indices,
    scores,
)
from mergekit_pcb.kernel.whole_model import ModelStatistics, statistics

__all__ = [
    "ModelStatistics",
    "NonFiniteTaskVector",
    "add_scaled",
    "canonical_order",
    "combine",
    "compute_dtype",
    "content_keys",
    "cut_index",
    "drop_weights",
    "merge_ratio_auto",
    "merge_stored",
    "merge_streamed",
    "merge_with_statistics",
    "order_by",
    "quantile_indices",
    "scores",
    "statistics",
    "streams",
    "task_vectors",
]
