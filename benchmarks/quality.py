"""Merge-quality benchmark: PCB against mergekit's methods on tiny algorithmic experts.

One command trains (or reuses from the cache) a tiny Llama base on a mixture of
digit-string tasks, one expert per task and seed, merges the experts with every
method in :data:`METHODS` through mergekit's own merge API, tunes each method's
scale and density on a validation split, and reports exact match on a separate
test split. Why each design choice: see ``benchmarks/RESULTS.md``.

    python benchmarks/quality.py --regime all   # 3 regimes x 5 seeds, writes benchmarks/
    python benchmarks/quality.py --regime lora --seeds 0,1,2 --reuse-seeds   # a few seeds first
    python benchmarks/quality.py --quick --out DIR   # 1 seed, 3 tasks, small grid (the test)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _quality_run import main

if __name__ == "__main__":
    main()
