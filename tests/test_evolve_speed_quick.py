"""``benchmarks/evolve_speed.py --quick``, end to end, so the README's command cannot rot.

No timing is asserted (that is the benchmark's job, on a quiet machine); the test
checks what could be wrong in the printout: every row present, and each ratio the
quotient of the numbers it is printed beside.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a benchmark run end to end
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "evolve_speed.py"
ROW = re.compile(r"^(?P<label>[^:]+):\s+(?P<value>[\d.]+) (?P<unit>s|GiB)\s*(?P<note>.*)$")


def test_quick_evolve_speed(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--candidates",
        "4",
        "--cache-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "481 pcb_ratio levels" in lines[0], proc.stdout
    rows = {m["label"]: m for m in map(ROW.match, lines[1:]) if m}
    full = float(rows["full mergekit-yaml pcb merge"]["value"])
    rss = float(rows["full mergekit-yaml pcb merge"]["note"].split()[2])
    checks = [
        ("search start-up (statistics)", full),
        ("candidate merge, median of 4", full),
        ("search peak RSS", rss),
    ]
    for label, reference in checks:
        value = float(rows[label]["value"])
        ratio = float(rows[label]["note"].split()[0])
        # Printed values are rounded (2-3 decimals): the ratio of unrounded numbers.
        low = (value - 0.005) / (reference + 0.005)
        high = (value + 0.005) / max(reference - 0.005, 1e-9)
        assert low - 0.005 <= ratio <= high + 0.005, (label, value, reference, ratio)
    assert any(label.startswith("candidate merge, slowest") for label in rows)
