"""The exportable components, registered explicitly by name."""
from __future__ import annotations

from typing import Callable

from sdcompile.components.spec import ComponentSpec
from sdcompile.components.text_encoder import text_encoder_2_spec, text_encoder_spec
from sdcompile.components.unet import unet_spec
from sdcompile.components.unet_step import unet_step_spec
from sdcompile.components.vae_decoder import vae_decoder_spec
from sdcompile.components.vae_encoder import vae_encoder_spec
from sdcompile.recipes import Recipe
from sdrun.errors import UserError

COMPONENTS: dict[str, Callable[[Recipe], ComponentSpec]] = {
    "text_encoder": text_encoder_spec,
    "text_encoder_2": text_encoder_2_spec,
    "unet": unet_spec,
    "unet_step": unet_step_spec,
    "vae_decoder": vae_decoder_spec,
    "vae_encoder": vae_encoder_spec,
}


def recipe_has(name: str, recipe: Recipe) -> bool:
    """Whether the recipe's models have this component (a second text encoder is SDXL's alone)."""
    return name != "text_encoder_2" or recipe.text_encoder_2 is not None


def recipe_component_names(recipe: Recipe) -> list[str]:
    """The recipe's components in registry order (what `all` exports)."""
    return [name for name in COMPONENTS if recipe_has(name, recipe)]


def check_component_name(name: str, recipe: Recipe) -> None:
    if name not in COMPONENTS:
        raise UserError(f"unknown component {name!r}.", expected=" | ".join([*COMPONENTS, "all"]),
                        got=repr(name), fix="pick one of the components above")
    if not recipe_has(name, recipe):
        raise UserError(f"recipe {recipe.name} has no component {name}.",
                        expected=" | ".join([*recipe_component_names(recipe), "all"]), got=repr(name),
                        fix="pick one of the recipe's components above")


def component_spec(name: str, recipe: Recipe) -> ComponentSpec:
    check_component_name(name, recipe)
    return COMPONENTS[name](recipe)


def selected_components(names: tuple[str, ...] | list[str], recipe: Recipe) -> list[str]:
    """Expand `all` to the recipe's components, check names, keep registry order."""
    if not names or "all" in names:
        return recipe_component_names(recipe)
    for name in names:
        check_component_name(name, recipe)
    return [n for n in COMPONENTS if n in names]
