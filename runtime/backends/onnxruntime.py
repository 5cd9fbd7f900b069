"""ONNX Runtime runners: CPU provider by default, CUDA when onnxruntime-gpu is installed.

Outputs are bound to numpy buffers allocated once per input shape and reused on every call, so
a denoising loop allocates nothing after its first step. A result stays valid until the same
runner is called again.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sdrun.bundle import ComponentRecord, Manifest, binding_from_feeds, resolve_shape, verify_component_files
from sdrun.errors import MissingDependencyError

INSTALL = "pip install onnxruntime   (or onnxruntime-gpu for the CUDA provider)"


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime", "for the onnxruntime backend", INSTALL) from None
    return onnxruntime


def default_providers() -> list[str]:
    available = import_onnxruntime().get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeRunner:
    """One component's graph in an InferenceSession with reused output buffers."""

    def __init__(self, graph: Path, record: ComponentRecord, vae_scale: int, providers: list[str] | None = None,
                 threads: int | None = None):
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(graph), options, providers=providers or default_providers())
        self.record = record
        self.vae_scale = vae_scale
        self._outputs: dict[tuple, dict[str, np.ndarray]] = {}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._output_buffers(feeds)
        binding = self.session.io_binding()
        for spec in self.record.inputs:
            binding.bind_cpu_input(spec.name, np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype))
        for name, buffer in outputs.items():
            binding.bind_output(name, "cpu", 0, buffer.dtype, buffer.shape, buffer.ctypes.data)
        self.session.run_with_iobinding(binding)
        return outputs

    def _output_buffers(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = tuple(feeds[s.name].shape for s in self.record.inputs)
        if key not in self._outputs:
            binding = binding_from_feeds(self.record, feeds, self.vae_scale)
            self._outputs[key] = {s.name: np.empty(resolve_shape(s.dims, binding), dtype=s.dtype)
                                  for s in self.record.outputs}
        return self._outputs[key]



def onnxruntime_runners(bundle: Path, manifest: Manifest, components: list[str],
                        providers: list[str] | None = None, threads: int | None = None) -> dict[str, OnnxRuntimeRunner]:
    runners = {}
    for name in components:
        record = manifest.components[name]
        verify_component_files(bundle, record)
        runners[name] = OnnxRuntimeRunner(bundle / record.graph, record, manifest.vae_scale, providers, threads)
    return runners
