"""A recipe's tiny twin as a user has it: a released-layout single file, exported through the CLI."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from sdcompile.recipes import load_recipe
from tests.fixtures.released_layout import released_state_dict, write_safetensors

SEED = 11


@dataclasses.dataclass(frozen=True)
class Twin:
    recipe_name: str
    file: Path  # the released-layout .safetensors
    bundle: Path  # exported from it through the CLI


def cli(main, *args: str) -> None:
    """Run a CLI entry point in this process; fail with its exit code if it exits."""
    try:
        main(list(args))
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"{' '.join(args[:2])} exited {exit_.code}"


def export_released_twin(recipe_name: str, folder: Path) -> Twin:
    from sdcompile.cli import main

    recipe = load_recipe(recipe_name)
    file = write_safetensors(released_state_dict(recipe, SEED), folder / f"{recipe.name}.safetensors")
    cli(main, "export", "--recipe", recipe.name, "--checkpoint", str(file), "--component", "all",
        "--out", str(folder / "bundle"))
    return Twin(recipe.name, file, folder / "bundle")
