"""``benchmarks/_cgroup.MemoryCap``, behind ``speed.py --memory-cap``: a child over the cap
is killed, one under it completes, and the cgroup is gone afterwards.

Needs a writable memory cgroup (Linux, root, as on the project's machines); skipped
where there is none, since the benchmark then refuses the option with that reason.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _cgroup import MemoryCap

MIB = 1 << 20


def _touch(mib: int) -> list[str]:
    """A child that writes ``mib`` MiB of its own memory (written, so it is resident)."""
    return [sys.executable, "-c", f"x = b'x' * ({mib} << 20); print(len(x) >> 20)"]


@pytest.fixture
def cap():
    try:
        made = MemoryCap(256 * MIB)
    except RuntimeError as error:
        pytest.skip(str(error))
    yield made
    made.close()


def test_a_child_over_the_cap_is_killed_and_one_under_it_completes(cap):
    over = subprocess.run(_touch(600), preexec_fn=cap.enter, capture_output=True, timeout=120)
    assert over.returncode == -signal.SIGKILL
    under = subprocess.run(
        _touch(64), preexec_fn=cap.enter, capture_output=True, text=True, timeout=120
    )
    assert under.returncode == 0 and under.stdout.strip() == "64"
    cap.close()
    assert not cap.path.exists()


def test_an_impossible_cgroup_says_why(monkeypatch, tmp_path):
    import _cgroup

    monkeypatch.setattr(_cgroup, "_V2", tmp_path / "absent")
    monkeypatch.setattr(_cgroup, "_V1", tmp_path / "absent" / "memory")
    with pytest.raises(RuntimeError, match="--memory-cap: cannot make a memory cgroup"):
        MemoryCap(256 * MIB)
