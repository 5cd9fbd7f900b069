"""`sdrun serve`: the bundle's pipeline bound into Triton Inference Server through PyTriton.

Triton serves HTTP, gRPC, health (`/v2/health/ready`) and Prometheus metrics; each model
(`txt2img`, and `img2img` when the bundle has the VAE encoder) takes one request per execution with
`slots` executions at once, and `serve.batcher` runs requests of one kind as one denoising loop.
SIGTERM and SIGINT stop the server after the requests in flight are answered.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sysconfig
from collections.abc import Callable
from pathlib import Path

from sdrun.backends import BackendOptions
from sdrun.errors import MissingDependencyError, UserError
from sdrun.serve.contract import IMG2IMG, OUTPUTS, TXT2IMG, TensorSpec, model_inputs
from sdrun.serve.model import PipelineModel
from sdrun.bundle import open_bundle
from sdrun.pipeline import needed_components
from sdrun.session import pipeline_on

LOOPBACK = "127.0.0.1"
EXIT_TIMEOUT_S = 60  # how long Triton waits for in-flight requests on shutdown
START_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    bundle: Path
    backend: str = "auto"
    host: str = LOOPBACK
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int | None = None  # images per denoising loop; None: the bundle's batch profile maximum
    max_queue_delay_ms: float = 5.0  # how long a loop waits for more requests of its kind
    instances: int = 1  # pipelines (each with its own runners) running loops side by side
    threads: int | None = None
    quality_metrics_port: int | None = None  # the image-quality counters' /metrics; None: metrics_port + 1


def serve(options: ServeOptions, echo: Callable[[str], None]) -> None:
    """Load, bind and serve until a signal stops the server (returns then)."""
    try:
        from pytriton.model_config import ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise MissingDependencyError("nvidia-pytriton", "for sdrun serve", "pip install 'sdcompile[serve]'") from None
    models = load_models(options, echo)
    quality = None  # started once Triton holds its ports, so it cannot take one of them
    _use_this_interpreters_libpython()
    config = TritonConfig(http_address=options.host, http_port=options.http_port, grpc_address=options.host,
                          grpc_port=options.grpc_port, metrics_address=options.host,
                          metrics_port=options.metrics_port, exit_timeout_secs=EXIT_TIMEOUT_S, log_verbose=0)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            with Triton(config=config) as triton:
                if not _loaded(triton, lambda: _bind(triton, models, Tensor, ModelConfig), attempt, echo):
                    continue
                quality = _start_quality_metrics(options, models, echo)
                echo(f"serving {', '.join(models)} on http://{options.host}:{options.http_port} "
                     f"(gRPC {options.grpc_port}, metrics {options.metrics_port})")
                triton.serve()
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
        if quality is not None:
            quality.shutdown()
        for model, _ in models.values():
            model.close()
    echo("server stopped")


def load_models(options: ServeOptions, echo) -> dict[str, tuple[PipelineModel, int]]:
    """model name -> (model, executions at once) for the bundle; every problem is a UserError before Triton
    starts."""
    bundle = open_bundle(options.bundle, lambda manifest: needed_components(manifest, None, _has_encoder(manifest)))
    img2img = _has_encoder(bundle.manifest)
    allowed = bundle.recipe.shapes.batch.max
    max_images = allowed if options.max_batch is None else options.max_batch
    if not 1 <= max_images <= allowed:
        raise UserError("--max-batch is outside the bundle's batch profile.", expected=f"1..{allowed}",
                        got=str(max_images), fix="lower --max-batch, or widen shapes.batch and re-export")
    if options.instances < 1:
        raise UserError("--instances must be at least 1.", got=str(options.instances), fix="e.g. --instances 1")
    backend_options = BackendOptions(threads=options.threads)
    loaded = [pipeline_on(bundle, options.backend, backend_options, echo) for _ in range(options.instances)]
    backend = loaded[0].backend
    slots = options.instances * max_images
    delay = options.max_queue_delay_ms / 1e3
    names = [TXT2IMG, *([IMG2IMG] if img2img else [])]
    return {name: (PipelineModel(name, bundle, [l.pipeline for l in loaded], backend, max_images, delay), slots)
            for name in names}


def _start_quality_metrics(options: ServeOptions, models: dict, echo):
    """The image-quality counters' endpoint (`serve.quality_metrics`), or None (said aloud) when its port is taken."""
    from sdrun.quality import prometheus_text
    from sdrun.serve.quality_metrics import start_metrics_server

    port = options.quality_metrics_port or options.metrics_port + 1
    try:
        server = start_metrics_server(options.host, port, lambda: "".join(
            prometheus_text(model.quality, name) for name, (model, _) in models.items()))
    except OSError as err:
        echo(f"warning: image-quality metrics not served: port {port}: {err.strerror} (choose --quality-metrics-port)")
        return None
    echo(f"image-quality metrics on http://{options.host}:{port}/metrics")
    return server


def _bind(triton, models: dict, tensor_type, model_config) -> None:
    for name, (model, slots) in models.items():
        triton.bind(model_name=name, infer_func=[_callable(model)] * slots,
                    inputs=[_tensor(tensor_type, spec) for spec in model_inputs(name)],
                    outputs=[_tensor(tensor_type, spec) for spec in OUTPUTS],
                    config=model_config(batching=False), strict=True)


def _loaded(triton, bind: Callable[[], None], attempt: int, echo) -> bool:
    """Bind the models, start Triton and load them; False (after saying why) when a start that may be retried
    failed.

    PyTriton's proxy instances can lose the race for their handshake socket while Triton loads several at
    once ("Connection refused"), whether the load happens as a model is bound (a started Triton) or on
    connecting: a fresh start succeeds."""
    from tritonclient.utils import InferenceServerException

    try:
        bind()
        triton.connect()
    except InferenceServerException as err:
        if attempt == START_ATTEMPTS:
            raise
        echo(f"Triton could not load the models ({str(err).splitlines()[0][:200]}); starting it again")
        return False
    return True


def _has_encoder(manifest) -> bool:
    return "vae_encoder" in manifest.components


def _callable(model: PipelineModel):
    def infer(requests):
        return [model.infer(request.data) for request in requests]
    return infer


def _tensor(tensor_type, spec: TensorSpec):
    return tensor_type(name=spec.name, dtype=spec.dtype if spec.dtype is not object else bytes,
                       shape=spec.shape, optional=spec.optional)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # PyTriton's serve() stops Triton gracefully on it


def _use_this_interpreters_libpython() -> None:
    """Triton's Python-backend stub links libpython3.x; load this interpreter's, not another patch release's."""
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in paths.split(os.pathsep):
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, paths) if p)

