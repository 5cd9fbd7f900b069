"""Full-size inpainting recipes read the released checkpoints' layout: every key such a file carries, the UNet's
`input_blocks.0.0.weight` (320, 9, 3, 3), seeded random weights written and read back through `load_models`."""
from __future__ import annotations

import pytest
import torch

from sdcompile.fingerprint import tensor_fingerprint
from sdcompile.recipes import load_recipe
from sdcompile.weights import ldm_state_dict, load_models
from tests.fixtures.released_layout import released_state_dict, write_safetensors
from tests.models.reference_keys import reference_shapes

pytestmark = pytest.mark.slow

CONV_IN = "input_blocks.0.0.weight"
UNET_PREFIX = "model.diffusion_model."
# sd_checkpoint_keys.txt: the base UNets' parameters, plus 320·5·3·3 in conv_in for the mask and masked image
UNET_PARAMETERS = {"sd15-inpainting": ("sd1_unet", 859_520_964 + 14_400), "sd2-inpainting": ("sd2_unet", 865_925_124)}


@pytest.mark.parametrize("name", sorted(UNET_PARAMETERS))
def test_full_size_inpainting_file_loads(tmp_path, name):
    recipe = load_recipe(name)
    section, parameters = UNET_PARAMETERS[name]
    state = released_state_dict(recipe, seed=0)
    unet = {k.removeprefix(UNET_PREFIX): tuple(v.shape) for k, v in state.items() if k.startswith(UNET_PREFIX)}
    assert unet == reference_shapes(section) | {CONV_IN: (320, 9, 3, 3)}
    assert sum(torch.Size(shape).numel() for shape in unet.values()) == parameters
    written = {k: tensor_fingerprint(v) for k, v in state.items() if k.startswith(UNET_PREFIX)}
    path = write_safetensors(state, tmp_path / f"{name}.safetensors")
    del state  # one copy of the weights at a time
    loaded = ldm_state_dict(load_models(recipe, path))
    assert {k: tensor_fingerprint(v) for k, v in loaded.items() if k.startswith(UNET_PREFIX)} == written
