"""ONNX Runtime runners: CPU provider by default, CUDA when onnxruntime-gpu is installed.

Outputs are bound to numpy buffers allocated once per input shape and reused on every call, so
a denoising loop allocates nothing after its first step. A result stays valid until the same
runner is called again.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sdrun.backends import BackendOptions
from sdrun.bundle import Bundle, ComponentRecord, binding_from_feeds, resolve_shape
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

    def __init__(self, graph: Path, record: ComponentRecord, vae_scale: int, rebuild_hint: str,
                 options: BackendOptions):
        ort = import_onnxruntime()
        session_options = ort.SessionOptions()
        if options.threads:
            session_options.intra_op_num_threads = options.threads
        providers = list(options.providers) if options.providers else default_providers()
        # Replacement initializers (LoRAs): an OrtValue made from numpy borrows the array's memory, so both are
        # kept as long as the session.
        replaced = (options.initializers or {}).get(record.name) or {}
        self._initializers = {name: _borrowed(ort, value) for name, value in replaced.items()}
        for name, (_, value) in self._initializers.items():
            session_options.add_initializer(name, value)
        if self._initializers:
            # ORT_ENABLE_ALL's layout pass pre-packs Conv weights from the graph file, before added initializers
            # replace them (seen on ONNX Runtime 1.32: the swapped Conv weights were ignored); one level down
            # keeps the other fusions and uses the replaced values.
            session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        if options.profile_dir is not None:
            session_options.enable_profiling = True
            session_options.profile_file_prefix = str(Path(options.profile_dir) / f"onnxruntime-{record.name}")
        self.session = ort.InferenceSession(str(graph), session_options, providers=providers)
        self.record, self.vae_scale, self.rebuild_hint = record, vae_scale, rebuild_hint
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

    def end_profile(self) -> list[dict]:
        """The Chrome trace events ONNX Runtime's profiler recorded (its JSON file stays in the profile dir)."""
        import json

        return json.loads(Path(self.session.end_profiling()).read_text())

    def _output_buffers(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = tuple(feeds[s.name].shape for s in self.record.inputs)
        if key not in self._outputs:
            binding = binding_from_feeds(self.record, feeds, self.vae_scale)
            self._outputs[key] = {s.name: np.empty(resolve_shape(s.dims, binding), dtype=s.dtype)
                                  for s in self.record.outputs}
        return self._outputs[key]


def _borrowed(ort, value: np.ndarray) -> tuple[np.ndarray, object]:
    array = np.ascontiguousarray(value)
    return array, ort.OrtValue.ortvalue_from_numpy(array)


def onnxruntime_runners(bundle: Bundle, components: list[str], options: BackendOptions) -> dict[str, OnnxRuntimeRunner]:
    return {name: OnnxRuntimeRunner(bundle.graph_path(name), bundle.component(name), bundle.recipe.vae_scale,
                                    bundle.rebuild_hint(name), options) for name in components}
