"""A memory-limited cgroup for one benchmark child: the honest "will it fit in X GiB?".

Peak RSS counts the pages of memory-mapped checkpoints, which the kernel keeps while
memory is free and drops under pressure, so a merge with little anonymous memory shows
a large RSS on an idle machine. A cgroup's limit is the pressure itself: page cache is
reclaimed at the limit, anonymous memory is not (the cgroup's OOM killer ends the
merge instead, exit status -9). A merge that completes under a cap of X GiB therefore
runs on a machine with X GiB free. Linux only, and only where this process may create
cgroups (root, or a delegated subtree).
"""

from __future__ import annotations

import os
from pathlib import Path

_V2 = Path("/sys/fs/cgroup")
_V1 = Path("/sys/fs/cgroup/memory")


class MemoryCap:
    """A fresh cgroup limited to ``limit_bytes``; :meth:`enter` moves the calling process
    in (run it as a child's ``preexec_fn``). Memory only: CPU is not limited."""

    def __init__(self, limit_bytes: int) -> None:
        name = f"mergekit-pcb-bench-{os.getpid()}"
        v2 = (_V2 / "cgroup.controllers").exists() and "memory" in (
            _V2 / "cgroup.subtree_control"
        ).read_text().split()
        root, limit_file = (_V2, "memory.max") if v2 else (_V1, "memory.limit_in_bytes")
        self.path = root / name
        try:
            self.path.mkdir(exist_ok=True)
            (self.path / limit_file).write_text(str(limit_bytes))
            if not v2:  # v1: no swap either (memsw exists only with swap accounting)
                memsw = self.path / "memory.memsw.limit_in_bytes"
                if memsw.exists():
                    memsw.write_text(str(limit_bytes))
        except OSError as error:
            self.close()
            raise RuntimeError(
                f"--memory-cap: cannot make a memory cgroup at {self.path} ({error}); it needs "
                "Linux with the memory controller and permission to create cgroups (root)"
            ) from error
        self._procs = str(self.path / "cgroup.procs")

    def enter(self) -> None:
        with open(self._procs, "w") as procs:
            procs.write(str(os.getpid()))

    def close(self) -> None:
        try:
            self.path.rmdir()  # only once empty: every child has exited
        except OSError:
            pass
