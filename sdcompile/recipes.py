"""Built-in recipes: `recipes/*.toml`, loaded into `sdrun.recipe.Recipe` (the typed view both packages use).

The recipe types are re-exported here for the compiler's modules and tests.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from sdrun.errors import UserError
from sdrun.recipe import (AutoencoderConfig, DDPMSchedule, Family, Parameterization, Recipe, ShapeRange, ShapeRanges,
                          TextActivation, TextEncoderConfig, TextEncoderKind, TextOutputLayer, TokenizerPadding,
                          UNetConfig, recipe_from_dict)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

__all__ = [
    "AutoencoderConfig", "DDPMSchedule", "Family", "Parameterization", "Recipe", "ShapeRange", "ShapeRanges",
    "TextActivation", "TextEncoderConfig", "TextEncoderKind", "TextOutputLayer", "TokenizerPadding", "UNetConfig",
    "RECIPES_DIR", "available_recipes", "load_recipe", "recipe_from_dict", "recipe_path",
]


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def recipe_path(name_or_path: str) -> Path:
    """A recipe name from `recipes/` or a path to a .toml file."""
    if name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"recipe file {path} does not exist.", fix="pass an existing .toml file or a recipe name")
        return path
    path = RECIPES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise UserError(f"unknown recipe {name_or_path!r}.", expected=", ".join(available_recipes()),
                        got=repr(name_or_path), fix="choose one of the recipes above or pass a path to a .toml file")
    return path


def load_recipe(name_or_path: str) -> Recipe:
    path = recipe_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: not valid TOML: {err}", fix="correct the file's syntax") from None
    return recipe_from_dict(data, str(path))
