"""What a served model does with one request: decode and validate it, wait for its denoising loop,
answer with its image and PNG parameters — or raise the UserError that explains a refusal."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from sdrun.bundle import Bundle
from sdrun.errors import UserError
from sdrun.generate import result_parameters
from sdrun.generation_request import batch_key
from sdrun.pipeline import GenerationRequest, GenerationResult, Pipeline, check_prompts
from sdrun.quality import NonFiniteError, QualityCounter, Signal, image_signals
from sdrun.serve.batcher import LoopBatcher
from sdrun.serve.contract import IMG2IMG
from sdrun.serve.request import decode_request

LOG = logging.getLogger("sdrun.serve")


class PipelineModel:
    """`txt2img` or `img2img` of `bundle`, its loops run by `pipelines` (one loop at a time each)."""

    def __init__(self, model: str, bundle: Bundle, pipelines: Sequence[Pipeline], backend: str,
                 max_images: int, max_delay_s: float):
        self.model, self.bundle, self.backend = model, bundle, backend
        self.quality = QualityCounter()
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
            return [self._outputs(result) for result in self.checked_batch(pipeline, requests)]
        return run

    def checked_batch(self, pipeline: Pipeline, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """The loop's results, each image's quality signal counted and the request behind a signal logged."""
        try:
            results = pipeline.generate_batch(requests)
        except NonFiniteError:
            self.quality.add([Signal.NON_FINITE] * sum(r.batch for r in requests))
            for request in requests:
                _log_signal(self.model, request, Signal.NON_FINITE)
            raise
        for result in results:
            signals = image_signals(result.images)
            self.quality.add(signals)
            for signal in {s for s in signals if s is not None}:
                _log_signal(self.model, result.request, signal)
        return results

    def _outputs(self, result: GenerationResult) -> dict[str, np.ndarray]:
        text = result_parameters(result, self.bundle, self.backend, self.model == IMG2IMG)
        return {"image": result.images[0], "parameters": np.array([text.encode("utf-8")], dtype=np.object_)}


def _log_signal(model: str, request: GenerationRequest, signal: Signal) -> None:
    LOG.warning("a %s request made a %s image: prompt %r, negative %r, seed %d, steps %s, sampler %s, %sx%s",
                model, signal.value, request.prompt, request.negative_prompt, request.seed, request.steps,
                request.sampler, request.width, request.height)
