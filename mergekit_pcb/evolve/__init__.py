"""``mergekit-pcb evolve``: a search over PCB's ratios and coefficients, paid in examples.

The search runs six steps (:mod:`.search` drives them, in this order):

1. **Plan.** Validate the config and the data before any model loads; plan the merge
   with mergekit's own planner (the tensor list and each tensor's layer group); size
   the fidelity schedule and the budget.
   :mod:`.config` (the YAML, every check that needs no weights), :mod:`.data` (JSONL),
   :mod:`.layout` (mergekit's plan, ``best.yml``'s config), :mod:`.fidelity`
   (:class:`~.fidelity.Schedule`, :class:`~.fidelity.Budget`).
2. **Cache.** Once per tensor, the few numbers a merge needs that do not depend on
   the searched values (clip bounds, max B, the cut at every ``pcb_ratio`` level);
   for a label-free ``agreement`` task, once per expert, its top-k next-token
   outputs on its own prompts (on disk, bounded, reused while the expert is unchanged).
   :mod:`.cache`, :mod:`.inputs` (the memory-mapped inputs), :mod:`.agreement`.
3. **Propose.** An optimizer behind one ask/tell interface proposes a round of points
   in the unit cube; PCB's defaults, ``optimizer.start`` and the sweep come first.
   :mod:`.optimizers` (the interface; :mod:`.optimizers.cmaes`, :mod:`.optimizers.samplers`
   for optuna's TPE and GP, :mod:`.optimizers.uniform` for random), :mod:`.candidate`
   (:class:`~.candidate.Genome`: cube <-> PCB values), :mod:`.auto_start`
   (``optimizer.start.lambda: auto``: the start at pcb's own scale).
4. **Score at a fidelity.** Merge each candidate into one loaded model (no file per
   candidate) and score it on a slice of every task: the first examples of the
   search split that the schedule gives its rung.
   :mod:`.candidate` (:class:`~.candidate.ModelWriter`), :mod:`.evaluator`,
   :mod:`.tasks` (the scorers; :mod:`.agreement`'s KL to the experts; :mod:`.tokens`, what
   both share), :mod:`.objective`,
   :mod:`.pool` and :mod:`.ray_pool` (in this process or on Ray actors).
5. **Promote.** Within a round, the best ``1/eta`` on one slice go on to the next,
   larger one (synchronous successive halving); only scores on the same slice are
   compared, and the result is the best on the whole split.
   :mod:`.fidelity` (:func:`~.fidelity.promote`, :func:`~.fidelity.ranking`).
6. **Report.** ``history.jsonl`` (one line per scoring, flushed: ``--resume``),
   ``best.yml`` (checked against mergekit's planner), ``report.json`` with the examples
   and seconds scored, ``progress.png`` and the printed summary.
   :mod:`.report`.

Each module takes the parts of the config it uses (:class:`~.config.MergeInputs`, the
search space, the tasks, the optimizer section), not the whole config.
"""

from mergekit_pcb.evolve.config import EvolveConfig, EvolveConfigError, load_config

__all__ = ["EvolveConfig", "EvolveConfigError", "load_config"]
