"""``benchmarks/speed.py --quick``, end to end, so the README's speed command cannot rot.

No timing is asserted (that is the benchmark's job, on a quiet machine); the test
checks what could be wrong in the table: every method present, its ratios equal to
the quotients of its own medians, and the models built in the cache directory.
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
SCRIPT = ROOT / "benchmarks" / "speed.py"
ROW = re.compile(
    r"^\| (?P<method>[^|]+?) \| (?P<wall>[\d.]+) s \| (?P<rss>[\d.]+) GiB \|(?P<rest>.*)$"
)


def _cmdline(process: Path) -> str:
    try:
        return (process / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # the process ended meanwhile
        return ""


def test_quick_speed_table(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, str(SCRIPT), "--quick", "-r", "1", "--cache-dir", str(tmp_path)]
    proc = subprocess.run(
        [*args, "--load", "1"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 busy loop(s) beside" in proc.stdout
    # The busy loops end with the benchmark: none is left burning a core.
    assert not [c for c in map(_cmdline, Path("/proc").glob("[0-9]*")) if "while True: pass" in c]

    rows = {m["method"]: m for m in map(ROW.match, proc.stdout.splitlines()) if m}
    assert set(rows) == {"pcb", "pcb (model scope)", "ties", "task_arithmetic"}, proc.stdout
    wall = {name: float(row["wall"]) for name, row in rows.items()}
    for name, row in rows.items():
        cells = [c.strip() for c in row["rest"].split("|") if c.strip()]
        vs_ties, vs_ta, _, vs_pcb, _ = (float(c.rstrip("x")) for c in cells)
        assert float(row["rss"]) > 0
        for ratio, ref in ((vs_ties, "ties"), (vs_ta, "task_arithmetic"), (vs_pcb, "pcb")):
            # The table divides unrounded medians; the walls shown are rounded to 0.1 s.
            low = (wall[name] - 0.05) / (wall[ref] + 0.05)
            high = (wall[name] + 0.05) / max(wall[ref] - 0.05, 1e-9)
            assert low - 0.005 <= ratio <= high + 0.005, (name, ref, ratio, wall)
    built = [p.name for p in (tmp_path / "llama-128x2").iterdir()]
    assert {"base", "expert0", "expert1", "expert2"} <= set(built)
