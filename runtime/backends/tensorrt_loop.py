"""The whole denoising loop on the GPU: the step-fused UNet engine called once per step, every tensor resident.

Before the loop, one upload each: the initial latents, the text embeddings, and a table of the
per-step inputs with one row per step (timestep, guidance, the three step coefficients, and the
step's noise when the sampler draws any; zeros otherwise). Step i points the engine's per-step
inputs at row i of the table (`set_tensor_address`, no copy) and alternates two latent buffers:
the output of step i is the sample of step i + 1. Only the final latents come back to the host.
Host staging buffers are page-locked, so each copy is one DMA.

With `cuda_graph` (static-shape engines only, whose addresses and shapes never change), step 0
runs plainly (TensorRT's lazy setup happens then), and one CUDA graph per latent-buffer parity is
captured from the stream; each later step copies its table row into fixed input buffers on the
device and replays the graph of its parity, as NVIDIA's TensorRT diffusion demo replays a
captured UNet. Results are checked for NaN/inf once, after the loop.

The coefficients come from the host-side sampler (`DenoisePlan`); nothing here knows a sampler.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
from typing import TYPE_CHECKING, Callable

import numpy as np

from sdrun.backends.base import DenoisePlan
from sdrun.errors import UserError

if TYPE_CHECKING:
    import tensorrt as trt

    from sdrun.backends.cuda import Cuda
    from sdrun.backends.tensorrt_runner import TensorRTRunner

SAMPLE, OUTPUT, CONTEXT = "sample", "latent", "encoder_hidden_states"
PER_STEP = ("timestep", "guidance", "step_coefficients", "noise")  # inputs that change every step


# --- pure host-side parts (tested without a GPU) --------------------------------------------------------


def step_table(plan: DenoisePlan, latent_shape: tuple[int, ...], dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    """Per-step input name -> (S, *shape) array in the engine's dtype; row i is what the fused graph's
    `denoise` call gets at step i (zero noise for a deterministic sampler)."""
    steps = plan.steps
    noise = plan.noise if plan.noise is not None else np.zeros((steps, *latent_shape), np.float32)
    coefficients = np.stack([plan.c_x, plan.c_out, plan.sigma], axis=1)  # (S, 3)
    rows = {"timestep": plan.timesteps.reshape(steps, 1), "guidance": np.full((steps, 1), plan.guidance),
            "step_coefficients": coefficients, "noise": noise}
    return {name: np.ascontiguousarray(rows[name], dtype=dtypes[name]) for name in PER_STEP}


def guided_context(context: np.ndarray, plan: DenoisePlan) -> np.ndarray:
    """The fused graph always guides: without CFG it gets [cond; cond]."""
    return context if plan.uses_cfg else np.concatenate([context, context])


def latent_buffers_of(step: int) -> tuple[int, int]:
    """(sample buffer, output buffer) of `step` among the two latent buffers."""
    return step % 2, (step + 1) % 2


def row_address(base: int, table: np.ndarray, row: int) -> int:
    """Device address of row `row` of a table uploaded contiguously at `base`."""
    return base + row * (table.nbytes // table.shape[0])


def is_static_profile(profile: dict) -> bool:
    return all(levels["min"] == levels["max"] for levels in profile.values())


# --- device parts --------------------------------------------------------------------------------------


class PinnedArrays:
    """Page-locked host arrays (cudaMallocHost), freed together."""

    def __init__(self, cuda: Cuda):
        self.cuda, self.pointers = cuda, []

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = max(math.prod(shape) * np.dtype(dtype).itemsize, 1)
        pointer = int(self.cuda.check(self.cuda.rt.cudaMallocHost(nbytes)))
        self.pointers.append(pointer)
        raw = (ctypes.c_uint8 * nbytes).from_address(pointer)
        return np.frombuffer(raw, dtype=np.uint8, count=math.prod(shape) * np.dtype(dtype).itemsize).view(
            dtype).reshape(shape)

    def release(self) -> None:
        for pointer in self.pointers:
            self.cuda.check(self.cuda.rt.cudaFreeHost(pointer))
        self.pointers = []


def copy_on_device(cuda: Cuda, target: int, source: int, nbytes: int, stream) -> None:
    kind = cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    cuda.check(cuda.rt.cudaMemcpyAsync(target, source, nbytes, kind, stream))


def capture_step(cuda: Cuda, context: trt.IExecutionContext, stream):
    """A CUDA graph of one `execute_async_v3` on `stream`, instantiated: (graph, executable graph)."""
    mode = cuda.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    cuda.check(cuda.rt.cudaStreamBeginCapture(stream, mode))
    launched = context.execute_async_v3(int(stream))
    graph = cuda.check(cuda.rt.cudaStreamEndCapture(stream))
    if not launched:
        cuda.check(cuda.rt.cudaGraphDestroy(graph))
        raise RuntimeError("TensorRT could not enqueue the step-fused UNet while capturing a CUDA graph")
    return graph, cuda.check(cuda.rt.cudaGraphInstantiate(graph, 0))


@dataclasses.dataclass
class LoopBuffers:
    """Device memory of one loop shape: two latent buffers, the context, the step table and fixed step inputs."""

    latents: tuple[int, int]
    context: int
    table: dict[str, int]  # per-step input -> base of its (S, ...) table
    fixed: dict[str, int]  # per-step input -> one row's buffer (CUDA-graph replays read these)
    extra_outputs: dict[str, int]  # engine outputs the loop does not read
    host_latents: np.ndarray  # pinned (B, C, h, w) staging for the first upload and the final download
    host_context: np.ndarray  # pinned staging of the text embeddings
    host_table: dict[str, np.ndarray]  # pinned staging of the step table
    graphs: dict[int, tuple] = dataclasses.field(default_factory=dict)  # parity -> (graph, executable graph)


class ResidentLoop:
    """`denoise(x, context, plan, on_step)` for a step-fused UNet TensorRT runner."""

    def __init__(self, runner: TensorRTRunner, cuda_graph: bool = False):
        if cuda_graph and not is_static_profile(runner.profile):
            raise UserError("--cuda-graph needs a static-shape step-fused UNet engine; this one is dynamic.",
                            fix=f"build one: {runner.rebuild_hint} --static --opt batch=B,height=H,width=W")
        self.runner, self.cuda_graph = runner, cuda_graph
        self.cuda, self.stream = runner.group.cuda, runner.group.stream
        self.pinned = PinnedArrays(self.cuda)
        self._buffers: dict[tuple, LoopBuffers] = {}

    def __call__(self, x: np.ndarray, context: np.ndarray, plan: DenoisePlan,
                 on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
        context = guided_context(context, plan)
        table = step_table(plan, x.shape, self.runner.dtypes)
        self._set_shapes(x.shape, context.shape, table)  # the runner's `run` may have set others since
        buffers = self._prepared(x.shape, context.shape, plan.steps, table)
        self._upload(buffers, x, context, table)
        for step in range(plan.steps):
            self._step(buffers, table, step)
            if on_step:
                on_step(step + 1, plan.steps)  # enqueued; the stream runs ahead of the host
        final = latent_buffers_of(plan.steps - 1)[1]
        self.cuda.to_host(buffers.host_latents, buffers.latents[final], self.stream)
        self.cuda.synchronize(self.stream)
        return buffers.host_latents.astype(np.float32, copy=True)

    def _prepared(self, latent: tuple, context: tuple, steps: int, table: dict[str, np.ndarray]) -> LoopBuffers:
        key = (latent, context, steps)
        if key not in self._buffers:
            self._buffers[key] = self._allocate(latent, context, table)
        return self._buffers[key]

    def _set_shapes(self, latent: tuple, context: tuple, table: dict[str, np.ndarray]) -> None:
        shapes = {SAMPLE: latent, CONTEXT: context, **{name: rows.shape[1:] for name, rows in table.items()}}
        for name, shape in shapes.items():
            self.runner.set_input_shape(name, shape)

    def _allocate(self, latent: tuple, context: tuple, table: dict[str, np.ndarray]) -> LoopBuffers:
        """Buffers for one loop shape; the engine's input shapes must be set already."""
        runner, malloc = self.runner, self.runner.group.allocations.malloc
        latent_bytes = math.prod(latent) * runner.dtypes[SAMPLE].itemsize
        extra = {name: malloc(nbytes) for name, nbytes in runner.unread_output_bytes({OUTPUT}).items()}
        return LoopBuffers(
            latents=(malloc(latent_bytes), malloc(latent_bytes)),
            context=malloc(math.prod(context) * runner.dtypes[CONTEXT].itemsize),
            table={name: malloc(rows.nbytes) for name, rows in table.items()},
            fixed={name: malloc(rows.nbytes // rows.shape[0]) for name, rows in table.items()},
            extra_outputs=extra, host_latents=self.pinned.empty(latent, runner.dtypes[SAMPLE]),
            host_context=self.pinned.empty(context, runner.dtypes[CONTEXT]),
            host_table={name: self.pinned.empty(rows.shape, rows.dtype) for name, rows in table.items()})

    def _upload(self, buffers: LoopBuffers, x: np.ndarray, context: np.ndarray, table: dict[str, np.ndarray]) -> None:
        """One host-to-device copy each, through the page-locked staging of this loop shape."""
        pairs = [(buffers.host_latents, x, buffers.latents[0]), (buffers.host_context, context, buffers.context)]
        pairs += [(buffers.host_table[name], rows, buffers.table[name]) for name, rows in table.items()]
        for staging, array, device in pairs:
            np.copyto(staging, array, casting="unsafe")
            self.cuda.to_device(device, staging, self.stream)

    def _step(self, buffers: LoopBuffers, table: dict[str, np.ndarray], step: int) -> None:
        parity = step % 2
        if self.cuda_graph and step > 0:
            self._replay(buffers, table, step, parity)
            return
        inputs = {name: row_address(buffers.table[name], rows, step) for name, rows in table.items()}
        self._bind(buffers, inputs, parity)
        self.runner.execute(self.stream)
        if self.cuda_graph:  # step 0 done plainly; capture both parities on fixed row buffers
            for captured in (0, 1):
                if captured not in buffers.graphs:
                    self._bind(buffers, buffers.fixed, captured)
                    buffers.graphs[captured] = capture_step(self.cuda, self.runner.context, self.stream)

    def _replay(self, buffers: LoopBuffers, table: dict[str, np.ndarray], step: int, parity: int) -> None:
        for name, rows in table.items():
            row_bytes = rows.nbytes // rows.shape[0]
            copy_on_device(self.cuda, buffers.fixed[name], row_address(buffers.table[name], rows, step),
                           row_bytes, self.stream)
        self.cuda.check(self.cuda.rt.cudaGraphLaunch(buffers.graphs[parity][1], self.stream))

    def _bind(self, buffers: LoopBuffers, step_inputs: dict[str, int], parity: int) -> None:
        source, target = latent_buffers_of(parity)
        addresses = {SAMPLE: buffers.latents[source], OUTPUT: buffers.latents[target], CONTEXT: buffers.context,
                     **step_inputs, **buffers.extra_outputs}
        for name, address in addresses.items():
            self.runner.set_address(name, address)

    def release(self) -> None:
        """Destroy the captured graphs and free the page-locked staging (device memory is the group's)."""
        for buffers in self._buffers.values():
            for graph, executable in buffers.graphs.values():
                self.cuda.check(self.cuda.rt.cudaGraphExecDestroy(executable))
                self.cuda.check(self.cuda.rt.cudaGraphDestroy(graph))
        self.cuda.synchronize(self.stream)
        self.pinned.release()
        self._buffers = {}
