"""A server request's tensors go through the validation `sdrun txt2img/img2img` applies, without a server."""
from __future__ import annotations

import numpy as np
import pytest

from sdrun.errors import UserError
from sdrun.images import model_image
from sdrun.serve.client import request_tensors
from sdrun.serve.contract import IMG2IMG, TXT2IMG
from sdrun.serve.request import decode_request


@pytest.mark.parametrize("model, name, value", [(TXT2IMG, "guidance", np.nan), (TXT2IMG, "guidance", np.inf),
                                                (IMG2IMG, "strength", np.nan), (IMG2IMG, "guidance", -np.inf)])
def test_non_finite_numbers_are_refused(model, name, value, tiny_recipe):
    values = {"prompt": "x", "image": np.zeros((64, 64, 3), np.uint8), name: value}
    with pytest.raises(UserError, match=f"{name} must be a finite number"):
        decode_request(request_tensors(model, values), model, tiny_recipe)


def test_an_img2img_image_is_stretched_to_the_request_size(tiny_recipe):
    image = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    default = decode_request(request_tensors(IMG2IMG, {"prompt": "x", "image": image}), IMG2IMG, tiny_recipe)
    assert default.image.shape == (1, 3, tiny_recipe.default_height, tiny_recipe.default_width)
    sized = decode_request(request_tensors(IMG2IMG, {"prompt": "x", "image": image, "width": 96}), IMG2IMG,
                           tiny_recipe)
    assert (sized.height, sized.width) == (64, 96) and sized.image.shape == (1, 3, 64, 96)
    exact = np.zeros((32, 48, 3), np.uint8)
    same = decode_request(request_tensors(IMG2IMG, {"prompt": "x", "image": exact, "height": 32, "width": 48}),
                          IMG2IMG, tiny_recipe)
    assert np.array_equal(same.image, model_image(exact))


def test_strength_is_named_before_the_image_is_sized(tiny_recipe):
    values = {"prompt": "x", "image": np.zeros((300, 200, 3), np.uint8), "strength": 1.5}
    with pytest.raises(UserError, match="strength"):
        decode_request(request_tensors(IMG2IMG, values), IMG2IMG, tiny_recipe)
