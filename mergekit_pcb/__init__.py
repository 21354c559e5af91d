"""PCB-Merging for mergekit.

Importing this package is cheap and never imports mergekit: it registers ``pcb``
at once when mergekit's registry is already loaded, and otherwise arms a hook that
registers it the moment mergekit loads its registry. The ``.pth`` file installed
with the package does exactly this import at interpreter start.
"""

from mergekit_pcb._autoload import OPT_OUT_VARIABLE, arm, register

__version__ = "0.1.0"
__all__ = ["OPT_OUT_VARIABLE", "arm", "register", "__version__"]

arm()
