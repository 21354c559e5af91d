"""Registration of ``pcb`` into mergekit without any user action.

mergekit has no plugin entry points: ``mergekit-yaml`` only knows methods that are
registered before it plans. The installed ``mergekit_pcb_autoload.pth`` puts a
one-line trigger on ``sys.meta_path`` at interpreter start (it imports nothing);
only when ``mergekit.merge_methods.registry`` is imported does it import this
module, which lets the registry load and then registers ``pcb`` into it.
"""

import sys

OPT_OUT_VARIABLE = "MERGEKIT_PCB_NO_AUTOLOAD"
_REGISTRY = "mergekit.merge_methods.registry"


def register() -> None:
    """Register ``pcb`` with mergekit (importing it); safe to call any number of times."""
    from mergekit.merge_methods import registry

    from mergekit_pcb.method import pcb

    if pcb.spec.name not in {m.spec.name for m in registry.registered_methods()}:
        registry.register(pcb)


class _AfterRegistryFinder:
    """Finds the registry through the other finders and registers after it executes."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _REGISTRY:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            register()

        spec.loader.exec_module = exec_module
        return spec


_FINDER = _AfterRegistryFinder()


def arm() -> None:
    """Register now if mergekit's registry is loaded, else on its first import."""
    if _REGISTRY in sys.modules:
        register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def triggered(fullname, path=None, target=None):
    """Called by the ``.pth`` trigger when the registry is first imported."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "mergekit_pcb", False)]
    arm()
    return _FINDER.find_spec(fullname, path, target)
