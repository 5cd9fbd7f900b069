"""A Triton request's tensors -> a validated `GenerationRequest`, or the UserError that answers it."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from sdrun.errors import UserError
from sdrun.images import model_image
from sdrun.pipeline import GenerationRequest, complete_request
from sdrun.recipe import Recipe
from sdrun.serve.contract import IMG2IMG, MAX_PROMPT_BYTES, SCALAR, TensorSpec, model_inputs



def decode_request(tensors: Mapping[str, np.ndarray], model: str, recipe: Recipe) -> GenerationRequest:
    """One request's tensors (shapes as `contract` states them), completed from the recipe and validated
    as `sdrun txt2img` validates its options."""
    specs = {spec.name: spec for spec in model_inputs(model)}
    unknown = sorted(set(tensors) - set(specs))
    if unknown:
        raise UserError(f"the request has inputs this model does not take: {', '.join(unknown)}.",
                        expected=", ".join(specs), fix="drop them")
    values = {name: _value(spec, tensors[name]) for name, spec in specs.items() if name in tensors}
    if "prompt" not in values:
        raise UserError("the request has no prompt.", expected="a BYTES input 'prompt' of shape [1]",
                        fix="send the prompt as UTF-8 text")
    image = values.get("image")
    request = GenerationRequest(
        prompt=values["prompt"], negative_prompt=values.get("negative_prompt", ""), steps=values.get("steps"),
        guidance=values.get("guidance"), seed=values.get("seed", 0), height=values.get("height"),
        width=values.get("width"), sampler=values.get("sampler"),
        image=None if image is None else model_image(image),
        strength=values.get("strength", 0.75))
    if model == IMG2IMG:
        request = _with_image_size(request)
    return complete_request(request, recipe)


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


def _with_image_size(request: GenerationRequest) -> GenerationRequest:
    """img2img runs at the image's size; a height or width that differs from it is refused."""
    height, width = request.image.shape[2:]
    for axis, given, actual in (("height", request.height, height), ("width", request.width, width)):
        if given is not None and given != actual:
            raise UserError(f"the request's {axis} {given} differs from its image's {actual}.",
                            fix=f"resize the image to the size wanted, or drop {axis}")
    return dataclasses.replace(request, height=int(height), width=int(width))
