"""The Python-backend models of a repository written by `sdcompile triton-repo`: run inside Triton's
Python stub (where `triton_python_backend_utils` exists), from the `sdrun` copy beside their model.py.

`PipelineModel`: the txt2img contract (`serve.contract`); tokenizer, sampler loop and decoding here, each
component a BLS call to its own model. `ComponentModel`: one component on our ONNX Runtime runner.
A refused request gets its own error response; the others of the same execution still run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sdrun.errors import UserError

BUNDLE_DIR = "bundle"


def _version_dir(args: dict) -> Path:
    return Path(args["model_repository"]) / args["model_version"]


class BlsRunner:
    """A `GraphRunner` that runs a component by a BLS request to the model of that name."""

    def __init__(self, model: str, outputs: list[str]):
        self.model, self.outputs = model, outputs
        self.rebuild_hint = f"sdcompile triton-repo BUNDLE --out REPO (the {model} model)"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import triton_python_backend_utils as pb_utils

        request = pb_utils.InferenceRequest(
            model_name=self.model, requested_output_names=self.outputs,
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in feeds.items()])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"the {self.model} model failed: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.outputs}


class PipelineModel:
    def initialize(self, args: dict) -> None:
        from sdrun.bundle import open_bundle
        from sdrun.pipeline import Pipeline

        config = json.loads(args["model_config"])
        components = config["parameters"]["components"]["string_value"].split(",")
        self.backend = config["parameters"]["backend"]["string_value"]
        self.bundle = open_bundle(_version_dir(args) / BUNDLE_DIR, lambda manifest: [])
        runners = {name: BlsRunner(name, [spec.name for spec in self.bundle.manifest.components[name].outputs])
                   for name in components}
        self.pipeline = Pipeline(self.bundle, runners)

    def execute(self, requests) -> list:
        import triton_python_backend_utils as pb_utils

        from sdrun.generate import result_parameters
        from sdrun.serve.contract import TXT2IMG, model_inputs
        from sdrun.serve.request import decode_request

        responses = []
        for request in requests:
            try:
                tensors = {spec.name: tensor.as_numpy() for spec in model_inputs(TXT2IMG)
                           if (tensor := pb_utils.get_input_tensor_by_name(request, spec.name)) is not None}
                result = self.pipeline.generate(decode_request(tensors, TXT2IMG, self.bundle.recipe))
                text = result_parameters(result, self.bundle, self.backend, img2img=False)
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("image", result.images[0]),
                    pb_utils.Tensor("parameters", np.array([text.encode("utf-8")], dtype=np.object_))]))
            except UserError as err:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(err.message())))
        return responses


class ComponentModel:
    def initialize(self, args: dict) -> None:
        from sdrun.backends import make_runners
        from sdrun.bundle import open_bundle

        name = json.loads(args["model_config"])["name"]
        bundle = open_bundle(_version_dir(args) / BUNDLE_DIR, lambda manifest: [name])
        self.runner = make_runners("onnxruntime", bundle, [name])[name]
        self.inputs = [spec.name for spec in bundle.component(name).inputs]

    def execute(self, requests) -> list:
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            outputs = self.runner.run(feeds)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in outputs.items()]))
        return responses
