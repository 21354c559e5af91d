"""``mergekit-pcb evolve``: CMA-ES search over PCB's ratios and coefficients.

The split into modules follows the cost structure: :mod:`.cache` takes once, per
tensor, the few numbers a merge needs that do not depend on the searched values
(clip bounds, max B, the cut at every ``pcb_ratio`` level); :mod:`.candidate`
merges each searched point from the memory-mapped inputs (:mod:`.inputs`) into
one loaded model; :mod:`.tasks` and :mod:`.objective` score it, :mod:`.search`
drives CMA-ES and :mod:`.report` writes what a user keeps (``best.yml``,
``history.jsonl``, ``report.json``).
"""

from mergekit_pcb.evolve.config import EvolveConfig, EvolveConfigError, load_config

__all__ = ["EvolveConfig", "EvolveConfigError", "load_config"]
