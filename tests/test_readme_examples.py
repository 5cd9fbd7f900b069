"""The README's Python examples run as written, on the session's tiny bundle."""
from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_every_python_block_runs(tiny_bundle, tmp_path):
    blocks = python_blocks(README.read_text())
    assert blocks, "the README has no Python example"
    (tmp_path / "bundle").symlink_to(tiny_bundle, target_is_directory=True)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for block in blocks:
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(block, str(README), "exec"), {})
            assert "(1, 64, 64, 3) uint8" in printed.getvalue()
    finally:
        os.chdir(cwd)
