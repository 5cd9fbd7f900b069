"""A Triton request's tensors -> a validated `GenerationRequest`, or the UserError that answers it."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from sdrun.errors import UserError
from sdrun.image_input import fit_pixels
from sdrun.images import model_image
from sdrun.pipeline import GenerationRequest, complete_request
from sdrun.recipe import Recipe
from sdrun.serve.contract import IMG2IMG, MAX_PROMPT_BYTES, SCALAR, TensorSpec, model_inputs



def decode_request(tensors: Mapping[str, np.ndarray], model: str, recipe: Recipe) -> GenerationRequest:
    """One request's tensors (shapes as `contract` states them), completed from the recipe and validated
    as `sdrun txt2img` validates its options; an img2img image is stretched to the request's size (its
    height/width, else the recipe's default), as `sdrun img2img` does by default."""
    specs = {spec.name: spec for spec in model_inputs(model)}
    unknown = sorted(set(tensors) - set(specs))
    if unknown:
        raise UserError(f"the request has inputs this model does not take: {', '.join(unknown)}.",
                        expected=", ".join(specs), fix="drop them")
    values = {name: _value(spec, tensors[name]) for name, spec in specs.items() if name in tensors}
    if "prompt" not in values:
        raise UserError("the request has no prompt.", expected="a BYTES input 'prompt' of shape [1]",
                        fix="send the prompt as UTF-8 text")
    if model == IMG2IMG and "image" not in values:
        raise UserError("the img2img request has no image.", expected="a UINT8 input 'image' of shape [H, W, 3]",
                        fix="send the input image")
    request = GenerationRequest(
        prompt=values["prompt"], negative_prompt=values.get("negative_prompt", ""), steps=values.get("steps"),
        guidance=values.get("guidance"), seed=values.get("seed", 0), height=values.get("height"),
        width=values.get("width"), sampler=values.get("sampler"), strength=values.get("strength", 0.75))
    completed = complete_request(request, recipe, img2img=model == IMG2IMG)
    if model != IMG2IMG:
        return completed
    pixels = fit_pixels(values["image"], completed.width, completed.height)
    return dataclasses.replace(completed, image=model_image(pixels))


def _value(spec: TensorSpec, array: np.ndarray):
    """The request's value of one input, checked against its spec."""
    array = np.asarray(array)
    if array.ndim != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, array.shape)):
        raise UserError(f"input {spec.name} has shape {list(array.shape)}.",
                        expected=str(list(spec.shape)).replace("-1", "any"), got=str(list(array.shape)),
                        fix=f"send one {spec.name} per request")
    if spec.dtype is np.object_:
        return _text(spec.name, array.reshape(-1)[0])
    if array.dtype != np.dtype(spec.dtype):
        raise UserError(f"input {spec.name} is {array.dtype}.", expected=spec.triton_dtype,
                        got=str(array.dtype), fix=f"send {spec.name} as {spec.triton_dtype}")
    return array if spec.shape != SCALAR else array.reshape(-1)[0].item()


def _text(name: str, value) -> str:
    if not isinstance(value, (bytes, np.bytes_)):
        raise UserError(f"input {name} is not text.", expected="BYTES (UTF-8)", got=type(value).__name__,
                        fix=f"send {name} as a BYTES tensor")
    if len(value) > MAX_PROMPT_BYTES:
        raise UserError(f"input {name} is {len(value)} bytes long.", expected=f"at most {MAX_PROMPT_BYTES} bytes",
                        got=str(len(value)), fix="shorten it: the UNet's context holds a few 75-token chunks at most")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"input {name} is not UTF-8 text.", fix=f"encode {name} as UTF-8") from None
