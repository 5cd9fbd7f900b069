"""`sdrun txt2img --server URL`: one request to a running `sdrun serve`, answered with the image and the
PNG parameters text the server's run produced."""
from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlparse

import numpy as np

from sdrun.errors import MissingDependencyError, UserError
from sdrun.serve.contract import SCALAR, TensorSpec, model_inputs

USER_ERROR_MARK = "UserError: "  # where our message starts in the server's error text
CONNECT_TIMEOUT_S = 10.0


def request_tensors(model: str, values: Mapping[str, object]) -> dict[str, np.ndarray]:
    """The model's input tensors for `values` (None or absent: the input is left out, the server's default)."""
    tensors = {}
    for spec in model_inputs(model):
        value = values.get(spec.name)
        if value is not None:
            tensors[spec.name] = _tensor(spec, value)
    return tensors


def _tensor(spec: TensorSpec, value) -> np.ndarray:
    if spec.dtype is np.object_:
        return np.array([str(value).encode("utf-8")], dtype=np.object_)
    if spec.shape == SCALAR:
        return np.array([value], dtype=spec.dtype)
    return np.ascontiguousarray(value, dtype=spec.dtype)


def remote_generate(url: str, model: str, tensors: Mapping[str, np.ndarray],
                    timeout_s: float) -> tuple[np.ndarray, str]:
    """(image (H, W, 3) uint8, parameters text) from the server at `url` (http://HOST:PORT)."""
    try:
        import tritonclient.http as http
        from tritonclient.utils import InferenceServerException
    except ImportError:
        raise MissingDependencyError("tritonclient", "for sdrun --server", "pip install 'sdcompile[serve]'") from None
    address = _address(url)
    inputs = []
    for name, array in tensors.items():
        spec = next(s for s in model_inputs(model) if s.name == name)
        tensor = http.InferInput(name, list(array.shape), spec.triton_dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [http.InferRequestedOutput(name) for name in ("image", "parameters")]
    try:
        client = http.InferenceServerClient(address, connection_timeout=CONNECT_TIMEOUT_S, network_timeout=timeout_s)
        result = client.infer(model, inputs, outputs=outputs)
    except InferenceServerException as err:
        raise server_error(url, err.message() or str(err)) from None
    except (OSError, ConnectionError) as err:
        raise UserError(f"cannot reach the server at {url} ({err}).",
                        fix="start it with `sdrun serve --bundle B` or check --server") from None
    return result.as_numpy("image"), result.as_numpy("parameters").reshape(-1)[0].decode("utf-8")


def server_error(url: str, text: str) -> UserError:
    """The server's refusal: our message when it sent one, else Triton's own text."""
    if USER_ERROR_MARK in text:
        return UserError(f"the server at {url} refused the request: {text.split(USER_ERROR_MARK, 1)[1].strip()}")
    return UserError(f"the server at {url} refused the request: {text.strip()}",
                     fix="check the request against the server's model (`curl URL/v2/models/txt2img/config`)")


def _address(url: str) -> str:
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
        raise UserError(f"--server {url} is not an HTTP address with a port.", expected="http://HOST:PORT",
                        got=url, fix="e.g. --server http://127.0.0.1:8000")
    return f"{parsed.hostname}:{parsed.port}"
