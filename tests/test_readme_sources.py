"""Every results file the README names as the source of a figure exists, so a renamed file fails CI."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results/"
NAMED_FILE = re.compile(re.escape(RESULTS) + r"[A-Za-z0-9_.\-]+\.(?:json|md|png)")  # not <machine>-<recipe>


def named_results_files() -> set[str]:
    return set(NAMED_FILE.findall((ROOT / "README.md").read_text()))


def test_readme_names_results_files_that_exist():
    named = named_results_files()
    assert named, f"README.md names no file under {RESULTS}"
    missing = sorted(name for name in named if not (ROOT / name).is_file())
    assert not missing, f"README.md cites results files that do not exist: {missing}"


def test_each_named_markdown_has_its_json_beside_it():
    """The markdown is what a reader opens; the JSON beside it holds every measurement."""
    for name in [n for n in named_results_files() if n.endswith(".md")]:
        data = json.loads((ROOT / name).with_suffix(".json").read_text())
        assert f"-{data['recipe']}" in Path(name).name
