"""The one place that calls `torch.onnx.export` (torch's default dynamo exporter)."""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from sdcompile.options import DEFAULT_OPSET
from sdrun.bundle import TensorSpec
from sdrun.errors import UserError

MIN_OPSET = 18  # torchlib's native opset; lower ones need version conversion that fails on these graphs
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with headroom


def onnx_from_module(module: torch.nn.Module, inputs: dict[str, torch.Tensor], input_specs: tuple[TensorSpec, ...],
                     output_specs: tuple[TensorSpec, ...], dim_multiples: dict[str, int],
                     opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Trace `module(*inputs)` into ONNX with the spec's names and symbolic dims.

    `dim_multiples` declares symbols that only take multiples of a number (e.g. latent sizes
    divisible by 2^levels), so the exporter can prove down/up-sampled sizes line up.
    Returns the model with weights loaded in memory (callers save it with `save_model`).
    """
    if opset < MIN_OPSET:
        raise UserError(f"opset {opset} is too low for the exporter.", expected=f">= {MIN_OPSET}",
                        got=str(opset), fix=f"pass --opset {DEFAULT_OPSET} (default)")
    args = tuple(inputs[t.name] for t in input_specs)
    with tempfile.TemporaryDirectory(prefix="sdcompile-export-") as tmp, torch.inference_mode(False), \
            torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), args, dynamo=True, opset_version=opset,
            input_names=[t.name for t in input_specs], output_names=[t.name for t in output_specs],
            dynamic_shapes=_dynamic_shapes(module, input_specs, dim_multiples), optimize=True, verbose=False)
        path = Path(tmp) / "model.onnx"
        program.save(str(path), external_data=True)
        del program  # holds a second copy of every weight
        model = onnx.load(str(path), load_external_data=True)
    name_io_dims(model, input_specs, output_specs)
    return model


def _dynamic_shapes(module: torch.nn.Module, specs: tuple[TensorSpec, ...], multiples: dict[str, int]) -> dict:
    """forward-argument name -> {axis: Dim}; one Dim per symbol, shared by every input using it."""
    import inspect

    dims = {}
    for symbol in {d for spec in specs for d in spec.dims if isinstance(d, str)}:
        step = multiples.get(symbol, 1)
        base = torch.export.Dim(f"{symbol}_{step}" if step > 1 else symbol, min=1)
        dims[symbol] = base * step if step > 1 else base
    params = list(inspect.signature(module.forward).parameters)
    return {param: {axis: dims[d] for axis, d in enumerate(spec.dims) if isinstance(d, str)} or None
            for param, spec in zip(params, specs)}


def name_io_dims(model: onnx.ModelProto, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
    """Give graph I/O dims the manifest's symbol names (the exporter invents its own)."""
    specs = {t.name: t for t in (*inputs, *outputs)}
    for value in (*model.graph.input, *model.graph.output):
        spec = specs[value.name]
        dims = value.type.tensor_type.shape.dim
        for dim, symbol in zip(dims, spec.dims):
            if isinstance(symbol, str):
                dim.dim_param = symbol
            else:
                dim.dim_value = symbol


def save_model(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write `model` to `path` (with `<name>.data` beside it past 2 GiB); returns every file written."""
    path = Path(path)
    if initializer_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
        return [path]
    data = path.with_name(path.name + ".data")
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path, data]


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
