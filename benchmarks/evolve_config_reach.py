"""How far the whole search config travels in one search (issue 23, "Shape").

Runs a small search on the test suite's toy family (tests/evolve_support.py: 2 experts,
budget 12) under a profiler hook and counts every call inside ``mergekit_pcb`` that
receives the :class:`~mergekit_pcb.evolve.config.EvolveConfig` object as an argument:
the modules it enters and the calls it returns in. Modules that take only the parts
they use (``MergeInputs``, ``SearchSpace``, the tasks, the optimizer section) do not count.

    python benchmarks/evolve_config_reach.py OUT_DIR
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]


def main(out: Path) -> dict:
    from evolve_support import family, search_config, write_config

    from mergekit_pcb.evolve.config import EvolveConfig, load_config
    from mergekit_pcb.evolve.search import RunOptions, run_search

    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(write_config(out / "s.yml", search_config(family())))
    calls: collections.Counter = collections.Counter()

    def hook(frame, event, arg):
        if event != "call" or not frame.f_globals.get("__name__", "").startswith("mergekit_pcb"):
            return
        code = frame.f_code
        for name in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]:
            if isinstance(frame.f_locals.get(name), EvolveConfig):
                calls[frame.f_globals["__name__"], code.co_name] += 1
                return

    sys.setprofile(hook)
    try:
        run_search(cfg, out / "search", RunOptions(progress=False))
    finally:
        sys.setprofile(None)
    modules = collections.Counter()
    for (module, _), n in calls.items():
        modules[module] += n
    return {
        "modules": len(modules),
        "calls": sum(calls.values()),
        "per_module": dict(modules),
        "functions": {f"{m}.{f}": n for (m, f), n in sorted(calls.items())},
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
