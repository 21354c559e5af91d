"""``mergekit-pcb evolve``: CMA-ES search over PCB's ratios and coefficients.

The split into modules follows the cost structure: :mod:`.cache` pays once for
PCB's expensive steps 1-8 per tensor, :mod:`.candidate` applies the cheap
remainder for each searched point into one loaded model, :mod:`.tasks` and
:mod:`.objective` score it, :mod:`.search` drives CMA-ES and :mod:`.report`
writes what a user keeps (``best.yml``, ``history.jsonl``, ``report.json``).
"""

from mergekit_pcb.evolve.config import EvolveConfig, EvolveConfigError, load_config

__all__ = ["EvolveConfig", "EvolveConfigError", "load_config"]
