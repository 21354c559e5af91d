"""The README's commands leave nothing for git to pick up, and say what they cost (issue 14)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# command -> index of its output folder among its positional arguments
WRITERS = {
    "mergekit-pcb demo": 0,
    "mergekit-pcb merge": 1,
    "mergekit-pcb evolve": 1,
    "mergekit-pcb inspect": 1,
    "mergekit-yaml": 1,
    "make_models.py": 0,
}
# A command where a line, an inline code span or a `&&` chain starts, or after its folder.
COMMAND = re.compile(
    r"(?:^|(?<=[`/])|(?<=&& ))("
    + "|".join(re.escape(c) for c in WRITERS)
    + r")((?:\s+[^\s`|#\[]+)+)",
    re.MULTILINE,
)


def readme_outputs() -> set[str]:
    """Every relative folder a README command writes (placeholders and /tmp paths aside)."""
    found = set()
    for match in COMMAND.finditer(README):
        positional = []
        for word in match.group(2).split():
            if word.startswith("-"):
                break
            positional.append(word)
        index = WRITERS[match.group(1)]
        if len(positional) > index:
            out = positional[index].rstrip("/").removeprefix("./")
            if not out.startswith(("/", "~")) and not out.isupper():
                found.add(out)
    return found


def test_readme_outputs_are_ignored_by_git():
    """Row 15: `merged/` from the README was not in .gitignore."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    outputs = readme_outputs()
    assert {"pcb-demo", "merged", "out/evolve", "examples/models", "pcb-demo-2"} <= outputs
    for out in sorted(outputs):
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", f"{out}/model.safetensors"], cwd=ROOT
        ).returncode
        assert ignored == 0, f"README writes {out}/, which .gitignore does not cover"


def test_readme_says_what_building_the_example_models_costs():
    """Row 15: it said "seconds" for what takes about half a minute or more."""
    lines = [line for line in README.splitlines() if "make_models.py" in line]
    assert lines
    for line in lines:
        assert re.search(r"#.*(\d+ ?s\b|minute)", line), line


def test_readme_quality_tables_are_the_benchmark_s_own():
    """The README's quality table and paired differences are what
    ``benchmarks/quality_tables.py`` makes of the three committed results.json: a
    rerun regime cannot leave stale numbers behind (they did, before the generator)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "quality_tables", ROOT / "benchmarks" / "quality_tables.py"
    )
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    results = tables._load()
    assert tables.table(results) in README
    assert tables.differences(results) in README
    # A cell is the number in results.json: pcb on lora, mean and std in points.
    pcb = results["lora"]["methods"]["pcb"]
    cell = f"{100 * pcb['normalized_mean']:.1f} ± {100 * pcb['normalized_std']:.1f}"
    row = next(line for line in README.splitlines() if line.startswith("| pcb | "))
    assert row.split(" | ")[3].startswith(cell)
