"""The whole denoising loop on the GPU: the step-fused UNet engine called once per model evaluation, every
tensor resident.

Before the loop, one upload each: the initial sampler state, the text embeddings, and a table of
the per-evaluation inputs with one row per evaluation (timestep, input scale, guidance, the
plan's update matrix, and the evaluation's noise; zeros where the sampler draws none), all from
`sdrun.sampling.StepFeeds`. Evaluation i points the engine's per-evaluation inputs at row i of
the table (`set_tensor_address`, no copy) and alternates two state buffers: the next state of
evaluation i is the state of i + 1. Only the final latents (slot 0 of the last state) come back
to the host. Host staging buffers are page-locked, so each copy is one DMA.

With `cuda_graph` (static-shape engines only, whose addresses and shapes never change), step 0
runs plainly (TensorRT's lazy setup happens then), and one CUDA graph per state-buffer parity is
captured from the stream; each later step copies its table row into fixed input buffers on the
device and replays the graph of its parity, as NVIDIA's TensorRT diffusion demo replays a
captured UNet. Results are checked for NaN/inf once, after the loop.

The rows come from the host-side sampler plan; nothing here knows a sampler.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
from typing import TYPE_CHECKING, Callable

import numpy as np

from sdrun.errors import UserError
from sdrun.sampling import PER_EVALUATION, StepFeeds

if TYPE_CHECKING:
    import tensorrt as trt

    from sdrun.backends.cuda import Cuda
    from sdrun.backends.tensorrt_runner import TensorRTRunner

SAMPLE, OUTPUT = "state", "next_state"


# --- pure host-side parts (tested without a GPU) --------------------------------------------------------


def step_table(feeds: StepFeeds, dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    """Per-evaluation input name -> (E, *shape) array in the engine's dtype; row i is what the host-driven
    loop (`sdrun.sampling.run_fused`) feeds evaluation i."""
    return {name: np.ascontiguousarray(feeds.rows[name], dtype=dtypes[name]) for name in PER_EVALUATION}


def state_buffers_of(step: int) -> tuple[int, int]:
    """(state buffer, next-state buffer) of `step` among the two state buffers."""
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
    """Device memory of one loop shape: two state buffers, the conditioning, the step table and fixed step inputs."""

    states: tuple[int, int]  # the two (W, B, C, h, w) state buffers
    conditioning: dict[str, int]  # the loop's constant inputs (context; SDXL's text_embeds, time_ids)
    table: dict[str, int]  # per-step input -> base of its (S, ...) table
    fixed: dict[str, int]  # per-step input -> one row's buffer (CUDA-graph replays read these)
    extra_outputs: dict[str, int]  # engine outputs the loop does not read
    host_state: np.ndarray  # pinned (W, B, C, h, w) staging of the initial state
    host_latents: np.ndarray  # pinned (B, C, h, w) staging of the final download (slot 0 of the last state)
    host_conditioning: dict[str, np.ndarray]  # pinned staging of the conditioning
    host_table: dict[str, np.ndarray]  # pinned staging of the step table
    graphs: dict[int, tuple] = dataclasses.field(default_factory=dict)  # parity -> (graph, executable graph)


class ResidentLoop:
    """`loop(feeds, on_step)` -> final latents, for a step-fused UNet TensorRT runner."""

    def __init__(self, runner: TensorRTRunner, cuda_graph: bool = False):
        if cuda_graph and not is_static_profile(runner.profile):
            raise UserError("--cuda-graph needs a static-shape step-fused UNet engine; this one is dynamic.",
                            fix=f"build one: {runner.rebuild_hint} --static --opt batch=B,height=H,width=W")
        self.runner, self.cuda_graph = runner, cuda_graph
        self.cuda, self.stream = runner.group.cuda, runner.group.stream
        self.pinned = PinnedArrays(self.cuda)
        self._buffers: dict[tuple, LoopBuffers] = {}

    def __call__(self, feeds: StepFeeds, on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
        state, conditioning, steps = feeds.state, feeds.conditioning, len(feeds)
        table = step_table(feeds, self.runner.dtypes)
        shapes = {SAMPLE: state.shape, **{name: rows.shape for name, rows in conditioning.items()}}
        self._set_shapes(shapes, table)  # the runner's `run` may have set others since
        buffers = self._prepared(shapes, steps, table)
        self._upload(buffers, state, conditioning, table)
        for step in range(steps):
            self._step(buffers, table, step)
            if on_step:
                on_step(step + 1, steps)  # enqueued; the stream runs ahead of the host
        final = state_buffers_of(steps - 1)[1]
        self.cuda.to_host(buffers.host_latents, buffers.states[final], self.stream)  # slot 0 comes first
        self.cuda.synchronize(self.stream)
        return buffers.host_latents.astype(np.float32, copy=True)

    def _prepared(self, shapes: dict[str, tuple], steps: int, table: dict[str, np.ndarray]) -> LoopBuffers:
        key = (tuple(shapes.items()), steps)
        if key not in self._buffers:
            self._buffers[key] = self._allocate(shapes, table)
        return self._buffers[key]

    def _set_shapes(self, shapes: dict[str, tuple], table: dict[str, np.ndarray]) -> None:
        for name, shape in {**shapes, **{name: rows.shape[1:] for name, rows in table.items()}}.items():
            self.runner.set_input_shape(name, shape)

    def _allocate(self, shapes: dict[str, tuple], table: dict[str, np.ndarray]) -> LoopBuffers:
        """Buffers for one loop shape (`shapes`: the state's and each conditioning input's); the engine's input
        shapes must be set already."""
        runner, malloc = self.runner, self.runner.group.allocations.malloc
        state = shapes[SAMPLE]
        conditioning = {name: shape for name, shape in shapes.items() if name != SAMPLE}
        state_bytes = math.prod(state) * runner.dtypes[SAMPLE].itemsize
        extra = {name: malloc(nbytes) for name, nbytes in runner.unread_output_bytes({OUTPUT}).items()}
        return LoopBuffers(
            states=(malloc(state_bytes), malloc(state_bytes)),
            conditioning={name: malloc(math.prod(shape) * runner.dtypes[name].itemsize)
                          for name, shape in conditioning.items()},
            table={name: malloc(rows.nbytes) for name, rows in table.items()},
            fixed={name: malloc(rows.nbytes // rows.shape[0]) for name, rows in table.items()},
            extra_outputs=extra, host_state=self.pinned.empty(state, runner.dtypes[SAMPLE]),
            host_latents=self.pinned.empty(state[1:], runner.dtypes[SAMPLE]),
            host_conditioning={name: self.pinned.empty(shape, runner.dtypes[name]) for name, shape in conditioning.items()},
            host_table={name: self.pinned.empty(rows.shape, rows.dtype) for name, rows in table.items()})

    def _upload(self, buffers: LoopBuffers, state: np.ndarray, conditioning: dict[str, np.ndarray],
                table: dict[str, np.ndarray]) -> None:
        """One host-to-device copy each, through the page-locked staging of this loop shape."""
        pairs = [(buffers.host_state, state, buffers.states[0])]
        pairs += [(buffers.host_conditioning[name], rows, buffers.conditioning[name]) for name, rows in conditioning.items()]
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
        source, target = state_buffers_of(parity)
        addresses = {SAMPLE: buffers.states[source], OUTPUT: buffers.states[target], **buffers.conditioning,
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
