"""``merge_method: pcb`` for ``mergekit-evolve``'s genome.

mergekit-evolve hard-codes its methods in ``mergekit.evo.genome.METHOD_PARAM_MAPS``.
Adding ``pcb: [weight, pcb_ratio]`` is enough for the genome to validate and to
emit configs; two wrappers make the result sensible for PCB:

* ``pcb_ratio`` genes are mapped into PCB's domain (0, 1] as ``|x|`` clipped to
  ``[MIN_RATIO, 1]`` (mergekit does the same with ``abs().clamp(0, 1)`` for
  ``density``; 0 itself is outside PCB's domain);
* the initial genotype starts ``pcb_ratio`` at PCB's default 0.1 instead of the
  1.0 that mergekit uses for densities (keeping everything is not PCB);
* ``pcb_ratio`` is one value per tensor (a shared parameter), and mergekit
  silently ignores shared parameters set per model, which is where the genome
  writes its genes. So the per-model ratio genes of each layer group (and filter
  set) are averaged and written where mergekit reads a shared value: the slice's
  ``parameters`` (discrete genomes) or the top-level ``parameters`` as a
  gradient over layer groups (``smooth: true``).

* the ``normalize`` and ``int8_mask`` parameters that mergekit-evolve writes for every
  method are dropped: ``pcb`` declares neither, and its config check (under
  ``mergekit-yaml`` and ``run_merge`` too) refuses undeclared names, typos included.

Applied automatically after ``mergekit.evo.genome`` is imported (see
:mod:`mergekit_pcb._autoload`); :func:`patch` is idempotent.
"""

from __future__ import annotations

import functools

from mergekit_pcb import mergekit_internals
from mergekit_pcb.parameters import PCB_RATIO, WEIGHT

METHOD = "pcb"
PARAMS = [WEIGHT.name, PCB_RATIO.name]
MIN_RATIO = 1e-3
UNDECLARED = ("normalize", "int8_mask")  # written by the genome for every method


def _ratio_genes(genome, genotype):
    """A copy of ``genotype`` with its pcb_ratio genes mapped into (0, 1]."""
    genotype = mergekit_internals.genotype_tensor(genome, genotype).clone()
    index = PARAMS.index(PCB_RATIO.name)
    genotype[..., index] = genotype[..., index].abs().clamp(MIN_RATIO, PCB_RATIO.high)
    return genotype


def _setting(values: list, filters: list):
    """One ratio (or gradient) per filter set, as mergekit's filter-list syntax."""
    if len(values) == 1:
        return values[0]
    return [{"filter": f, "value": v} for f, v in zip(filters, values, strict=True)]


def _shared_ratio(genome, config, genotype, config_cls):
    """Move pcb_ratio from the per-model sources to where shared values are read."""
    index = PARAMS.index("pcb_ratio")
    ratios = genotype[..., index].mean(dim=1)  # (layer groups, filter sets)
    filters = list(genome.definition.filters or []) + [None]
    data = config.model_dump(mode="json", exclude_none=True)
    for name in UNDECLARED:
        data.get("parameters", {}).pop(name, None)
    for entry in data.get("models") or []:
        entry.get("parameters", {}).pop("pcb_ratio", None)
    for out_slice in data.get("slices") or []:
        for source in out_slice["sources"]:
            source.get("parameters", {}).pop("pcb_ratio", None)
    if data.get("slices"):
        for g, out_slice in enumerate(data["slices"]):
            out_slice.setdefault("parameters", {})["pcb_ratio"] = _setting(
                [float(v) for v in ratios[g]], filters
            )
    else:
        per_set = [[float(v) for v in ratios[:, k]] for k in range(ratios.shape[1])]
        data["parameters"]["pcb_ratio"] = _setting(
            [v[0] if len(v) == 1 else v for v in per_set], filters
        )
    return config_cls.model_validate(data)


def patch(module=None) -> None:
    if module is None:
        import mergekit.evo.genome as module
    if getattr(module, "_mergekit_pcb_patched", False):
        return
    module.METHOD_PARAM_MAPS[METHOD] = list(PARAMS)
    cls = module.ModelGenome
    original_config = cls.genotype_merge_config
    original_initial = cls.initial_genotype

    @functools.wraps(original_config)
    def genotype_merge_config(self, genotype):
        if self.definition.merge_method != METHOD:
            return original_config(self, genotype)
        if self.definition.base_model is None:
            raise ValueError(
                "mergekit-evolve: merge_method pcb needs base_model "
                "(task vectors are taken against it)"
            )
        genotype = _ratio_genes(self, genotype)
        config = original_config(self, genotype)
        return _shared_ratio(self, config, genotype, module.MergeConfiguration)

    @functools.wraps(original_initial)
    def initial_genotype(self, random: bool = False):
        x0 = original_initial(self, random=random)
        if self.definition.merge_method == METHOD and not random:
            x0[..., PARAMS.index(PCB_RATIO.name)] = PCB_RATIO.default
        return x0

    cls.genotype_merge_config = genotype_merge_config
    cls.initial_genotype = initial_genotype
    module._mergekit_pcb_patched = True
