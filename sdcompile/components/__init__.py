"""The exportable components, registered explicitly by name."""
from __future__ import annotations

from typing import Callable

from sdcompile.components.spec import ComponentSpec
from sdcompile.components.text_encoder import text_encoder_spec
from sdcompile.components.unet import unet_spec
from sdcompile.components.unet_step import unet_step_spec
from sdcompile.components.vae_decoder import vae_decoder_spec
from sdcompile.components.vae_encoder import vae_encoder_spec
from sdcompile.recipes import Recipe
from sdrun.errors import UserError

COMPONENTS: dict[str, Callable[[Recipe], ComponentSpec]] = {
    "text_encoder": text_encoder_spec,
    "unet": unet_spec,
    "unet_step": unet_step_spec,
    "vae_decoder": vae_decoder_spec,
    "vae_encoder": vae_encoder_spec,
}


def check_component_name(name: str) -> None:
    if name not in COMPONENTS:
        raise UserError(f"unknown component {name!r}.", expected=" | ".join([*COMPONENTS, "all"]),
                        got=repr(name), fix="pick one of the components above")


def component_spec(name: str, recipe: Recipe) -> ComponentSpec:
    check_component_name(name)
    return COMPONENTS[name](recipe)


def selected_components(names: tuple[str, ...] | list[str]) -> list[str]:
    """Expand `all`, check names, keep registry order."""
    if not names or "all" in names:
        return list(COMPONENTS)
    for name in names:
        check_component_name(name)
    return [n for n in COMPONENTS if n in names]
