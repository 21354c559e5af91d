"""Registration of ``pcb`` into mergekit without any user action.

mergekit has no plugin entry points: ``mergekit-yaml`` only knows methods that are
registered before it plans. The installed ``mergekit_pcb_autoload.pth`` puts a
one-line trigger on ``sys.meta_path`` at interpreter start (it imports nothing);
only when the ``mergekit`` package is first imported does it import this module,
which arms one after-import hook per mergekit module it acts on: the registry
(register ``pcb``), ``evo.genome`` (accept ``pcb``), ``merge``, ``scripts.run_yaml``
and ``scripts.multimerge`` (pcb's config checks, see :mod:`mergekit_pcb.plain_mergekit`).

Why the package and not the registry: ``mergekit.merge`` imports the registry half
way through its own body, so a hook armed at that moment could never wrap
``run_merge``, which ``mergekit-yaml`` binds by name as soon as ``mergekit.merge``
finishes loading.
"""

import sys
import threading

OPT_OUT_VARIABLE = "MERGEKIT_PCB_NO_AUTOLOAD"
_REGISTRY = "mergekit.merge_methods.registry"
_GENOME = "mergekit.evo.genome"
_MERGE = "mergekit.merge"
_MULTIMERGE = "mergekit.scripts.multimerge"
_RUN_YAML = "mergekit.scripts.run_yaml"


def register() -> None:
    """Register ``pcb`` with mergekit (importing it); safe to call any number of times."""
    method = sys.modules.get("mergekit_pcb.method")
    if method is not None and not hasattr(method, "pcb"):
        # method.py is mid-import (its own mergekit import loaded the registry and fired
        # the hook); it calls register() itself once ``pcb`` exists.
        return
    from mergekit.merge_methods import registry

    from mergekit_pcb.method import pcb

    if pcb.spec.name not in {m.spec.name for m in registry.registered_methods()}:
        registry.register(pcb)


def patch_genome() -> None:
    """Let ``mergekit-evolve``'s genome accept ``merge_method: pcb`` (see evolve_compat)."""
    module = sys.modules.get(_GENOME)
    if module is not None and hasattr(module, "ModelGenome"):  # skip a half-imported module
        from mergekit_pcb.evolve_compat import patch

        patch(module)


def guard_merge() -> None:
    """pcb's checks around ``run_merge`` (see mergekit_internals.guard_merge)."""
    module = sys.modules.get(_MERGE)
    if module is not None and hasattr(module, "run_merge"):  # skip a half-imported module
        from mergekit_pcb.mergekit_internals import guard_merge as guard
        from mergekit_pcb.plain_mergekit import check_merge

        guard(module, check_merge)


def guard_multimerge() -> None:
    """pcb's checks of every document of a ``mergekit-multi`` config, before the first merge."""
    module = sys.modules.get(_MULTIMERGE)
    if module is not None and hasattr(module, "load_config"):
        from mergekit_pcb.mergekit_internals import guard_multimerge as guard
        from mergekit_pcb.plain_mergekit import check_multimerge

        guard(module, check_multimerge)


def guard_run_yaml() -> None:
    """``mergekit-yaml``'s YAML checked as ``mergekit-pcb merge`` checks it."""
    module = sys.modules.get(_RUN_YAML)
    if module is not None and hasattr(module, "main"):
        from mergekit_pcb.mergekit_internals import guard_run_yaml as guard
        from mergekit_pcb.plain_mergekit import check_config_file

        guard(module, check_config_file)


class _AfterImportFinder:
    """Finds one module through the other finders and runs ``action`` after it executes.

    Why the guard: another finder that also asks the others (a second plugin written
    this way) would call back into this one, and the two would recurse until Python
    gave up, breaking ``import mergekit``; a nested call for the same module declines.
    """

    def __init__(self, name: str, action):
        self.name, self.action = name, action
        self._searching = threading.local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or getattr(self._searching, "active", False):
            return None
        self._searching.active = True
        try:
            spec = self._find_elsewhere(fullname, path, target)
        finally:
            self._searching.active = False
        if spec is None:
            return None
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            self.action()

        spec.loader.exec_module = exec_module
        return spec

    def _find_elsewhere(self, fullname, path, target):
        for finder in list(sys.meta_path):
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    return spec
        return None


_FINDER = _AfterImportFinder(_REGISTRY, register)
_GENOME_FINDER = _AfterImportFinder(_GENOME, patch_genome)
_HOOKS = (
    (_REGISTRY, register, _FINDER),
    (_GENOME, patch_genome, _GENOME_FINDER),
    (_MERGE, guard_merge, _AfterImportFinder(_MERGE, guard_merge)),
    (_MULTIMERGE, guard_multimerge, _AfterImportFinder(_MULTIMERGE, guard_multimerge)),
    (_RUN_YAML, guard_run_yaml, _AfterImportFinder(_RUN_YAML, guard_run_yaml)),
)


def arm() -> None:
    """Act now for modules already loaded, else on their first import.

    ``mergekit-evolve`` imports the genome before the registry, so by the time the
    ``.pth`` trigger fires (on the registry) the genome is loaded and patched here.
    """
    for name, action, finder in _HOOKS:
        if name in sys.modules:
            action()
        elif finder not in sys.meta_path:
            sys.meta_path.insert(0, finder)


def triggered(fullname, path=None, target=None):
    """Called by the ``.pth`` trigger when ``mergekit`` is first imported (an older
    trigger fired on the registry: the hook of the module being imported answers)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "mergekit_pcb", False)]
    arm()
    for name, _, finder in _HOOKS:
        if name == fullname:
            return finder.find_spec(fullname, path, target)
    return None
