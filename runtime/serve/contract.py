"""The txt2img / img2img models' tensors, stated once for the server, the client and the Triton
repository's `pipeline` model.

A request is one image: scalars have shape (1,), text is BYTES (UTF-8), images are (H, W, 3) uint8.
The models take no batch axis (`max_batch_size: 0`): requests are batched by `serve.batcher`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

TXT2IMG, IMG2IMG = "txt2img", "img2img"
MAX_PROMPT_BYTES = 16 * 1024  # far past the few 75-token chunks a UNet's context takes; a larger one is refused


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: type  # numpy scalar type; np.object_ holds BYTES
    shape: tuple[int, ...]  # per request, without the batch axis; -1 where the size varies
    optional: bool = False

    @property
    def triton_dtype(self) -> str:
        """The name in Triton's protocol (TYPE_ names in config.pbtxt are "TYPE_" + this)."""
        return TRITON_DTYPES[self.dtype]


TRITON_DTYPES = {np.object_: "BYTES", np.uint8: "UINT8", np.int32: "INT32", np.int64: "INT64",
                 np.float16: "FP16", np.float32: "FP32", np.bool_: "BOOL"}

def config_data_type(dtype) -> str:
    """The `data_type` of a tensor of numpy `dtype` in a Triton config.pbtxt (BYTES is TYPE_STRING there)."""
    name = TRITON_DTYPES[np.dtype(dtype).type]
    return "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}"


SCALAR = (1,)
REQUEST_INPUTS = (
    TensorSpec("prompt", np.object_, SCALAR),
    TensorSpec("negative_prompt", np.object_, SCALAR, optional=True),
    TensorSpec("steps", np.int32, SCALAR, optional=True),
    TensorSpec("guidance", np.float32, SCALAR, optional=True),
    TensorSpec("seed", np.int64, SCALAR, optional=True),
    TensorSpec("height", np.int32, SCALAR, optional=True),
    TensorSpec("width", np.int32, SCALAR, optional=True),
    TensorSpec("sampler", np.object_, SCALAR, optional=True),
)
IMAGE_INPUTS = (
    TensorSpec("image", np.uint8, (-1, -1, 3)),
    TensorSpec("strength", np.float32, SCALAR, optional=True),
)
OUTPUTS = (
    TensorSpec("image", np.uint8, (-1, -1, 3)),
    TensorSpec("parameters", np.object_, SCALAR),
)


def model_inputs(model: str) -> tuple[TensorSpec, ...]:
    return REQUEST_INPUTS + (IMAGE_INPUTS if model == IMG2IMG else ())
