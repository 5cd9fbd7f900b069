"""What a served model does with one request: decode and validate it, wait for its denoising loop,
answer with its image and PNG parameters — or raise the UserError that explains a refusal."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from sdrun.bundle import Bundle
from sdrun.errors import UserError
from sdrun.generate import result_parameters
from sdrun.pipeline import GenerationRequest, GenerationResult, Pipeline, batch_key, check_prompts
from sdrun.serve.batcher import LoopBatcher
from sdrun.serve.contract import IMG2IMG
from sdrun.serve.request import decode_request

LOG = logging.getLogger("sdrun.serve")


class PipelineModel:
    """`txt2img` or `img2img` of `bundle`, its loops run by `pipelines` (one loop at a time each)."""

    def __init__(self, model: str, bundle: Bundle, pipelines: Sequence[Pipeline], backend: str,
                 max_images: int, max_delay_s: float):
        self.model, self.bundle, self.backend = model, bundle, backend
        self.batcher = LoopBatcher([self._loop_on(p) for p in pipelines], max_images, max_delay_s)

    def infer(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request's output tensors; blocks until its loop has run."""
        try:
            request = decode_request(tensors, self.model, self.bundle.recipe)
            chunks = check_prompts(request, self.bundle)
        except UserError as err:
            LOG.warning("refused a %s request: %s", self.model, err.message())
            raise
        return self.batcher.submit(request, (batch_key(request), chunks)).result()

    def close(self) -> None:
        self.batcher.close()

    def _loop_on(self, pipeline: Pipeline):
        def run(requests: Sequence[GenerationRequest]) -> list[dict[str, np.ndarray]]:
            return [self._outputs(result) for result in pipeline.generate_batch(requests)]
        return run

    def _outputs(self, result: GenerationResult) -> dict[str, np.ndarray]:
        text = result_parameters(result, self.bundle, self.backend, self.model == IMG2IMG)
        return {"image": result.images[0], "parameters": np.array([text.encode("utf-8")], dtype=np.object_)}
